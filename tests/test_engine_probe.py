"""The engine probe: which engine choices pay on this device, decided from timings at a space's layer shapes; a study
whose space says "auto" offers exactly those, and never a choice without a fast kernel here."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
from optuna.trial import TrialState

from dsnas.cli import main
from dsnas.profiler import engine_probe as ep
from dsnas.profiler.disturbance import Share

SHAPES = {"64x256->256": 1.0, "2048x256->1024": 4.0}


def test_a_choice_is_offered_when_its_geometric_mean_speedup_clears_the_bar():
    fast = ep.decide("int8", SHAPES, {"64x256->256": 0.8, "2048x256->1024": 1.6}, "torch-dynamic")
    assert fast.offered and fast.speedup == pytest.approx(math.sqrt(1.25 * 2.5))
    assert fast.per_shape == {"64x256->256": pytest.approx(1.25), "2048x256->1024": pytest.approx(2.5)}
    assert "pays" in fast.why and "1.25x-2.50x" in fast.why
    # Faster at one shape, slower at the other: the geometric mean (0.99x) decides, and it does not pay.
    mixed = ep.decide("bf16", SHAPES, {"64x256->256": 2.2, "2048x256->1024": 1.85}, "bf16")
    assert not mixed.offered and "does not pay" in mixed.why
    edge = ep.decide("bf16", SHAPES, {"64x256->256": 1 / ep.PAYS, "2048x256->1024": 4 / ep.PAYS}, "bf16")
    assert edge.offered  # exactly at the bar pays


def test_a_choice_is_offered_at_the_widths_where_it_pays():
    """bf16 at d 32 is 0.5x and at d 128 2x: overall 1.0x, yet it pays at d 128 and is offered there only."""
    shapes = {"2048x32->32": 1.0, "2048x32->128": 1.0, "2048x128->128": 1.0, "2048x128->512": 1.0}
    slow_small = {"2048x32->32": 2.0, "2048x32->128": 2.0, "2048x128->128": 0.5, "2048x128->512": 0.5}
    bf16 = ep.decide("bf16", shapes, slow_small, "bf16")
    assert bf16.speedup == pytest.approx(1.0) and bf16.widths == {"32": pytest.approx(0.5), "128": pytest.approx(2.0)}
    assert bf16.offered and bf16.pays_at() == [128] and "pays at width 128 (2.00x); not at 32 (0.50x)" in bf16.why
    slow = ep.decide("fp16", shapes, dict.fromkeys(shapes, 2.0), "fp16")
    assert not slow.offered and slow.pays_at() == [] and "at every width" in slow.why
    probe = ep.EngineProbe("fake device", "f" * 16, tuple(shapes), {"bf16": bf16, "fp16": slow})
    assert probe.precisions() == ("fp32", "bf16")
    assert probe.by_width() == {32: {"precision": ("fp32",), "sparsity": ("dense",)},
                                128: {"precision": ("fp32", "bf16"), "sparsity": ("dense",)}}


def test_an_8_bit_choice_is_not_offered_where_a_16_bit_one_runs_as_fast():
    """int8 and fp8 are less exact than bf16: where bf16 pays and runs at least as fast, they can only lose (the H200
    ran fp8 at 0.74x and int8 at 0.51x of bf16; an AMX Xeon bf16 at 5-8x fp32, INT8 at 2x). Where the 8-bit kernel is
    the faster, it stays: int8 at width 256 below."""
    shapes = {"2048x64->64": 1.0, "2048x256->256": 1.0}

    def verdict(choice, at64, at256):
        return ep.decide(choice, shapes, {"2048x64->64": 1 / at64, "2048x256->256": 1 / at256}, "k")

    probe = ep.EngineProbe("fake device", "f" * 16, tuple(shapes), {
        "bf16": verdict("bf16", 7.5, 1.5), "fp16": verdict("fp16", 0.5, 0.5), "int8": verdict("int8", 2.0, 2.0),
        "fp8": verdict("fp8", 5.0, 1.2)})
    assert probe.precisions() == ("fp32", "bf16", "int8")  # fp8 is slower than bf16 at every width
    assert probe.by_width() == {64: {"precision": ("fp32", "bf16"), "sparsity": ("dense",)},
                                256: {"precision": ("fp32", "bf16", "int8"), "sparsity": ("dense",)}}
    assert (probe.dominated_by("int8", 64), probe.dominated_by("int8", 256)) == ("bf16", "")
    rows = {line.split()[0]: line for line in probe.table().splitlines()[2:]}
    assert rows["fp8"].split()[1] == "no" and "where bf16 runs 7.50x and is more exact" in rows["fp8"]
    assert rows["int8"].split()[1] == "yes" and "not offered at width 64, where bf16 runs 7.50x" in rows["int8"]
    # Without bf16 paying (an AVX2 CPU: 0.11x), int8 is offered wherever it pays, as before.
    alone = ep.EngineProbe("fake device", "f" * 16, tuple(shapes), {
        "bf16": verdict("bf16", 0.11, 0.11), "int8": verdict("int8", 2.0, 2.0)})
    assert alone.precisions() == ("fp32", "int8") and alone.by_width()[64]["precision"] == ("fp32", "int8")


def test_a_choice_without_its_kernel_is_never_offered_however_fast_it_looks():
    masked = ep.decide("2:4", SHAPES, {"64x256->256": 0.5, "2048x256->1024": 2.0}, "masked-dense fp32",
                       "no sparse kernel runs here (the zeros are computed densely)", baseline="dense fp32")
    assert not masked.offered and masked.speedup == pytest.approx(2.0)
    assert "no sparse kernel runs here" in masked.why and "dense fp32" in masked.why
    absent = ep.decide("fp8", SHAPES, None, "", "fp8 matmuls need a CUDA GPU of compute capability >= 8.9")
    assert not absent.offered and absent.speedup is None and absent.why.startswith("cannot run here: fp8")


def probe_of(offered: set[str], widths: dict[str, dict[str, float]] | None = None) -> ep.EngineProbe:
    """A recorded probe: ``offered`` pay (2x) and the rest do not (0.5x); ``widths``: a choice's speedup per width."""
    verdicts = {c: ep.Verdict(c, c in offered, 2.0 if c in offered else 0.5, "k", "recorded",
                              widths=(widths or {}).get(c, {}))
                for c in (*ep.PRECISIONS, ep.SPARSITY)}
    return ep.EngineProbe("fake device", "f" * 16, ("64x256->256",), verdicts)


