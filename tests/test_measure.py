"""The profiler in a study: every trial stores a full profile and its measurement rows; the measurement cache
reuses what the same architecture measured on the same device; `dsnas doctor` and `dsnas profile`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsnas.cli import main

ONE_ARCH_SPACE = """
family = "transformer_lm"
[choices]
n_layers = [1]
d_model = [16]
[per_layer]
n_heads = [2]
ffn_ratio = [1]
"""


def test_every_trial_stores_a_full_profile_and_its_measurement_rows(finished_study):
    from dsnas import tables
    from dsnas.spec import load_study
    from dsnas.storage import storage_engine
    from dsnas.study import open_study

    study = open_study(load_study(finished_study), create=False)
    rows = tables.measurements(study)
    for trial in study.trials:
        attrs, profile = trial.user_attrs, trial.user_attrs["profile"]
        assert {"gflop_s", "gb_s", "flops_per_token", "peak_memory_mb"} <= set(attrs)
        if "disturbed" not in profile["ceilings"]["details"]:  # (else no share is taken: see test_ceilings.py)
            assert 0 < attrs["flop_util"] < 5  # of the GEMM ceiling this machine measured (tiny models: low)
            assert "bw_util" in attrs
        else:  # ceilings measured while others took the CPUs: each share unavailable, with why (a busy machine)
            assert {"flop_util", "bw_util"} <= set(profile["unavailable"]), profile["unavailable"]
        assert profile["ceilings"]["gemm_gflop_s"] > 0 and profile["fingerprint"]["cpu_features"] is not None
        for stats in profile["batches"].values():
            assert stats["p10_ms"] <= stats["p25_ms"] <= stats["median_ms"] <= stats["p75_ms"] <= stats["p90_ms"]
            assert stats["repeats"] >= 10 and stats["ci_rel"] >= 0 and stats["flops"] > 0 and stats["bytes"] > 0
        mine = rows[rows["trial_number"] == trial.number]
        assert list(mine["batch_size"]) == [1, 4]
        assert set(mine["arch_hash"]) == {tables.arch_hash(attrs["arch"])}
    cached = tables.cached_figures(storage_engine(study), study.trials[0].user_attrs["arch"])
    assert len(cached) == 1 and set(next(iter(cached.values()))["batches"]) == {"1", "4"}


def test_a_cache_entry_is_labelled_as_the_measurement_it_holds(finished_study, tmp_path):
    """A later measurement of the same architecture (another study, another thread count) gave the entry its
    figures but kept the first one's labels: a 1-thread measurement was reused as a 2-thread one (profile, card, the
    ONNX check's timing). Then the last row's labels stood for every batch size: study v's 2-thread batch 1 named
    the 1-thread batch 4 study z had measured, when only batch 4 was reused. Each batch size has its own."""
    from dsnas import tables
    from dsnas.profiler.measure import _reuse
    from dsnas.spec import HardwareSpec, load_study
    from dsnas.storage import storage_engine
    from dsnas.study import open_study
    from tests.conftest import copy_study

    study = open_study(load_study(copy_study(finished_study, tmp_path / "s")), create=False)
    trial, engine = study.trials[0], storage_engine(study)
    profile = trial.user_attrs["profile"]
    metrics = {k: v for k, v in trial.user_attrs.items() if isinstance(v, float)}
    threads = profile["threads"]
    tables.record_measurements(engine, "z", 3, profile, metrics, arch=trial.user_attrs["arch"])
    only_1 = {**profile, "threads": threads + 1, "batches": {"1": profile["batches"]["1"]}}
    tables.record_measurements(engine, "v", 9, only_1, {k: v for k, v in metrics.items() if not k.endswith("_bs4")},
                               arch=trial.user_attrs["arch"])
    entry = next(iter(tables.cached_figures(engine, trial.user_attrs["arch"]).values()))
    assert entry["batches"]["1"]["source"] == "study v trial 9"
    assert entry["batches"]["1"]["profile"]["threads"] == threads + 1
    assert entry["batches"]["4"]["source"] == "study z trial 3" and entry["batches"]["4"]["profile"]["threads"] == threads
    _, reused = _reuse(entry, profile["fingerprint"], 1.0, HardwareSpec(batch_sizes=(4,)))
    assert reused["threads"] == threads and reused["cache"]["from"] == "study z trial 3"
    _, reused = _reuse(entry, profile["fingerprint"], 1.0, HardwareSpec(batch_sizes=(1, 4)))
    assert reused["cache"]["from"] == "study v trial 9; study z trial 3"


def check_reused_sources_are_stored(finished: Path, url: str) -> None:
    """A reuse of batch sizes two trials measured, stored: each row names its own batch's trial. The two names
    joined (``cache.from``) overflowed PostgreSQL's column of 256 characters for studies of 100-character names
    ("value too long for type character varying(256)") after the trial was told COMPLETE."""
    import sqlalchemy as sa

    from dsnas import tables
    from dsnas.profiler.measure import _reuse
    from dsnas.spec import HardwareSpec, load_study
    from dsnas.study import open_study

    trial = open_study(load_study(finished), create=False).trials[0]
    profile, arch = trial.user_attrs["profile"], trial.user_attrs["arch"]
    metrics = {k: v for k, v in trial.user_attrs.items() if isinstance(v, float)}
    engine = sa.create_engine(url)
    tables.ensure_schema(engine, url)
    z, v = "z" * 120, "v" * 120
    tables.record_measurements(engine, z, 3, profile, metrics, arch=arch)
    only_1 = {**profile, "threads": (profile["threads"] or 1) + 1, "batches": {"1": profile["batches"]["1"]}}
    tables.record_measurements(engine, v, 9, only_1, metrics, arch=arch)
    entry = next(iter(tables.cached_figures(engine, arch).values()))
    _, reused = _reuse(entry, profile["fingerprint"], 1.0, HardwareSpec(batch_sizes=(1, 4)))
    assert len(reused["cache"]["from"]) > 256
    tables.record_measurements(engine, "w", 0, reused, metrics, arch=arch)
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT batch_size, cached_from FROM dsnas_measurements WHERE "
                                          "study_name = 'w' ORDER BY batch_size")).all()
    engine.dispose()
    assert [tuple(row) for row in rows] == [(1, f"study {v} trial 9"), (4, f"study {z} trial 3")]


def test_a_reuse_of_two_trials_measurements_names_each_batchs_own(finished_study, tmp_path):
    check_reused_sources_are_stored(finished_study, f"sqlite:///{tmp_path / 'm.db'}")


def test_the_same_architecture_on_the_same_device_is_measured_once(tiny_study, monkeypatch, steady_host):
    import importlib

    from dsnas.spec import load_study
    from dsnas.study import open_study

    (tiny_study.parent / "tiny_space.toml").write_text(ONE_ARCH_SPACE)  # every trial: the same architecture
    # Trained again (a second seed), not answered from the first trial: the measurement cache is what is tested.
    tiny_study.write_text(tiny_study.read_text().replace("[budget]\n", '[budget]\nrepeats = "retrain"\n'))
    measure_module = importlib.import_module("dsnas.profiler.measure")  # the module, not the function
    measured = []
    real = measure_module._measure_batch
    monkeypatch.setattr(measure_module, "_measure_batch", lambda *a, **k: measured.append(1) or real(*a, **k))
    assert main(["search", str(tiny_study), "--n-trials", "2"]) == 0
    study = open_study(load_study(tiny_study), create=False)
    first, second = sorted(study.trials, key=lambda t: t.number)
    assert first.user_attrs["profile"]["cache"] == {"hit": False}
    if first.user_attrs["profile"]["disturbed"]:  # a process a test before left behind took the CPUs: not cached
        assert len(measured) == 4 and "(disturbed)" in second.user_attrs["profile"]["cache"]["why"]
        return
    assert len(measured) == 2, second.user_attrs["profile"]["cache"]  # two batch sizes, once
    source = f"study tiny trial {first.number}"
    assert second.user_attrs["profile"]["cache"] == {"hit": True, "from": source,
                                                     "from_by_batch": {"1": source, "4": source}}
    assert second.user_attrs["latency_ms"] == first.user_attrs["latency_ms"]


def test_doctor_prints_the_capabilities_and_the_fingerprint(capsys):
    assert main(["doctor", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["capability", "available", "detail"]
    cuda = next(line for line in out.splitlines() if line.startswith("CUDA "))
    assert " no " in cuda  # this machine has no GPU, and says why
    assert "fingerprint " in out and "cpu_features=" in out
    host = next(line for line in out.splitlines() if line.startswith("host speed "))  # the last row: steady or not
    assert "probes over 1 s of a 256^3 fp32 GEMM" in host and ("unsteady" in host) == (" no " in host)


@pytest.mark.parametrize("args, message", [
    (["doctor", "--device", "cuda:7"], "--device cuda:7: "),
    (["doctor", "--engine", "nosuch.toml"], "nosuch.toml"),
])
def test_doctor_refuses_bad_input_before_probing_anything(args, message, capsys, tmp_path, monkeypatch):
    """The capability table and seconds of the host-speed probe came first, the error after them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("dsnas.profiler.capabilities.probe", lambda device: pytest.fail("probed first"))
    assert main(args) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and message in printed.err and printed.err.count("\n") == 1


