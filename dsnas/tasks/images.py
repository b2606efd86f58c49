"""Image classification that works offline: scikit-learn's bundled 8x8 handwritten digits (upsampled), or a folder
of images in ImageFolder layout (one sub-folder per class). Accuracy is top-1 on a held-out split."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dsnas.config import is_there
from dsnas.errors import SpecError, TrialError, require
from dsnas.kernels.precision import FALLBACK_STEPS
from dsnas.tasks.loop import refresh_batch_norm, train_steps

DIGITS = "digits"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
# PIL modes with one channel: a folder of only these trains on 1 channel, anything else on RGB.
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
# One-channel modes deeper than 8 bits, by the value that is white: convert("L") clips them at 255, so that every
# pixel of a 16-bit image came out white. 16-bit images are often opened as 32-bit "I"; a float image is in [0, 1].
DEEP_MODES = {"I": 65535.0, "I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "F": 1.0}
INSTALL_HINT = 'pip install "dsnas[images]"'
# The training images a BatchNorm's statistics are taken over before each evaluation (loop.refresh_batch_norm):
# 512 of them took as long as 2.5-4 training steps of 64 (2 shared cores): 4% of the images study's training.
NORM_IMAGES = 512


@dataclass(frozen=True)
class ImagesConfig:
    dataset: str = "digits"  # "digits" (scikit-learn's bundled 8x8 digits), or a folder relative to the study file
    image_size: int = 16  # images are resized to image_size x image_size
    batch_size: int = 64  # training batch
    train_images: int = 20_000  # the fixed training budget of every trial, in images seen
    val_share: float = 0.2  # the share of each class held out for evaluation
    lr: float = 1e-2  # AdamW learning rate (small BatchNorm CNNs take it: 0.98 held-out digits vs 0.91 at 3e-3)
    warmup_frac: float = 0.1  # learning-rate warm-up, as a share of training
    shift: int = 1  # augmentation: random shifts of up to this many pixels (0: none)
    seed: int = 0  # of the train / held-out split

    def __post_init__(self) -> None:
        for key in ("image_size", "batch_size", "train_images"):
            require(getattr(self, key) >= 1, key, "must be >= 1", getattr(self, key),
                    f"remove {key} to use its default ({getattr(ImagesConfig, key)})")
        require(4 <= self.image_size <= 1024, "image_size", "must be in [4, 1024]", self.image_size,
                "e.g. image_size = 16")
        require(0 < self.val_share < 1, "val_share", "must be in (0, 1)", self.val_share, "e.g. val_share = 0.2")
        require(self.lr > 0, "lr", "must be > 0", self.lr, "e.g. lr = 1e-2")
        require(0 <= self.warmup_frac < 1, "warmup_frac", "must be in [0, 1)", self.warmup_frac,
                "e.g. warmup_frac = 0.1")
        require(0 <= self.shift < self.image_size // 2, "shift", "must be >= 0 and below half the image size",
                self.shift, "e.g. shift = 1, or 0 for no augmentation")
        require(self.seed >= 0, "seed", "must be >= 0", self.seed)

    def resolve_dataset(self, base_dir: str, where: str = "task") -> Path | None:
        """The folder to read, or None for the digits; raises SpecError if it is missing, holds fewer than two
        classes, or the package that reads it is not installed."""
        if self.dataset == DIGITS:
            if importlib.util.find_spec("sklearn") is None:
                raise SpecError(where, "task.dataset", '"digits" is read from scikit-learn\'s bundled data, '
                                "which is not installed", self.dataset, INSTALL_HINT)
            return None
        path = Path(base_dir) / self.dataset
        if not is_there(path.is_dir):
            raise SpecError(where, "task.dataset", f'must be "{DIGITS}" or an existing folder', self.dataset,
                            f"check the path (relative to {base_dir})")
        path = path.resolve()
        classes = [d.name for d in class_folders(path) if image_files(d)]
        if len(classes) < 2:
            raise SpecError(where, "task.dataset", "needs at least two class sub-folders holding images "
                            f"({', '.join(IMAGE_SUFFIXES)})", classes, "use the layout FOLDER/CLASS/IMAGE.png")
        if importlib.util.find_spec("PIL") is None:
            raise SpecError(where, "task.dataset", "an image folder is read with Pillow, which is not installed",
                            self.dataset, "pip install pillow")
        return path


def class_folders(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


# How a folder's images are read, in its task's fingerprint: 2 reads the class folders' sub-folders too and leaves
# out hidden files; a study searched before (no "folder_reader") read neither, and its data hash differs where the
# folder has such files.
FOLDER_READER = 2


def image_files(folder: Path) -> list[Path]:
    """A class folder's images, in its sub-folders too (as torchvision's ImageFolder reads them: images sorted into
    dog/batch1/ were dropped without a word, and a class of only such images with them), hidden ones left out."""
    return sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def class_images(root: Path) -> dict[str, list[Path]]:
    """Each class folder that holds images, in name order (its class number), with its images."""
    return {d.name: files for d in class_folders(root) if (files := image_files(d))}


def read_otherwise_before(root: Path, classes: dict[str, list[Path]]) -> int:
    """The images a dsnas before FOLDER_READER 2 read otherwise: those in a class folder's sub-folders (it dropped
    them) and hidden ones directly in it (it read them)."""
    count = sum(f.parent != root / name for name, files in classes.items() for f in files)
    for folder in class_folders(root):
        count += sum(f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                     for f in folder.iterdir())
    return count


def load_digits() -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images (1797, 1, 8, 8) in [0, 1], labels, sha256). Read from scikit-learn's data file directly: importing
    sklearn itself pulls in scipy and takes seconds."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise TrialError(f'the "digits" dataset needs scikit-learn: {INSTALL_HINT}')
    raw = gzip.decompress((Path(spec.submodule_search_locations[0]) / "datasets/data/digits.csv.gz").read_bytes())
    rows = torch.tensor([[float(v) for v in line.split(",")] for line in raw.decode().splitlines() if line])
    # Each row: 64 pixel values in 0..16, then the label.
    return rows[:, :64].reshape(-1, 1, 8, 8) / 16.0, rows[:, 64].long(), hashlib.sha256(raw).hexdigest()


def load_folder(root: Path, size: int, classes: dict[str, list[Path]] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images (N, C, size, size) in [0, 1], labels, sha256) of an ImageFolder layout: sub-folders in name order
    are the classes 0, 1, ...; C is 1 when every image is grayscale, else 3 (RGB). ``classes``: class_images(root),
    where the caller has it."""
    from PIL import Image  # an optional dependency, needed only for folders

    # Numbered among the folders holding images, as the study's check counts them: a stray folder (checkpoints/)
    # took a class number, shifted the later classes and added a class no image trains.
    classes = class_images(root) if classes is None else classes
    files = [(label, f) for label, images in enumerate(classes.values()) for f in images]
    digest, pictures = hashlib.sha256(), []
    for _, file in files:
        data = file.read_bytes()
        digest.update(file.relative_to(root).as_posix().encode() + b"\0" + data)
        try:
            with Image.open(file) as img:
                img.load()
                pictures.append(img.copy())
        except OSError as e:
            raise TrialError(f"cannot read image {file}: {e}") from None
    mode = "L" if all(p.mode in GRAY_MODES for p in pictures) else "RGB"
    channels = 1 if mode == "L" else 3
    arrays = [_pixels(p, mode, size) for p in pictures]
    images = torch.stack(arrays).reshape(-1, size, size, channels).permute(0, 3, 1, 2)
    return images, torch.tensor([label for label, _ in files]), digest.hexdigest()


