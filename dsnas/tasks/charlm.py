"""Byte-level language modelling on a corpus every machine has: the source of the running Python's
standard library (or a text file the user names). Accuracy is validation next-byte accuracy."""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dsnas.config import is_there
from dsnas.errors import SpecError, TrialError, require
from dsnas.kernels.precision import FALLBACK_STEPS
from dsnas.tasks.loop import train_steps

VOCAB = 256  # bytes


@dataclass(frozen=True)
class CharLMConfig:
    corpus: str = "stdlib"  # "stdlib", or a text file (relative to the study file)
    corpus_bytes: int = 2_000_000  # train + validation, read in a fixed order (the stdlib: whole files past it)
    context: int = 64  # bytes a model sees
    batch_size: int = 32  # training batch
    train_tokens: int = 200_000  # the fixed training budget of every trial
    val_tokens: int = 32_768  # validation tokens (at most what the validation split holds: none is scored twice)
    lr: float = 3e-3  # AdamW learning rate
    warmup_frac: float = 0.1  # learning-rate warm-up, as a share of training

    def __post_init__(self) -> None:
        for key in ("corpus_bytes", "context", "batch_size", "train_tokens", "val_tokens"):
            require(getattr(self, key) >= 1, key, "must be >= 1", getattr(self, key),
                    f"remove {key} to use its default ({getattr(CharLMConfig, key)})")
        require(self.corpus_bytes >= 20 * (self.context + 1), "corpus_bytes", "must hold at least 20 contexts",
                self.corpus_bytes, f"set corpus_bytes >= {20 * (self.context + 1)}, or a shorter context")
        require(self.lr > 0, "lr", "must be > 0", self.lr, "e.g. lr = 3e-3")
        require(0 <= self.warmup_frac < 1, "warmup_frac", "must be in [0, 1)", self.warmup_frac,
                "e.g. warmup_frac = 0.1")

    def resolve_corpus(self, base_dir: str, where: str = "task") -> Path | None:
        """The text file to read, or None for the standard library; raises SpecError if it is missing."""
        if self.corpus == "stdlib":
            held_out, enough = stdlib_split(self.corpus_bytes, 2 * (self.context + 1))
            if held_out < 2 * (self.context + 1):  # the validation split is every 10th file: none in the first 9
                raise SpecError(where, "task.corpus_bytes", "must read enough of the standard library that its "
                                f"validation split (every 10th file; {held_out} bytes at this setting) holds two "
                                f"contexts of {self.context}", self.corpus_bytes,
                                f"set corpus_bytes >= {enough}" if enough else "give a text file as corpus")
            return None
        path = Path(base_dir) / self.corpus
        if not is_there(path.is_file):
            raise SpecError(where, "task.corpus", 'must be "stdlib" or an existing text file', self.corpus,
                            f"check the path (relative to {base_dir})")
        if not os.access(path, os.R_OK):
            raise SpecError(where, "task.corpus", "must be a file this user can read", self.corpus,
                            "check its permissions")
        # The last tenth is the validation split: it must hold two contexts (and their next bytes).
        read = min(path.stat().st_size, self.corpus_bytes)
        held_out = read - read * 9 // 10  # as read_corpus cuts it
        if held_out < 2 * (self.context + 1):
            raise SpecError(where, "task.corpus", f"must be long enough that its last tenth (the validation split, "
                            f"{held_out} bytes) holds two contexts of {self.context}", self.corpus,
                            f"give a text of at least {20 * (self.context + 2)} bytes, or a shorter context")
        return path.resolve()