def test_profile_of_an_architecture_file_prints_every_batch_size(tmp_path, capsys):
    arch = {"family": "transformer_lm", "d_model": 16, "vocab_size": 256, "context": 16,
            "layers": [{"n_heads": 2, "ffn_ratio": 1}]}
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(arch))
    assert main(["profile", str(path), "--batch-sizes", "1,2", "--measure-s", "0.02", "--max-measure-s", "0.1",
                 "--kernels"]) == 0
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines() if line.strip().startswith(("1 ", "2 "))]
    assert [row[0] for row in table] == ["1", "2"]
    assert "top cpu operators at batch 1" in out and "aten::" in out
    assert "untrained weights" in out


def test_profile_of_a_study_trial(finished_study, capsys):
    assert main(["profile", str(finished_study), "--trial", "0", "--measure-s", "0.02", "--max-measure-s", "0.1"]) == 0
    assert "study 'tiny' trial 0" in capsys.readouterr().out
    # --trial names a study's trial: beside a bundle folder or an architecture file it was ignored without a word
    arch = finished_study.parent / "arch.json"
    arch.write_text('{"family": "transformer_lm"}', encoding="utf-8")
    assert main(["profile", str(arch), "--trial", "0"]) == 2
    assert capsys.readouterr().err.strip() == (f"dsnas: error: --trial 0: names a trial of a study file, and {arch} "
                                               "is an architecture file: its own model is measured. Fix: leave "
                                               "out --trial, or give the study file")


