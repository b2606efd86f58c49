"""The cnn family and the images task: parameter counts and feature-map sizes by hand, a split that never overlaps,
folders in ImageFolder layout, and real learning on the bundled digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsnas.errors import Invalid, SpecError
from dsnas.kernels.conv import EngineConv2d
from dsnas.models import cnn
from dsnas.tasks.images import ImagesConfig, ImagesTask, shifted, split

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parent.parent
DIGITS = {"image_size": 16, "channels": 1, "n_classes": 10}


def _stage(depth: int, width: int, kernel: int = 3, expand: int = 1, **more: str) -> dict:
    return {"depth": depth, "width": width, "kernel": kernel, "expand": expand, **more}


def _arch(*stages: dict, stem: int = 8, **task: int) -> dict:
    return {"family": "cnn", "stem_width": stem, "layers": list(stages), **{**DIGITS, **task}}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_count_matches_a_count_by_hand():
    arch = _arch(_stage(1, 4), _stage(1, 8, expand=2), stem=4, n_classes=3)
    stem = 1 * 4 * 9 + 2 * 4  # 3x3 conv from 1 channel, BatchNorm weight + bias
    stage0 = (4 * 9 + 2 * 4) + (4 * 4 + 2 * 4)  # expand 1: depthwise 3x3 on 4, project 4 -> 4
    stage1 = (4 * 8 + 2 * 8) + (8 * 9 + 2 * 8) + (8 * 8 + 2 * 8)  # expand 4 -> 8, depthwise on 8, project 8 -> 8
    head = 8 * 3 + 3
    assert _params(cnn.build(arch)) == stem + stage0 + stage1 + head == 355


def test_output_shape_and_residuals_where_the_shape_is_kept():
    arch = _arch(_stage(2, 16, kernel=5, expand=4), _stage(1, 24, kernel=7), n_classes=7, channels=3)
    model = cnn.build(arch)
    assert model(torch.randn(5, 3, 16, 16)).shape == (5, 7)
    blocks = [b for stage in model.stages for b in stage]
    assert [b.residual for b in blocks] == [False, True, False]  # 8 -> 16, 16 -> 16 (stride 1), 16 -> 24
    assert all(isinstance(m, EngineConv2d) for b in blocks for m in b.modules() if isinstance(m, torch.nn.Conv2d))
    assert type(model.stem[0]) is torch.nn.Conv2d  # the stem stays a plain fp32 convolution


def test_stages_after_the_first_halve_the_map_while_it_is_larger_than_4():
    arch = _arch(_stage(1, 8), _stage(2, 8), _stage(1, 16), _stage(1, 16))
    assert cnn.strides(arch) == [1, 2, 2, 1]
    model = cnn.build(arch)
    sizes, x = [], model.stem(torch.randn(2, 1, 16, 16))
    for stage in model.stages:
        x = stage(x)
        sizes.append(x.shape[-1])
    assert sizes == [16, 8, 4, 4]
    assert cnn.build({**arch, "image_size": 9}).features(torch.randn(1, 1, 9, 9)).shape[-1] == 3  # 9 -> 5 -> 3


@pytest.mark.parametrize(("change", "key"), [
    (lambda a: a.pop("n_classes"), "n_classes"),
    (lambda a: a.update(stem_width=0), "stem_width"),
    (lambda a: a.update(layers=[]), "layers"),
    (lambda a: a["layers"][1].update(kernel=4), "layers[1].kernel"),
    (lambda a: a["layers"][0].update(precision="int8"), "layers[0].precision"),
    (lambda a: a["layers"][1].update(expand=0), "layers[1].expand"),
    (lambda a: a["layers"][0].pop("width"), "layers[0]"),
    (lambda a: a["layers"][0].update(n_heads=2), "layers[0]"),
])
def test_validate_names_the_key_of_a_bad_arch(change, key):
    arch = _arch(_stage(1, 8), _stage(2, 16))
    cnn.validate(arch)
    change(arch)
    with pytest.raises(Invalid) as e:
        cnn.validate(arch)
    assert e.value.key == key


def test_a_space_offering_int8_or_sparsity_to_convolutions_is_refused():
    cnn.check_choices({"precision": ("fp32", "bf16"), "sparsity": ("dense",)})
    for options in ({"precision": ("fp32", "int8")}, {"sparsity": ("dense", "2:4")}):
        with pytest.raises(Invalid, match="convolution"):
            cnn.check_choices(options)


def test_describe_shows_precision_only_when_a_stage_differs_from_fp32():
    stages = [_stage(1, 16), _stage(2, 24, kernel=5, expand=4), _stage(2, 32, expand=6)]
    assert cnn.describe(_arch(*stages, stem=16)) == "stem16 s3 d1,2,2 w16,24,32 k3,5,3 e1,4,6"
    stages[1]["precision"] = "bf16"
    assert cnn.describe(_arch(*stages, stem=16)).endswith(" e1,4,6 pfp32,bf16,fp32")


def test_split_is_stratified_disjoint_and_seeded():
    labels = torch.arange(10).repeat_interleave(torch.tensor([5, 10, 20, 5, 5, 5, 5, 5, 5, 35]))
    train, held = split(labels, 0.2, seed=0)
    assert set(train.tolist()).isdisjoint(held.tolist()) and len(train) + len(held) == len(labels)
    assert torch.bincount(labels[held]).tolist() == [1, 2, 4, 1, 1, 1, 1, 1, 1, 7]
    assert torch.equal(held, split(labels, 0.2, seed=0)[1]) and not torch.equal(held, split(labels, 0.2, seed=1)[1])


def test_shifts_move_each_image_by_at_most_the_limit():
    x = torch.zeros(64, 1, 9, 9)
    x[:, :, 4, 4] = 1.0
    out = shifted(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out.sum(dim=(1, 2, 3)), torch.ones(64))
    where = out[:, 0].flatten(1).argmax(1)
    rows, cols = where // 9, where % 9
    assert rows.min() == cols.min() == 2 and rows.max() == cols.max() == 6  # 64 draws reach both ends


def test_config_rejects_bad_values_by_name():
    for key, value in (("val_share", 1.0), ("image_size", 2), ("shift", 8), ("train_images", 0), ("lr", 0.0)):
        with pytest.raises(Invalid) as e:
            ImagesConfig(**{key: value})
        assert e.value.key == key


def test_digits_load_split_and_normalise():
    pytest.importorskip("sklearn")
    task = ImagesTask(ImagesConfig(), ".")
    assert len(task.labels) == 1797 and task.arch_defaults() == DIGITS
    assert task.images.shape == (1797, 1, 16, 16)
    assert set(task.train_idx.tolist()).isdisjoint(task.val_idx.tolist())
    assert len(task.train_idx) + len(task.val_idx) == 1797 and 350 <= len(task.val_idx) <= 370
    train = task.images[task.train_idx]
    assert abs(train.mean().item()) < 1e-4 and abs(train.std().item() - 1) < 1e-3  # training split's statistics
    again = ImagesTask(ImagesConfig(), ".")
    assert torch.equal(again.val_idx, task.val_idx) and again.fingerprint() == task.fingerprint()
    reseeded = ImagesTask(ImagesConfig(seed=1), ".")
    assert reseeded.sha256 == task.sha256 and not torch.equal(reseeded.val_idx, task.val_idx)
    batch = task.example_batch(4, CPU)
    assert torch.equal(batch, task.images[task.val_idx[:4]]) and torch.equal(batch, task.example_batch(4, CPU))
    x, y = task.batches(2, CPU, seed=3)[1]
    assert x.shape == (64, 1, 16, 16) and torch.equal(y, task.batches(2, CPU, seed=3)[1][1])


def test_training_on_the_digits_learns_and_reports_at_each_rung():
    pytest.importorskip("sklearn")
    task = ImagesTask(ImagesConfig(batch_size=64, train_images=64 * 60), ".")
    torch.manual_seed(0)
    model = cnn.build(_arch(_stage(1, 16), _stage(1, 24, expand=4), **task.arch_defaults()))
    before = task.evaluate(model, CPU)
    steps, seen = [], []
    out = task.train(model, CPU, seed=0, checkpoint=lambda: steps.append(1), rungs=(0.5,),
                     at_rung=lambda k: seen.append((k, len(steps))))
    after = task.evaluate(model, CPU)
    assert out["train_steps"] == 60 == len(steps) and out["train_images"] == 64 * 60 and seen == [(0, 30)]
    assert before["accuracy"] < 0.25 and after["accuracy"] > 0.6  # chance is 0.1
    assert after["val_loss"] < before["val_loss"] - 1.0


def test_a_short_training_evaluates_with_the_batch_norm_statistics_of_its_weights():
    pytest.importorskip("sklearn")
    import copy

    # 20 steps left BatchNorm's moving averages holding 0.9**20 = 12% of their start (variance 1, where these
    # activations vary by 0.01-0.05), and lagging weights that changed at every step: the model scored 0.13 in eval
    # mode and 0.47 with its batch statistics; at a rung too.
    task = ImagesTask(ImagesConfig(batch_size=64, train_images=64 * 20), ".")
    torch.manual_seed(0)
    model = cnn.build(_arch(_stage(1, 16, expand=4), _stage(1, 16, expand=4), **task.arch_defaults()))
    x, y = task.eval_inputs()

    def gaps() -> tuple[float, float]:  # (accuracy in eval mode, its gap to the batch statistics' accuracy)
        scored = task.evaluate(model, CPU)["accuracy"]
        batch_stats = copy.deepcopy(model).train()
        with torch.no_grad():
            return scored, abs(scored - (batch_stats(x).argmax(-1) == y).float().mean().item())

    at_rung = []
    task.train(model, CPU, seed=0, checkpoint=lambda: None, rungs=(0.5,),
               at_rung=lambda k: (at_rung.append(gaps()), model.train()))
    (rung_accuracy, rung_gap), (accuracy, gap) = at_rung[0], gaps()
    assert rung_gap < 0.05 and gap < 0.05, (at_rung, accuracy, gap)
    assert accuracy > 0.3 and rung_accuracy > 0.25  # chance is 0.1
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.momentum == 0.1 for m in norms)  # training's own momentum is left as it was


def test_a_bf16_stage_computes_close_to_fp32_and_trains():
    pytest.importorskip("sklearn")
    stages = [_stage(1, 16, expand=4), _stage(1, 24, kernel=5, expand=4)]
    torch.manual_seed(0)
    fp32 = cnn.build(_arch(*stages)).eval()
    bf16 = cnn.build(_arch(stages[0], {**stages[1], "precision": "bf16"})).eval()
    bf16.load_state_dict(fp32.state_dict())  # the same weights: precision adds no state
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        ref, low = fp32(x), bf16(x)
    assert not torch.equal(ref, low)  # bf16 did run
    assert torch.allclose(low, ref, atol=0.05 * ref.abs().max().item())
    task = ImagesTask(ImagesConfig(batch_size=32, train_images=32 * 8), ".")
    out = task.train(bf16, CPU, seed=0, checkpoint=lambda: None)
    assert out["train_steps"] == 8 and out["skipped_steps"] == 0
    assert 0.0 < task.evaluate(bf16, CPU)["val_loss"] < 10.0


def _write_folder(root: Path, mode: str, sizes: tuple[int, ...] = (6, 7, 5)) -> None:
    from PIL import Image

    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i, size in enumerate(sizes):
            colour = (40 + 100 * c, 20 * i, 200) if mode == "RGB" else 40 + 100 * c + 20 * i
            Image.new(mode, (size, size), colour).save(root / name / f"{i}.png")
    (root / "notes.txt").write_text("not an image, not a class")


@pytest.mark.parametrize(("mode", "channels"), [("RGB", 3), ("L", 1)])
def test_an_image_folder_loads_with_its_classes_and_channels(tmp_path, mode, channels):
    pytest.importorskip("PIL")
    _write_folder(tmp_path / "pets", mode)
    config = ImagesConfig(dataset="pets", image_size=8, val_share=0.34)
    task = ImagesTask(config, str(tmp_path))
    assert task.arch_defaults() == {"image_size": 8, "channels": channels, "n_classes": 2}
    assert task.images.shape == (6, channels, 8, 8) and task.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(task.val_idx) == 2 and sorted(task.labels[task.val_idx].tolist()) == [0, 1]
    batch = task.example_batch(5, CPU)  # more than the 2 held-out images: repeated in order
    assert torch.equal(batch[0], batch[2]) and torch.equal(batch[1], batch[3])
    assert task.fingerprint()["dataset_sha256"] == ImagesTask(config, str(tmp_path)).fingerprint()["dataset_sha256"]
    model = cnn.build(_arch(_stage(1, 8), **task.arch_defaults()))
    assert model(batch).shape == (5, 2)
    # A folder without images (it sorts first) takes no class number: it shifted every class and added one.
    (tmp_path / "pets" / "checkpoints").mkdir()
    (tmp_path / "pets" / "checkpoints" / "notes.txt").write_text("no image")
    again = ImagesTask(config, str(tmp_path))
    assert again.n_classes == 2 and again.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # What an input must be, for an exported bundle: the training split's statistics, per channel, and the classes.
    pre = again.preprocessing()
    assert pre["classes"] == ["cat", "dog"] and len(pre["mean"]) == len(pre["std"]) == channels
    raw = again.images * torch.tensor(pre["std"]).view(1, -1, 1, 1) + torch.tensor(pre["mean"]).view(1, -1, 1, 1)
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6  # undone, the pixels are the [0, 1] ones


def test_images_in_a_class_folders_sub_folders_are_read_as_that_class(tmp_path):
    """As torchvision's ImageFolder reads them: images sorted into dog/batch1/ were dropped without a word, and a
    class whose images were all in a sub-folder (zebra/2019/) with them. Hidden folders stay out."""
    pytest.importorskip("PIL")
    from PIL import Image

    _write_folder(tmp_path / "pets", "RGB")
    for folder in (tmp_path / "pets" / "dog" / "batch1", tmp_path / "pets" / "zebra" / "2019",
                   tmp_path / "pets" / "cat" / ".ipynb_checkpoints"):
        folder.mkdir(parents=True)
        Image.new("RGB", (6, 6), (1, 2, 3)).save(folder / "x.png")
    task = ImagesTask(ImagesConfig(dataset="pets", image_size=8, val_share=0.34), str(tmp_path))
    assert task.n_classes == 3 and task.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    assert task.read_otherwise == 2  # what a dsnas before read otherwise: the two images in sub-folders


def test_a_16_bit_image_loads_as_its_8_bit_copy_does(tmp_path):
    """convert("L") clipped 16-bit pixels at 255: every image of a 16-bit folder was white, and the search ran at
    chance accuracy without a word."""
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image

    from dsnas.tasks.images import load_folder

    rng = np.random.default_rng(0)
    for name, (low, high) in (("bright", (35000, 65000)), ("dark", (500, 25000))):
        for i in range(3):
            pixels = rng.integers(low, high, (8, 8)).astype(np.uint16)
            for bits, picture in ((16, Image.fromarray(pixels)), (8, Image.fromarray((pixels >> 8).astype(np.uint8)))):
                (tmp_path / str(bits) / name).mkdir(parents=True, exist_ok=True)
                picture.save(tmp_path / str(bits) / name / f"{i}.png")
    deep, _, _ = load_folder(tmp_path / "16", 8)
    shallow, labels, _ = load_folder(tmp_path / "8", 8)
    assert deep.shape == shallow.shape == (6, 1, 8, 8) and deep.dtype == shallow.dtype == torch.float32
    assert len(deep.unique()) > 300  # not all white: 16 bits of levels, where 8 bits keep at most 256
    # The same images up to their low 8 bits (one 8-bit level, 1/255), class by class.
    assert (deep - shallow).abs().max() < 1.01 / 255
    assert deep[labels == 0].mean() > 0.5 > deep[labels == 1].mean()


def test_a_missing_or_classless_folder_is_a_spec_error_naming_task_dataset(tmp_path):
    with pytest.raises(SpecError, match=r"\[task.dataset\].*existing folder") as e:
        ImagesConfig(dataset="no_such_folder").resolve_dataset(str(tmp_path), "study.toml")
    assert e.value.where == "study.toml" and e.value.key == "task.dataset"
    (tmp_path / "one" / "only").mkdir(parents=True)
    (tmp_path / "one" / "only" / "a.png").write_bytes(b"")
    with pytest.raises(SpecError, match="at least two class sub-folders"):
        ImagesConfig(dataset="one").resolve_dataset(str(tmp_path))


def test_an_exported_cnn_records_its_input_and_a_bf16_stage_writes_a_valid_onnx(tmp_path):
    """The bundle held no normalisation (the model scored 10% on the [0, 1] images a user has, 99% on the task's)
    nor class names; and a bf16 stage's model.onnx was written at an opset whose Conv takes no bfloat16."""
    pytest.importorskip("sklearn")
    import json

    import onnx

    from dsnas.cli import main

    space = tmp_path / "space.toml"
    space.write_text('family = "cnn"\n[choices]\nstem_width = 8\nn_layers = 1\n'
                     '[per_layer]\ndepth = 1\nwidth = 16\nkernel = 3\nexpand = 1\nprecision = "bf16"\n')
    study = tmp_path / "images.toml"
    study.write_text((REPO / "studies" / "images.toml").read_text()
                     .replace("../search_spaces/cnn.toml", str(space)).replace("n_trials = 12", "n_trials = 1")
                     .replace("train_images = 12_000", "train_images = 512").replace('kind = "ray"', 'kind = "local"'))
    assert main(["search", str(study)]) == 0
    assert main(["export", str(study), "--trial", "0", "--out", str(tmp_path / "b")]) == 0
    pre = json.loads((tmp_path / "b" / "arch.json").read_text())["task"]["preprocessing"]
    assert pre["classes"] == [str(i) for i in range(10)] and len(pre["mean"]) == 1
    card = (tmp_path / "b" / "README.md").read_text()
    assert "## Its input" in card and "then per channel (x - mean) / std (mean [" in card
    onnx.checker.check_model(str(tmp_path / "b" / "model.onnx"), full_check=True)