def test_the_offer_is_fp32_and_dense_plus_what_pays():
    assert probe_of(set()).precisions() == ("fp32",) and probe_of(set()).sparsities() == ("dense",)
    both = probe_of({"bf16", "int8", "2:4"})
    assert both.precisions() == ("fp32", "bf16", "int8") and both.sparsities() == ("dense", "2:4")
    again = ep.EngineProbe.from_dict(both.as_dict(), cached=True)
    assert again.precisions() == both.precisions() and again.cached and "cached" in again.table()


def test_2_4_is_offered_at_a_width_only_beside_the_precision_its_sparse_kernel_takes():
    """On a GPU 2:4 is timed in bf16 against dense bf16: where bf16 is not offered, a 2:4 layer would be fp32 and
    masked-dense, a candidate no faster that the search paid for."""
    probe = probe_of({"bf16", "2:4"}, {"bf16": {"256": 0.9, "1024": 2.0}, "2:4": {"256": 1.3, "1024": 1.3},
                                       **{c: {"256": 0.5, "1024": 0.5} for c in ("fp16", "int8", "fp8")}})
    assert probe.by_width() == {256: {"precision": ("fp32",), "sparsity": ("dense",)},
                                1024: {"precision": ("fp32", "bf16"), "sparsity": ("dense", "2:4")}}
    assert probe.sparsities() == ("dense", "2:4")
    nowhere = probe_of({"2:4"}, {"bf16": {"256": 0.9}, "2:4": {"256": 1.3},
                                 **{c: {"256": 0.5} for c in ("fp16", "int8", "fp8")}})
    assert nowhere.sparsities() == ("dense",) and nowhere.by_width()[256]["sparsity"] == ("dense",)
    assert re.search(r"^2:4 +no ", nowhere.table(), re.M)