def test_profile_of_a_study_trial_measures_it_as_searched_where_the_file_was_edited(finished_study, tmp_path, capsys):
    """An edited context fed the trial's model positions it has no embedding for (IndexError, a traceback), and
    edited batch sizes timed others than the figures the trial stored."""
    from conftest import copy_study

    study = copy_study(finished_study, tmp_path / "copy")
    study.write_text(study.read_text().replace("context = 16", "context = 32").replace("batch_sizes = [1, 4]",
                                                                                        "batch_sizes = [1, 2]"))
    assert main(["profile", str(study), "--trial", "0", "--measure-s", "0.02", "--max-measure-s", "0.1"]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:2] in ("1 ", "2 ", "4 ")]
    assert [row[0] for row in table] == ["1", "4"]  # the trial's batch sizes
    assert float(table[0][5].replace(",", "")) > 0  # tokens/s of its own context


def test_profile_of_a_study_trial_measures_the_form_the_trial_measured(tmp_path):
    """A trial's INT8 backends and its "auto" layers the Hessian left dense were chosen then: built with the
    defaults, a torch-dynamic trial was timed in int8-static (its bytes 1.6x the trial's) and every "auto" layer
    in 2:4, printed as that trial's profile."""
    import optuna
    from conftest import TINY_STUDY

    from dsnas.kernels.convert import inference_signature
    from dsnas.profile import load_target
    from dsnas.spec import load_study
    from dsnas.study import open_study

    space = ONE_ARCH_SPACE + 'precision = ["int8"]\nsparsity = ["auto"]\n'
    (tmp_path / "space.toml").write_text(space, encoding="utf-8")
    study_file = tmp_path / "s.toml"
    study_file.write_text(TINY_STUDY.format(space=tmp_path / "space.toml"), encoding="utf-8")
    arch = {"family": "transformer_lm", "vocab_size": 256, "context": 16, "d_model": 16,
            "layers": [{"n_heads": 2, "ffn_ratio": 1, "precision": "int8", "sparsity": "auto"}]}
    patterns = {"qkv": "2:4", "proj": "dense", "up": "2:4", "down": "dense"}  # half of them, as the Hessian left it
    layers = {f"blocks.0.{n}": f"int8 {p} int8:torch-dynamic" for n, p in patterns.items()}
    profile = {"signature": {"compiled": False, "layers": layers},
               "engine": {"layers": {name: {"backend": "int8:torch-dynamic"} for name in layers}}}
    study = open_study(load_study(study_file))
    study.add_trial(optuna.trial.create_trial(values=[0.5, 1000.0], user_attrs={"arch": arch, "profile": profile}))

    model = load_target(str(study_file), 0)[0]
    assert inference_signature(model)["layers"] == layers
    # A reused repeat records no profile of its own: it is measured in its original's form.
    study.add_trial(optuna.trial.create_trial(values=[0.5, 1000.0], user_attrs={"arch": arch, "reused_from": 0}))
    assert inference_signature(load_target(str(study_file), 1)[0])["layers"] == layers
    # One measured under torch.compile ([engine] compile = true) is timed compiled, as its bundle is.
    compiled = {**profile, "signature": {**profile["signature"], "compiled": True}}
    study.add_trial(optuna.trial.create_trial(values=[0.5, 1000.0], user_attrs={"arch": arch, "profile": compiled}))
    model, _, _, what = load_target(str(study_file), 2)
    assert inference_signature(model) == compiled["signature"] and "under torch.compile" in what