def stdlib_files() -> list[Path]:
    """The standard library's .py files in a fixed order (site-packages excluded: it differs per install)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__"))
        found += [Path(folder) / f for f in sorted(files) if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def stdlib_split(corpus_bytes: int, needed: int) -> tuple[int, int | None]:
    """The validation bytes read_corpus takes from the standard library at ``corpus_bytes``, and the smallest
    corpus_bytes whose validation split holds ``needed`` bytes (None: the whole library's does not). From the
    files' sizes, without reading them."""
    held_out, total, val, enough = None, 0, 0, None
    for i, file in enumerate(stdlib_files()):
        before, size = total, file.stat().st_size
        total += size
        val += size if i % 10 == 9 else 0
        if enough is None and val >= needed:
            enough = before + 1  # this file is read once corpus_bytes passes what the files before it hold
        if held_out is None and total >= corpus_bytes:
            held_out = val
        if held_out is not None and enough is not None:
            break
    return (val if held_out is None else held_out), enough


def read_corpus(config: CharLMConfig, base_dir: str) -> tuple[bytes, bytes, str]:
    """(train bytes, validation bytes, description). Validation is every 10th file of the standard library,
    or the last 10% of a text file: deterministic, and never overlapping training."""
    path = config.resolve_corpus(base_dir)
    if path is not None:
        data = path.read_bytes()[: config.corpus_bytes]
        cut = len(data) * 9 // 10
        return data[:cut], data[cut:], str(path)
    train, val, total = [], [], 0
    for i, file in enumerate(stdlib_files()):
        text = file.read_bytes()
        (val if i % 10 == 9 else train).append(text)
        total += len(text)
        if total >= config.corpus_bytes:
            break
    return b"".join(train), b"".join(val), f"python {sysconfig.get_python_version()} stdlib"


class CharLMTask:
    def __init__(self, config: CharLMConfig, base_dir: str) -> None:
        self.config = config
        train, val, self.source = read_corpus(config, base_dir)
        if len(val) < 2 * (config.context + 1):
            raise TrialError(f"the validation split of {self.source} is too short for context {config.context}")
        self.sha256 = hashlib.sha256(train + val).hexdigest()
        self.train_data = torch.frombuffer(bytearray(train), dtype=torch.uint8).long()
        self.val_data = torch.frombuffer(bytearray(val), dtype=torch.uint8).long()
        self.tokens_per_example = config.context

    def arch_defaults(self) -> dict[str, Any]:
        return {"vocab_size": VOCAB, "context": self.config.context}

    def fingerprint(self) -> dict[str, Any]:
        found = {"task": "charlm", "corpus": self.source, "corpus_sha256": self.sha256,
                 "train_bytes": len(self.train_data), "val_bytes": len(self.val_data)}
        if self._val_windows() < self.config.val_tokens // self.config.context:
            # Only where the split is too short for val_tokens: a study evaluated on the overlapping windows of an
            # older dsnas then differs from this one (its accuracies are of other windows), every other is as it was.
            found["val_windows"] = self._val_windows()
        return found

    def _windows(self, data: torch.Tensor, starts: torch.Tensor, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + torch.arange(self.config.context + 1)
        chunk = data[idx]
        return chunk[:, :-1].to(device), chunk[:, 1:].to(device)

    def train(self, model: Any, device: Any, *, seed: int, checkpoint: Callable[[], None], fraction: float = 1.0,
              lr_scale: float = 1.0, fallback_steps: int = FALLBACK_STEPS, rungs: Sequence[float] = (),
              at_rung: Callable[[int], None] | None = None) -> dict[str, float]:
        """Train on ``fraction`` of the token budget at ``lr_scale`` times the learning rate (the engine's
        fine-tuning and QAT use both); low-precision layers fall back to fp32 where they overflow. After each
        share ``rungs[k]`` of this call's steps, ``at_rung(k)`` is called (it raises to stop the training)."""
        cfg = self.config
        steps = max(1, int(fraction * cfg.train_tokens) // (cfg.batch_size * cfg.context))
        gen = torch.Generator().manual_seed(seed)
        mean_loss, skipped = train_steps(model, steps, lambda: self.batch(gen, device),
                                         lambda x, y: self.loss(model, x, y), lr=cfg.lr * lr_scale,
                                         warmup_frac=cfg.warmup_frac, fallback_steps=fallback_steps,
                                         checkpoint=checkpoint, rungs=rungs, at_rung=at_rung)
        return {"train_loss": mean_loss, "train_steps": float(steps),
                "train_tokens": float(steps * cfg.batch_size * cfg.context), "skipped_steps": float(skipped)}

    def batch(self, gen: torch.Generator, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A random training batch (inputs, next-byte targets)."""
        cfg = self.config
        starts = torch.randint(0, len(self.train_data) - cfg.context - 1, (cfg.batch_size,), generator=gen)
        return self._windows(self.train_data, starts, device)

    def batches(self, n: int, device: Any, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` training batches, for calibration and saliency (never the validation split)."""
        gen = torch.Generator().manual_seed(seed)
        return [self.batch(gen, device) for _ in range(n)]

    def loss(self, model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())

    def _val_starts(self, n: int) -> torch.Tensor:
        last = len(self.val_data) - self.config.context - 1
        return torch.linspace(0, last, n).long()

    def _val_windows(self) -> int:
        """The windows evaluate() scores: val_tokens' worth, at most as many as the validation split holds without
        two scoring one byte. A 100 KB text's split (10,000 bytes) was scored as 512 windows of 64 bytes, each byte
        about 3 times, and dsnas route's report half shared 99.9% of its bytes with its calibration half."""
        context = self.config.context
        return max(1, min(self.config.val_tokens // context, (len(self.val_data) - 1) // context))

    @torch.no_grad()
    def evaluate(self, model: Any, device: Any) -> dict[str, float]:
        model.eval()
        n = self._val_windows()
        loss_sum, correct, count = 0.0, 0, 0
        for starts in self._val_starts(n).split(64):
            x, y = self._windows(self.val_data, starts, device)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            count += y.numel()
        loss = loss_sum / count
        return {"accuracy": correct / count, "val_loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def eval_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every validation window and its next-byte targets, in evaluate()'s order (for dsnas route)."""
        return self._windows(self.val_data, self._val_starts(self._val_windows()), torch.device("cpu"))

    def example_batch(self, batch_size: int, device: Any) -> torch.Tensor:
        return self._windows(self.val_data, self._val_starts(batch_size), device)[0]