def test_a_sparsity_goes_beside_the_offered_precisions_a_sparse_kernel_takes():
    """Where the probe's 2:4 ran cuSPARSELt (a GPU), the offered bf16 and fp16 are the precisions whose 2:4 layers
    run sparse (convert's semi-structured path); where it ran masked-dense or not at all (a CPU), none are."""
    from dsnas.kernels.linear import LOW

    assert ep.SPARSE_KERNEL_PRECISIONS == tuple(LOW)  # the precisions convert gives a semi-structured kernel
    gpu = probe_of({"bf16", "fp16", "fp8", "2:4"})
    gpu.verdicts["2:4"] = replace(gpu.verdicts["2:4"], kernel="cusparselt bf16")
    assert gpu.sparse_with() == ("bf16", "fp16")
    gpu.verdicts["fp16"] = replace(gpu.verdicts["fp16"], offered=False)
    assert gpu.sparse_with() == ("bf16",)  # only what the space offers
    cpu = probe_of({"bf16", "2:4"})
    cpu.verdicts["2:4"] = replace(cpu.verdicts["2:4"], kernel="masked-dense fp32")
    assert cpu.sparse_with() == ()
    cpu.verdicts["2:4"] = ep.decide("2:4", SHAPES, None, "", "bf16 does not run here")
    assert cpu.sparse_with() == ()


@pytest.mark.parametrize(("objectives", "rows"), [(("accuracy", "throughput"), [64]), (("accuracy", "latency"), [16]),
                                                  (("latency", "throughput"), [16, 64]), (("accuracy", "params"), [16, 64])])
def test_the_probe_times_the_rows_the_speed_objectives_are_measured_at(tiny_study, objectives, rows):
    """Throughput is measured at the largest batch size and latency at the smallest: a choice is judged where the
    search will judge its candidates, and at both batch sizes when no objective says which."""
    from dataclasses import replace

    from dsnas.engine_offer import study_shapes
    from dsnas.space import load_space_file
    from dsnas.spec import Objective, load_study

    spec = load_study(tiny_study)  # batch sizes 1 and 4; context 16 below
    spec = replace(spec, objectives=tuple(Objective(o, "maximize") for o in objectives))
    space = load_space_file(spec.space.file)
    shapes = study_shapes(space, spec, 16)
    assert sorted({s.rows for s in shapes}) == rows
    assert len(shapes) == len(rows) * len(set(space.linear_widths()))  # every width at each of those rows