@pytest.mark.parametrize("args, message", [
    (["profile", "missing.json"], "missing.json: no such file"),
    (["profile", "--batch-sizes", "1,x", "a.json"], "--batch-sizes 1,x: must be whole numbers"),
])
def test_profile_errors_are_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.gpu
def test_measure_on_a_gpu_records_device_time_graphs_the_window_and_kernels():
    import torch

    from dsnas.models import build
    from dsnas.profiler import measure
    from dsnas.spec import HardwareSpec, TaskSpec
    from dsnas.tasks import make_task

    task = make_task(TaskSpec("charlm", {"corpus_bytes": 200_000, "context": 64}, "."))
    model = build({"family": "transformer_lm", "d_model": 256, "layers": [{"n_heads": 4, "ffn_ratio": 4}] * 2,
                   **task.arch_defaults()}).cuda()
    hardware = HardwareSpec(device="cuda", batch_sizes=(1, 64), steady_s=1.0, cuda_graphs=True, kernels=True)
    metrics, profile = measure(model, task, torch.device("cuda"), hardware)
    for bs in ("1", "64"):
        stats = profile["batches"][bs]
        assert 0 < stats["device_median_ms"] <= stats["median_ms"] * 1.05  # device time within wall time
        assert stats["graph_latency_ms"] > 0
        assert profile["kernels"][bs]["count"] > 0  # CUPTI saw kernels
    # Every window figure is either measured or unavailable with a reason, never silently missing.
    for name in ("energy_per_call_j", "power_w", "sm_util", "dram_bw_util"):
        assert name in metrics or any(name in k for k in profile["unavailable"]), name
    assert profile["ceilings"]["memory_gb_s"] is None or metrics["bw_util"] < 1.5


def test_a_matrix_op_without_a_flop_formula_is_named_in_the_profile_not_hidden():
    import torch

    from dsnas.profiler import counting, measure
    from dsnas.spec import HardwareSpec

    class MvModel(torch.nn.Module):  # torch.mv: a matrix op torch's counter has no formula for
        def forward(self, x):
            return torch.mv(x[0].float().expand(4, -1).contiguous(), torch.ones(x.shape[1]))

    class Task:
        tokens_per_example = 4

        def example_batch(self, bs, device):
            return torch.ones(bs, 4)

    metrics, profile = measure(MvModel(), Task(), torch.device("cpu"),
                               HardwareSpec(device="cpu", batch_sizes=(1,), warmup_s=0.01, measure_s=0.02))
    assert profile["unavailable"]["flops of"] == "aten.mv"
    assert counting.count_work(lambda: torch.mv(torch.ones(3, 3), torch.ones(3))).uncounted == ("aten.mv",)
    # Fused ops a user's model runs in eval mode under inference mode, counted as nothing without a word before:
    # nn.TransformerEncoder's layers (40,960 FLOPs counted of 7e9) and nn.Bilinear.
    layer = torch.nn.TransformerEncoderLayer(32, 2, 64, batch_first=True).eval()
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    bilinear = torch.nn.Bilinear(8, 8, 4).eval()
    with torch.inference_mode():
        fused = counting.count_work(lambda: encoder(torch.randn(2, 16, 32))).uncounted
        both = counting.count_work(lambda: bilinear(torch.randn(2, 8), torch.randn(2, 8))).uncounted
    assert "aten._transformer_encoder_layer_fwd" in fused and "aten._trilinear" in both