def _pixels(picture: Any, mode: str, size: int) -> torch.Tensor:
    """One picture resized to size x size in ``mode`` ("L" or "RGB"), as floats in [0, 1], channels last."""
    import numpy as np
    from PIL import Image

    if picture.mode in DEEP_MODES:  # scaled by its own white, then resized as floats
        gray = np.clip(np.asarray(picture, dtype=np.float32) / DEEP_MODES[picture.mode], 0.0, 1.0)
        resized = np.asarray(Image.fromarray(gray).resize((size, size), Image.BILINEAR), dtype=np.float32)
        pixels = torch.from_numpy(resized.copy()).reshape(size, size, 1)
        return pixels.expand(size, size, 3 if mode == "RGB" else 1).flatten()
    raw = picture.convert(mode).resize((size, size), Image.BILINEAR).tobytes()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).float() / 255.0


def split(labels: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices, stratified: a seeded ``share`` of each class (at least one image of a class with
    two or more) is held out, so that every class is both learnt and evaluated."""
    gen = torch.Generator().manual_seed(seed)
    held = []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        n = min(len(members) - 1, max(1, round(share * len(members))))
        held.append(members[torch.randperm(len(members), generator=gen)[:n]])
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[torch.cat(held)] = True
    return (~mask).nonzero().flatten(), mask.nonzero().flatten()


def shifted(x: torch.Tensor, most: int, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random offset of up to ``most`` pixels per axis, zero (the mean) filled."""
    b, _, h, w = x.shape
    padded = F.pad(x, (most, most, most, most))
    dy, dx = torch.randint(0, 2 * most + 1, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (b, h, w, c) -> (b, c, h, w)


class ImagesTask:
    tokens_per_example = 1  # throughput counts images
    throughput_unit = "images/s"

    def __init__(self, config: ImagesConfig, base_dir: str) -> None:
        self.config = config
        path = config.resolve_dataset(base_dir)
        if path is None:
            images, labels, self.sha256 = load_digits()
            # Bilinear upsampling gives the stride-2 stages of a CNN something to downsample.
            images = F.interpolate(images, size=(config.image_size,) * 2, mode="bilinear", align_corners=False)
            self.source = f"{DIGITS} (scikit-learn)"
        else:
            classes = class_images(path)  # the folder walked once
            images, labels, self.sha256 = load_folder(path, config.image_size, classes)
            self.source = str(path)
            self.class_names = list(classes)
            self.read_otherwise = read_otherwise_before(path, classes)
        self.n_classes = int(labels.max()) + 1
        self.train_idx, self.val_idx = split(labels, config.val_share, config.seed)
        if len(self.train_idx) == 0 or len(self.val_idx) == 0:
            raise TrialError(f"{self.source} has too few images to hold out {config.val_share} of them")
        # Statistics of the training split only: the held-out images stay unseen.
        train = images[self.train_idx]
        mean = train.mean(dim=(0, 2, 3), keepdim=True)
        std = train.std(dim=(0, 2, 3), keepdim=True, correction=0).clamp_min(1e-6)
        self.images, self.labels = (images - mean) / std, labels
        self.mean, self.std = mean.flatten().tolist(), std.flatten().tolist()

    def preprocessing(self) -> dict[str, Any]:
        """What an input must be for the trained model: recorded in an exported bundle (it held none, and the
        model scored 10% on the [0, 1] images a user has, 99% on these)."""
        return {"input": f"(N, {self.channels}, {self.config.image_size}, {self.config.image_size}) float32: pixels "
                         f"scaled to [0, 1] ({'grayscale' if self.channels == 1 else 'RGB'}), resized bilinearly to "
                         f"{self.config.image_size} x {self.config.image_size}, then per channel (x - mean) / std",
                "mean": self.mean, "std": self.std,
                "classes": getattr(self, "class_names", [str(i) for i in range(self.n_classes)])}

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def arch_defaults(self) -> dict[str, Any]:
        return {"image_size": self.config.image_size, "channels": self.channels, "n_classes": self.n_classes}

    def fingerprint(self) -> dict[str, Any]:
        return {"task": "images", "dataset": self.source, "dataset_sha256": self.sha256,
                "image_size": self.config.image_size, "classes": self.n_classes,
                "train_count": len(self.train_idx), "val_count": len(self.val_idx), "split_seed": self.config.seed,
                **({} if self.source.startswith(DIGITS) else {"folder_reader": FOLDER_READER})}

    def train(self, model: Any, device: Any, *, seed: int, checkpoint: Callable[[], None], fraction: float = 1.0,
              lr_scale: float = 1.0, fallback_steps: int = FALLBACK_STEPS, rungs: Sequence[float] = (),
              at_rung: Callable[[int], None] | None = None) -> dict[str, float]:
        """Train on ``fraction`` of the image budget at ``lr_scale`` times the learning rate (the engine's
        fine-tuning and QAT use both); low-precision layers fall back to fp32 where they overflow. After each
        share ``rungs[k]`` of this call's steps, ``at_rung(k)`` is called (it raises to stop the training). Before
        each rung and at the end, BatchNorm's statistics are taken anew over unshifted training images."""
        cfg = self.config
        steps = max(1, int(fraction * cfg.train_images) // cfg.batch_size)
        gen = torch.Generator().manual_seed(seed)

        def refresh() -> None:  # its own generator: the training batches are the same with rungs or without
            norm_gen = torch.Generator().manual_seed(seed)
            refresh_batch_norm(model, (self.batch(norm_gen, device) for _ in range(-(-NORM_IMAGES // cfg.batch_size))))

        def rung(k: int) -> None:  # the rung evaluates the weights trained so far, not their statistics' lag
            refresh()
            at_rung(k)  # type: ignore[misc]  (passed only where there is one)

        mean_loss, skipped = train_steps(model, steps, lambda: self.batch(gen, device, augment=True),
                                         lambda x, y: self.loss(model, x, y), lr=cfg.lr * lr_scale,
                                         warmup_frac=cfg.warmup_frac, fallback_steps=fallback_steps,
                                         checkpoint=checkpoint, rungs=rungs,
                                         at_rung=None if at_rung is None else rung)
        refresh()
        return {"train_loss": mean_loss, "train_steps": float(steps),
                "train_images": float(steps * cfg.batch_size), "skipped_steps": float(skipped)}

    def batch(self, gen: torch.Generator, device: Any, augment: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A random training batch (images, labels), drawn with replacement; shifted when ``augment``."""
        pick = self.train_idx[torch.randint(0, len(self.train_idx), (self.config.batch_size,), generator=gen)]
        x = self.images[pick]
        if augment and self.config.shift:
            x = shifted(x, self.config.shift, gen)
        return x.to(device), self.labels[pick].to(device)

    def batches(self, n: int, device: Any, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` training batches, unshifted, for calibration and saliency (never the held-out split)."""
        gen = torch.Generator().manual_seed(seed)
        return [self.batch(gen, device) for _ in range(n)]

    def loss(self, model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).float(), y)

    @torch.no_grad()
    def evaluate(self, model: Any, device: Any) -> dict[str, float]:
        model.eval()
        loss_sum, correct = 0.0, 0
        for idx in self.val_idx.split(256):
            x, y = self.images[idx].to(device), self.labels[idx].to(device)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
        return {"accuracy": correct / len(self.val_idx), "val_loss": loss_sum / len(self.val_idx)}

    def eval_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held-out image and its label, in evaluate()'s order (for dsnas route)."""
        return self.images[self.val_idx], self.labels[self.val_idx]

    def example_batch(self, batch_size: int, device: Any) -> torch.Tensor:
        """The first ``batch_size`` held-out images, repeated in order when there are fewer."""
        idx = self.val_idx[torch.arange(batch_size) % len(self.val_idx)]
        return self.images[idx].to(device)