def test_the_probe_on_this_cpu_offers_no_kernel_it_lacks_and_caches_by_device(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("DSNAS_CACHE_DIR", str(tmp_path))
    # Taken as quiet whatever else runs on the machine: a disturbed probe is not cached (tests/test_disturbance.py),
    # and this test is about what a quiet one caches.
    monkeypatch.setattr(ep, "CpuWindow", QuietWindow)
    monkeypatch.setattr(ep, "wait_for_quiet", lambda seconds: None)
    monkeypatch.setattr(ep.host_speed, "probe_ms", lambda: 1.0)  # and its speed steady
    shapes = ep.linear_shapes([(64, 64), (64, 256)], [8, 256])
    probe = ep.probe_engine(torch.device("cpu"), shapes, threads=1)
    assert set(probe.verdicts) == {*ep.PRECISIONS, ep.SPARSITY} and not probe.cached
    assert not probe.verdicts["fp8"].offered and probe.verdicts["fp8"].speedup is None  # no fp8 kernel on a CPU
    assert not probe.verdicts["2:4"].offered and "no sparse kernel runs here" in probe.verdicts["2:4"].why
    for choice in ("bf16", "fp16", "int8"):  # measured: offered exactly where the measurement clears the bar
        verdict = probe.verdicts[choice]
        assert verdict.offered == any(r >= ep.PAYS for r in verdict.widths.values()), verdict
        assert len(verdict.per_shape) == len(shapes) and set(verdict.widths) == {"64"}
        assert verdict.widths["64"] == pytest.approx(math.prod(verdict.per_shape.values()) ** (1 / len(shapes)))
    monkeypatch.setattr(ep, "_measure", lambda *a: pytest.fail("measured again"))
    assert ep.probe_engine(torch.device("cpu"), shapes, threads=1).cached


class QuietWindow:
    share = Share(others=0.0, steal=0.0)

    def __enter__(self) -> QuietWindow:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


AUTO_SPACE = """\
family = "transformer_lm"
engine = "auto"
[choices]
n_layers = [1]
d_model = [32, 64]
[per_layer]
n_heads = [2]
ffn_ratio = [1, 2]
"""


@pytest.mark.parametrize("offered", [set(), {"int8", "2:4"}])
def test_a_study_with_auto_choices_samples_only_what_the_probe_offered(tiny_study, monkeypatch, capsys, offered):
    """Through the real driver: the offer is settled once, stored in the study, printed, and the sampled layers use
    only offered choices; where nothing pays it says so in one line and searches fp32 dense, not an error."""
    from dsnas import engine_offer
    from dsnas.spec import load_study
    from dsnas.study import open_study

    space = tiny_study.parent / "tiny_space.toml"
    space.write_text(AUTO_SPACE)
    calls = []

    def fake_probe(device, shapes, threads, int8_backend):
        assert int8_backend == "auto"  # the study's [engine] int8_backend, which the probe's int8 layers take
        calls.append([str(s) for s in shapes])
        return probe_of(offered)

    monkeypatch.setattr(engine_offer, "probe_on_device", fake_probe)
    tiny_study.write_text(tiny_study.read_text().replace("n_trials = 3", "n_trials = 4"))
    assert main(["search", str(tiny_study)]) == 0
    out = capsys.readouterr().out
    # Context 16 at batch size 4, where the throughput objective is measured (batch size 1 is the latency limit's).
    assert calls == [["64x32->32", "64x64->64", "64x32->64", "64x64->128"]]
    study = open_study(load_study(tiny_study), create=False)
    stored = study.user_attrs[engine_offer.OFFER_ATTR]
    layers = [layer for t in study.get_trials(states=(TrialState.COMPLETE,)) for layer in t.user_attrs["arch"]["layers"]]
    assert {layer.get("precision", "fp32") for layer in layers} <= set(stored["precision"])
    assert {layer.get("sparsity", "dense") for layer in layers} <= set(stored["sparsity"])
    if not offered:
        assert stored["precision"] == ["fp32"] and stored["sparsity"] == ["dense"]
        assert "no engine choice pays on fake device at this space's shapes: this study searches fp32 dense" in out
    else:
        assert stored["precision"] == ["fp32", "int8"] and stored["sparsity"] == ["dense", "2:4"]
        assert "engine: precision ['fp32', 'int8'], sparsity ['dense', '2:4']" in out
    # Resumed, the study keeps its offer: no second probe, the same distributions for Optuna.
    assert main(["search", str(tiny_study), "--n-trials", "5"]) == 0
    assert len(calls) == 1 and "decided at this study's first run on fake device" in capsys.readouterr().out


@pytest.mark.parametrize("sampler", ["tpe", "dsnas"])
def test_a_study_samples_a_choice_only_at_the_widths_where_it_paid(tiny_study, monkeypatch, capsys, sampler):
    """Through the real driver, with Optuna's sampler and dsnas's: int8 paid at d 64 and lost at d 32, so no d 32
    candidate has an int8 layer, the study says where it is offered, and keeps the offer by width for a resumed
    run."""
    from dsnas import engine_offer
    from dsnas.spec import load_study
    from dsnas.study import open_study

    (tiny_study.parent / "tiny_space.toml").write_text(AUTO_SPACE.replace("[1]", "[1, 2]"))
    probe = probe_of({"int8"}, {"int8": {"32": 0.5, "64": 2.0}, "bf16": {"32": 0.5, "64": 0.5}})
    monkeypatch.setattr(engine_offer, "probe_on_device", lambda device, shapes, threads, int8_backend: probe)
    text = tiny_study.read_text().replace("n_trials = 3", "n_trials = 8")
    # dsnas's sampler proposes 4 at random, then by its model of measured figures: with seed 0 the 4 were all d 64,
    # and the model, timing-driven, once proposed no d 32 at all. Seed 7's random 4 hold both widths.
    text = text.replace('name = "tpe"\nseed = 0', 'name = "dsnas"\nseed = 7') if sampler == "dsnas" else text
    tiny_study.write_text(text)
    assert main(["search", str(tiny_study)]) == 0
    assert "precision ['fp32', 'int8'], sparsity ['dense'] (what pays on this device: int8 at width 64 only)" in \
        capsys.readouterr().out
    study = open_study(load_study(tiny_study), create=False)
    assert study.user_attrs[engine_offer.OFFER_ATTR]["by_width"]["32"]["precision"] == ["fp32"]
    archs = [t.user_attrs["arch"] for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert {arch["d_model"] for arch in archs} == {32, 64}
    for arch in archs:
        allowed = {"fp32"} if arch["d_model"] == 32 else {"fp32", "int8"}
        assert {layer["precision"] for layer in arch["layers"]} <= allowed, arch
    assert main(["search", str(tiny_study), "--n-trials", "9"]) == 0
    assert "int8 at width 64 only) (decided at this study's first run" in capsys.readouterr().out


@pytest.mark.parametrize("sampler", ["tpe", "dsnas"])
def test_a_study_samples_a_sparsity_only_beside_bf16_where_the_sparse_kernel_takes_only_bf16(
        tiny_study, monkeypatch, capsys, sampler):
    """Through the real driver: the probe ran cuSPARSELt in bf16 and offered bf16, int8 and 2:4; no candidate has
    an fp32 or int8 layer with 2:4 (its zeros would be multiplied densely), the study says so, and a resumed run
    keeps the rule."""
    from dsnas import engine_offer
    from dsnas.spec import load_study
    from dsnas.study import open_study

    (tiny_study.parent / "tiny_space.toml").write_text(AUTO_SPACE.replace("[1]", "[1, 2]"))
    probe = probe_of({"bf16", "int8", "2:4"})
    probe.verdicts["2:4"] = replace(probe.verdicts["2:4"], kernel="cusparselt bf16")
    monkeypatch.setattr(engine_offer, "probe_on_device", lambda device, shapes, threads, int8_backend: probe)
    text = tiny_study.read_text().replace("n_trials = 3", "n_trials = 6")
    tiny_study.write_text(text.replace('name = "tpe"', 'name = "dsnas"') if sampler == "dsnas" else text)
    assert main(["search", str(tiny_study)]) == 0
    assert "a sparsity beside bf16 only, which a sparse kernel takes" in capsys.readouterr().out
    study = open_study(load_study(tiny_study), create=False)
    assert study.user_attrs[engine_offer.OFFER_ATTR]["sparse_with"] == ["bf16"]
    assert main(["search", str(tiny_study), "--n-trials", "8"]) == 0
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    pairs = {(layer["precision"], layer["sparsity"]) for t in trials for layer in t.user_attrs["arch"]["layers"]}
    assert pairs <= {("fp32", "dense"), ("int8", "dense"), ("bf16", "dense"), ("bf16", "2:4")}, pairs
    assert {p for p, _ in pairs} == {"fp32", "int8", "bf16"}  # every offered precision was searched
    for t in trials:  # a layer's sparsity parameter exists only beside bf16
        for i, layer in enumerate(t.user_attrs["arch"]["layers"]):
            assert (f"layer{i}.sparsity" in t.params) == (layer["precision"] == "bf16"), t.params


def _recorded_probe(cache: Any, monkeypatch: Any, window: type) -> list[int]:
    """The probe with its cache in ``cache``, the CPU window ``window`` and a recorded measurement (int8 pays);
    returns the list each measurement appends to."""
    monkeypatch.setenv("DSNAS_CACHE_DIR", str(cache))
    monkeypatch.setattr(ep, "CpuWindow", window)
    monkeypatch.setattr(ep, "wait_for_quiet", lambda max_s: None)
    measured: list[int] = []
    monkeypatch.setattr(ep, "_measure", lambda device, shapes, between, int8_backend: measured.append(1)
                        or probe_of({"int8"}).verdicts)
    return measured


def test_a_probe_disturbed_by_others_is_used_but_not_cached(tmp_path, monkeypatch):
    """A busy moment decides this study's offer at most, never every later study's: it is not cached, and says so."""
    import torch

    class Busy:
        share = Share(others=0.45, steal=0.0)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    measured = _recorded_probe(tmp_path, monkeypatch, Busy)
    shapes = ep.linear_shapes([(64, 64)], [8])
    first = ep.probe_engine(torch.device("cpu"), shapes, threads=1)
    assert first.load == pytest.approx(0.45) and "others used 45% of the CPUs, so not cached" in first.table()
    assert first.precisions() == ("fp32", "int8")
    again = ep.probe_engine(torch.device("cpu"), shapes, threads=1)
    assert not again.cached and len(measured) == 2
    # Others' share unknown (no /proc/stat: macOS): not known quiet, so not kept either.
    monkeypatch.setattr(Busy, "share", Share(None, None, "/proc/stat not readable"))
    unknown = ep.probe_engine(torch.device("cpu"), shapes, threads=1)
    assert "others' use of the CPUs unknown (no /proc/stat), so not cached" in unknown.table()
    assert not ep.probe_engine(torch.device("cpu"), shapes, threads=1).cached and len(measured) == 4
    monkeypatch.setattr(Busy, "share", Share(others=0.02, steal=0.0))  # quiet: kept, and read back next time
    ep.probe_engine(torch.device("cpu"), shapes, threads=1)
    assert ep.probe_engine(torch.device("cpu"), shapes, threads=1).cached and len(measured) == 5


def test_a_host_that_slows_midway_moves_no_ratio_and_the_probe_that_saw_it_is_not_cached(tmp_path, monkeypatch):
    """Recorded timings: int8 layers run in half fp32's time, bf16 in the same. The host slows 2x after the first
    shape (as a 2-core VM's does, dsnas.profiler.host_speed). Each choice is timed beside fp32 at every shape, so
    every ratio stays true; the host-speed probes between shapes see the change, and the probe is not cached."""
    import torch

    monkeypatch.setenv("DSNAS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ep, "CpuWindow", QuietWindow)
    monkeypatch.setattr(ep, "wait_for_quiet", lambda seconds: None)
    slow = {"factor": 1.0, "probes": 0}

    def probe_ms():  # the probe before the second shape is where the host slows
        slow["probes"] += 1
        slow["factor"] = 1.0 if slow["probes"] < 2 else 2.0
        return slow["factor"]

    def layer(shape, precision, sparsity, device, int8_backend):
        if precision == "fp8":
            raise ep.TrialError("fp8 cannot run here: no fp8 kernel on a CPU")
        return SimpleNamespace(precision=precision, sparsity=sparsity, backend=precision, sparse_kernel=False,
                               reason="masked dense")

    seconds = {"fp32": 2.0, "bf16": 2.0, "fp16": 4.0, "int8": 1.0}
    monkeypatch.setattr(ep.host_speed, "probe_ms", probe_ms)
    monkeypatch.setattr(ep, "_layer", layer)
    given: dict[tuple[str, str], float | None] = {}

    def timed(layer, shape, device, give_up_s):
        given[layer.precision, layer.sparsity] = give_up_s
        return seconds[layer.precision] * slow["factor"]

    monkeypatch.setattr(ep, "_seconds", timed)
    shapes = ep.linear_shapes([(64, 64), (128, 128)], [8])
    probe = ep.probe_engine(torch.device("cpu"), shapes, threads=1)
    expected = {"bf16": 1.0, "fp16": 0.5, "int8": 2.0}
    for choice, ratio in expected.items():
        assert probe.verdicts[choice].per_shape == {str(s): pytest.approx(ratio) for s in shapes}, choice
    assert probe.verdicts["2:4"].per_shape == {str(s): pytest.approx(1.0) for s in shapes}  # vs dense fp32
    assert probe.verdicts["fp8"].speedup is None and probe.by_width()[64]["precision"] == ("fp32", "int8")
    assert slow["probes"] == len(shapes) + 1 and probe.host_drift == pytest.approx(2.0)
    # Each choice may stop timing once LOSING times slower than fp32 at the same shape, then (the second shape).
    assert given == {("fp32", "dense"): None, **{(p, s): ep.LOSING * 2.0 * 2.0
                                                 for p, s in (("bf16", "dense"), ("fp16", "dense"),
                                                              ("int8", "dense"), ("fp32", "2:4"))}}
    assert "the host's speed changed 2.00x, so not cached" in probe.table()
    slow["probes"] = -100  # a steady host from here on: the next probe is measured again, and cached
    again = ep.probe_engine(torch.device("cpu"), shapes, threads=1)
    assert not again.cached and again.host_drift == pytest.approx(1.0) and "disturbed" not in again.table()
    assert ep.probe_engine(torch.device("cpu"), shapes, threads=1).cached


def test_a_study_that_pins_an_int8_backend_is_probed_with_it_and_cached_apart(tmp_path, monkeypatch):
    """The probe timed int8 with the fastest backend here while the study's trials ran the one it pinned: int8 was
    offered where that one may not pay."""
    import torch

    monkeypatch.setenv("DSNAS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ep, "CpuWindow", QuietWindow)
    monkeypatch.setattr(ep, "wait_for_quiet", lambda seconds: None)
    monkeypatch.setattr(ep.host_speed, "probe_ms", lambda: 1.0)
    backends = []

    def layer(shape, precision, sparsity, device, int8_backend):
        backends.append(int8_backend)
        return SimpleNamespace(precision=precision, sparsity=sparsity, backend=precision, sparse_kernel=False,
                               reason="masked dense")

    monkeypatch.setattr(ep, "_layer", layer)
    monkeypatch.setattr(ep, "_seconds", lambda layer, shape, device, give_up_s: 1.0)
    shapes = ep.linear_shapes([(64, 64)], [8])
    ep.probe_engine(torch.device("cpu"), shapes, threads=1, int8_backend="torch-dynamic")
    assert set(backends) == {"torch-dynamic"}
    assert ep.probe_engine(torch.device("cpu"), shapes, threads=1, int8_backend="torch-dynamic").cached
    assert not ep.probe_engine(torch.device("cpu"), shapes, threads=1).cached  # "auto": another entry
    assert backends[-1] == "auto"


def test_a_layer_slower_than_it_could_pay_is_timed_by_two_calls_and_others_in_full():
    """A layer LOSING times slower than fp32 at the faster of two calls cannot pay: that call's time stands (bf16
    at 0.1x on an AVX2 CPU need not be timed in full); a layer within the bound is timed as usual."""
    import time

    import torch

    calls = {"n": 0}

    def layer(x):
        calls["n"] += 1
        time.sleep(0.02)

    shape = ep.Shape(4, 8, 8)
    assert 0.02 <= ep._seconds(layer, shape, torch.device("cpu"), give_up_s=0.005) < 0.1 and calls["n"] == 3
    calls["n"] = 0
    assert ep._seconds(layer, shape, torch.device("cpu"), give_up_s=0.5) == pytest.approx(0.02, rel=0.5)
    assert calls["n"] >= 3 + 5  # two calls, then a warm-up and at least five timed calls


@pytest.mark.parametrize("verdicts", [[], "int8", {"int8": 3}])
def test_a_well_formed_cache_entry_of_the_wrong_shape_is_measured_again(tmp_path, monkeypatch, verdicts):
    """A hand-edited or foreign entry (its verdicts a list) ended the probe, and the search, in an AttributeError."""
    import json

    import torch

    measured = _recorded_probe(tmp_path, monkeypatch, QuietWindow)
    shapes = ep.linear_shapes([(64, 64)], [8])
    first = ep.probe_engine(torch.device("cpu"), shapes, threads=1)
    path = tmp_path / "engine_probe.json"
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        entry["verdicts"] = verdicts
    path.write_text(json.dumps(data))
    again = ep.probe_engine(torch.device("cpu"), shapes, threads=1)
    assert not again.cached and len(measured) == 2 and again.precisions() == first.precisions()
    assert ep.probe_engine(torch.device("cpu"), shapes, threads=1).cached  # the entry was written again


def test_the_offer_line_names_the_sparsity_the_space_lists_and_a_stored_fp8_offer_is_refused_on_a_cpu(
        tiny_study, monkeypatch, capsys):
    """precision = "auto" beside a listed sparsity: the line printed the probe's sparsity ['dense'] (and, with
    nothing paying, 'fp32 dense layers only') while 2:4 layers were searched. And a study whose offer was decided
    on a GPU with fp8, resumed where trials run on the CPU, failed each trial that drew fp8."""
    from dsnas import engine_offer
    from dsnas.spec import load_study
    from dsnas.study import open_study

    (tiny_study.parent / "tiny_space.toml").write_text(
        AUTO_SPACE.replace('engine = "auto"\n', "") + 'precision = "auto"\nsparsity = ["dense", "2:4"]\n')
    monkeypatch.setattr(engine_offer, "probe_on_device", lambda device, shapes, threads, int8_backend: probe_of(set()))
    tiny_study.write_text(tiny_study.read_text().replace("n_trials = 3", "n_trials = 1"))
    assert main(["search", str(tiny_study)]) == 0
    out = capsys.readouterr().out
    assert "sparsity ['dense', '2:4'] (as the space lists it)" in out and "fp32 dense layers only" not in out, out
    study = open_study(load_study(tiny_study), create=False)
    gpu = {**study.user_attrs[engine_offer.OFFER_ATTR], "precision": ["fp32", "bf16", "fp8"],
           "device": "NVIDIA H100 80GB HBM3"}
    study.set_user_attr(engine_offer.OFFER_ATTR, gpu)
    import torch
    if torch.cuda.is_available():
        return  # trials here may run on a GPU that takes fp8
    assert main(["search", str(tiny_study), "--n-trials", "2"]) == 2
    err = capsys.readouterr().err
    assert "was decided on NVIDIA H100 80GB HBM3 and holds fp8" in err and err.count("\n") == 1, err