@pytest.mark.parametrize("disturbed", [True, False])
def test_a_cpu_measurement_whose_host_was_not_probed_says_so(monkeypatch, disturbed):
    """Ceilings measured under others' load keep no host-speed reference, and the host was then not probed: the
    profile showed host_slowdown null with no reason, its disturbed read from others' CPU share alone."""
    import importlib

    import torch

    from dsnas.profiler.ceilings import Ceilings
    from dsnas.spec import HardwareSpec

    measure_module = importlib.import_module("dsnas.profiler.measure")  # the package's `measure` is the function
    why = "others took 75% of the CPUs while they were measured"
    found = Ceilings(100.0, 10.0, 1, 0.1, {"disturbed": why} if disturbed else {}, 0.2)
    monkeypatch.setattr(measure_module, "ceilings", lambda fp, threads: found)
    monkeypatch.setattr(measure_module.host_speed, "slowdown", lambda reference: 1.0)

    class Task:
        def example_batch(self, bs, device):
            return torch.ones(bs, 4)

    _, profile = measure_module.measure(torch.nn.Linear(4, 4), Task(), torch.device("cpu"),
                                        HardwareSpec(device="cpu", batch_sizes=(1,), warmup_s=0.01, measure_s=0.02))
    record = profile["batches"]["1"]["disturbance"]
    if disturbed:
        assert all(a["host_slowdown"] is None for a in record["attempts"])
        assert profile["unavailable"]["host_slowdown"] == (f"not probed: the CPU ceilings were not measured "
                                                           f"undisturbed ({why}), and no host-speed reference is kept "
                                                           "from them; disturbed reads others' CPU share alone")
    else:
        assert all(a["host_slowdown"] == 1.0 for a in record["attempts"])
        assert "host_slowdown" not in profile["unavailable"]


@pytest.mark.parametrize("argv", [["doctor", "--device", "{device}"], ["profile", "{arch}", "--device", "{device}"]])
@pytest.mark.parametrize("device, said", [("gpu", "must be auto, cpu, cuda or cuda:N. Fix: e.g. --device auto"),
                                          ("cuda:x", "must be auto, cpu, cuda or cuda:N")])
def test_a_device_that_is_none_is_one_line_before_any_work(tmp_path, capsys, argv, device, said):
    """`--device gpu` measured on the CPU without a word; `--device cuda` on a machine without one was a traceback."""
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps({"family": "transformer_lm", "d_model": 16, "vocab_size": 256, "context": 8,
                                "layers": [{"n_heads": 2, "ffn_ratio": 2}]}))
    assert main([a.format(device=device, arch=arch) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dsnas: error: --device {device}: {said}") and err.count("\n") == 1, err


def test_a_cuda_device_where_there_is_none_and_a_mistyped_keyword_are_one_line():
    import torch

    import dsnas

    model = torch.nn.Linear(4, 4)
    if not torch.cuda.is_available():
        assert main(["doctor", "--device", "cuda"]) == 2
        with pytest.raises(dsnas.DsnasError, match=r"^device='cuda': this machine has no visible NVIDIA GPU. Fix: use "
                                                   r"device='cpu'$"):
            dsnas.measure(model, torch.randn(2, 4), device="cuda")
    report = dsnas.measure(model, torch.randn(2, 4), device=torch.device("cpu"), batch_sizes=(1,), measure_s=0.02,
                           max_measure_s=0.2)  # a torch.device, as torch's own calls take
    assert report.profile["fingerprint"]["device"] == "cpu"
    with pytest.raises(dsnas.DsnasError, match=r"^dsnas.measure takes no keyword 'measure_ss'. Fix: use the "
                                               r"\[hardware\] keys threads, warmup_s, measure_s"):
        dsnas.measure(model, torch.randn(2, 4), device="cpu", measure_ss=1)
    with pytest.raises(dsnas.DsnasError, match=r"^dsnas.measure batch_sizes=8: must be a list of batch sizes. Fix: "
                                               r"e.g. batch_sizes=\[8\]$"):
        dsnas.measure(model, torch.randn(2, 4), device="cpu", batch_sizes=8)


@pytest.mark.parametrize("keyword, said", [
    ({"threads": "2"}, "dsnas.measure threads: must be of type int, but got '2'. Fix: e.g. threads=2"),
    ({"threads": 2.0}, "dsnas.measure threads: must be of type int, but got 2.0. Fix: e.g. threads=2"),
    ({"measure_s": "0.3"}, "dsnas.measure measure_s: must be of type float, but got '0.3'. Fix: e.g. measure_s=0.3"),
    ({"kernels": "no"}, "dsnas.measure kernels: must be of type bool, but got 'no'. Fix: e.g. kernels=True"),
    ({"items_per_example": "4"}, "dsnas.measure items_per_example: must be a number >= 1, but got '4'. Fix: e.g. "
                                 "items_per_example=128 (the tokens of a sequence), or leave it out (1)"),
])
def test_a_measure_keyword_of_the_wrong_type_is_one_line_before_any_work(keyword, said, monkeypatch):
    """threads="2" and measure_s="0.3" were TypeError tracebacks from a comparison, threads=2.0 torch's
    set_num_threads traceback, and kernels="no" was taken as true: each is said as the study file's loader says it."""
    import torch

    import dsnas
    from dsnas import profile

    monkeypatch.setattr(profile, "measure", lambda *a: pytest.fail("measured"))
    with pytest.raises(dsnas.DsnasError) as raised:
        dsnas.measure(torch.nn.Linear(4, 4), torch.randn(2, 4), device="cpu", **keyword)
    assert str(raised.value) == said


def test_a_numpy_count_is_taken_as_the_number_it_is(monkeypatch):
    import numpy as np
    import torch

    import dsnas
    from dsnas import profile

    seen = []
    monkeypatch.setattr(profile, "measure", lambda model, task, dev, hw: seen.append(hw) or ({"params": 20.0}, {}))
    dsnas.measure(torch.nn.Linear(4, 4), torch.randn(2, 4), device="cpu", threads=np.int64(1))
    assert seen[0].threads == 1 and type(seen[0].threads) is int


def test_on_a_second_gpu_the_cuda_events_time_its_own_stream(monkeypatch):
    """torch records a CUDA event on the current device's stream: measuring on cuda:1 with cuda:0 current timed
    cuda:0's empty stream (device ms 0.02 for 5 ms of kernels). The measurement makes its GPU the current one. A fake
    two-GPU torch.cuda that follows torch's rules (Event.record() -> current_stream() -> the current device's)."""
    import contextlib

    import torch

    from dsnas.profiler.measure import current_device
    from dsnas.profiler.timing import time_calls

    current, queues, clock = [0], {0: [], 1: []}, [0.0]

    @contextlib.contextmanager
    def device(dev):
        before, current[0] = current[0], torch.device(dev).index
        try:
            yield
        finally:
            current[0] = before

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self, stream=None):
            self.t = max([clock[0], *(end for _, end in queues[current[0]])])  # after the work queued before it

        def elapsed_time(self, other):
            return other.t - self.t

    def call():  # a 5 ms kernel launched on cuda:1, where its tensors are
        start = max([clock[0], *(end for _, end in queues[1])])
        queues[1].append((start, start + 5.0))
        clock[0] += 0.02

    def sync():
        clock[0] = max([clock[0], *(end for _, end in queues[1])])

    monkeypatch.setattr(torch.cuda, "device", device)
    timed = {}
    for name, where in (("as before", contextlib.nullcontext()), ("measured", current_device(torch.device("cuda", 1)))):
        with where:
            timed[name] = time_calls(call, sync, warmup_s=0.0, measure_s=0.0, min_repeats=10,
                                     events=Event).device_median_ms
    assert timed["as before"] < 0.1 and timed["measured"] == pytest.approx(5.0)
    assert isinstance(current_device(torch.device("cpu")), contextlib.nullcontext)
