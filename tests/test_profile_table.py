"""`dsnas profile` prints a table: what was measured, a row per batch size with units, what is unavailable and why;
the library keeps the profile itself (ProfileReport.profile)."""

from __future__ import annotations

import json

import pytest

from dsnas import profile as dsnas_profile
from dsnas.cli import main
from dsnas.profile import ProfileReport
from dsnas.profiler.device import fingerprint_id

ARCH = {"family": "transformer_lm", "d_model": 16, "vocab_size": 256, "context": 16,
        "layers": [{"n_heads": 2, "ffn_ratio": 1}]}


def _rows(text: str) -> dict[str, list[str]]:
    """The table's rows by their first cell (the heading row under "batch")."""
    return {line.split()[0]: line.split() for line in text.splitlines()
            if line.strip() and line.split()[0] in ("batch", "1", "2", "32")}


def test_profile_prints_a_row_per_batch_size_with_the_measured_figures(tmp_path, capsys, monkeypatch):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(ARCH))
    reports: list[ProfileReport] = []
    measure = dsnas_profile.profile_target
    monkeypatch.setattr(dsnas_profile, "profile_target", lambda *a, **k: reports.append(measure(*a, **k))
                        or reports[-1])

    assert main(["profile", str(path), "--device", "cpu", "--batch-sizes", "1,2", "--measure-s", "0.02",
                 "--max-measure-s", "0.1"]) == 0

    out = capsys.readouterr().out
    profile = reports[0].profile
    lines = out.splitlines()
    # On a busy machine the CPU ceilings' notice comes first ("others took 27% of the CPUs while the ceilings were
    # measured; not cached"): it is said as they are measured, before the profile's table.
    start = lines.index(f"profile of {path} (untrained weights)")
    assert all("not cached" in line for line in lines[:start]), lines[:start]
    lines = lines[start:]
    assert lines[1].startswith("device cpu: ") and f"fingerprint {fingerprint_id(profile['fingerprint'])}" in lines[1]
    assert lines[2] == (f"backend {profile['backend']}, dtype {profile['dtype']}, threads {profile['threads']}, "
                        "freed memory held")
    rows = _rows(out)
    heading = " ".join(rows["batch"])
    for unit in ("median ms", "p10-p90 ms", "tokens/s", "GFLOP/s", "GB/s", "peak MiB", "disturbed"):
        assert unit in heading
    for bs in ("1", "2"):
        measured = profile["batches"][bs]
        assert float(rows[bs][1]) == pytest.approx(measured["median_ms"], rel=1e-3)
        assert rows[bs][1] == f"{measured['median_ms']:.4g}"
        assert rows[bs][2] == f"{measured['p10_ms']:.4g}-{measured['p90_ms']:.4g}"
    assert "{" not in out and "}" not in out  # no Python dict
    assert str(reports[0]) == reports[0].table() == "\n".join(lines)
    assert reports[0].metrics["latency_ms"] == profile["batches"]["1"]["median_ms"]


def _gpu_profile() -> dict:
    batch = {"median_ms": 1.25, "p10_ms": 1.2, "p90_ms": 1.5, "ci_rel": 0.004, "repeats": 200, "converged": False,
             "device_latency_ms": 1.1, "graph_latency_ms": 0.4, "throughput_tok_s": 52428.8, "gflop_s": 812.5,
             "gb_s": 95.0, "flop_util": 0.0008, "bw_util": 0.02, "peak_memory_mb": 48.0,
             "disturbance": {"disturbed": True, "others_cpu_share": 0.6}}
    return {"fingerprint": {"device": "cuda", "gpu": "NVIDIA H200", "cuda": "12.8", "torch": "2.9.0",
                            "cpu": "Xeon", "cpu_count": 16},
            "backend": "eager-bf16", "dtype": "bfloat16", "threads": None, "batches": {"32": batch},
            "ceilings": {"memory_gb_s": 4800.0, "fp32_gflop_s": None, "bf16_tensor_gflop_s": 989000.0,
                         "details": {"fp32_gflop_s": "no clock"}, "tensor_gflop_s": {"fp8": 1979000.0}},
            "unavailable": {"nvml": "pynvml is not installed"}, "disturbed": True,
            "memory_method": "cuda_max_memory_allocated",
            "kernels": {"32": {"unavailable": "the profiler recorded no kernel events"}}}


def test_a_gpu_profile_shows_device_and_graph_times_and_says_what_is_unavailable():
    window = {"energy_per_call_j": 0.33, "power_w": 256.1, "gpu_util": 0.3991}
    text = ProfileReport("bundle b (trained weights)", window, _gpu_profile()).table()

    assert "device cuda: NVIDIA H200 (CUDA 12.8), torch 2.9.0" in text.splitlines()[1]
    assert "ceilings: memory 4,800 GB/s, bf16 tensor 989,000 GFLOP/s, fp8 tensor 1,979,000 GFLOP/s" in text
    heading, row = _rows(text)["batch"], _rows(text)["32"]
    assert " ".join(heading).startswith("batch median ms p10-p90 ms CI ± calls device ms graph ms tokens/s")
    assert row[:8] == ["32", "1.25", "1.2-1.5", "0.4%", "200*", "1.1", "0.4", "52,429"]
    assert row[-1] == "yes" and "flop util" in text and "bw util" in text
    assert "* the median's confidence interval did not reach the tolerance" in text
    assert "steady window: energy per call 0.33 J, power 256.1 W, GPU busy 39.9%" in text
    assert "unavailable: nvml: pynvml is not installed" in text
    assert "kernels at batch 32: unavailable: the profiler recorded no kernel events" in text
    assert "disturbed: other processes took the CPUs or the GPU, or the host ran slow" in text
    assert "(per batch size 32: others 60%, host slowed -)" in text
    assert "{" not in text and "}" not in text


def test_a_column_no_batch_size_has_is_left_out():
    profile = _gpu_profile()
    for name in ("device_latency_ms", "graph_latency_ms", "flop_util"):
        del profile["batches"]["32"][name]

    heading = " ".join(_rows(ProfileReport("x", {}, profile).table())["batch"])

    assert "device ms" not in heading and "graph ms" not in heading and "flop util" not in heading
    assert "bw util" in heading


def test_a_cuda_kernel_name_is_cut_to_a_line():
    name = "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<" + "x" * 700 + ">"
    profile = {**_gpu_profile(), "kernels": {"32": {"kind": "cuda kernels", "count": 1,
                                                    "top": [{"name": name, "calls": 9, "self_us": 23.0}]}}}

    line = next(line for line in ProfileReport("x", {}, profile).table().splitlines() if " 9x " in line)

    assert line.endswith(name[:97] + "...") and len(line) < 130


@pytest.mark.parametrize("flags, said", [
    (["--batch-sizes", "0,32"], "--batch-sizes: must be a non-empty list of integers >= 1, but got [0, 32]"),
    (["--measure-s", "0"], "--measure-s: must be > 0 and finite, but got 0.0"),
    (["--measure-s", "1", "--max-measure-s", "0.5"], "--max-measure-s: must be >= measure_s and finite, but got 0.5"),
])
def test_a_protocol_flag_out_of_range_is_one_line_naming_it(tmp_path, capsys, flags, said):
    """They once ended in a traceback (the rule's Invalid is not a DsnasError)."""
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(ARCH))
    assert main(["profile", str(path), "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dsnas: error: {said}. Fix: ") and err.count("\n") == 0


def test_a_longer_measure_s_alone_lifts_the_cap(tmp_path, monkeypatch):
    """--measure-s 5 was refused: the default max_measure_s (3 s) is below it."""
    seen = []
    monkeypatch.setattr(dsnas_profile, "measure", lambda model, task, dev, hw: seen.append(hw) or ({}, {}))
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(ARCH))
    dsnas_profile.profile_target(str(path), device="cpu", measure_s=5.0)
    assert (seen[0].measure_s, seen[0].max_measure_s) == (5.0, 5.0)


def test_an_architecture_file_of_a_family_without_token_inputs_is_refused_with_the_way_that_works(tmp_path, capsys):
    """A CNN's architecture file was measured on the default text task and crashed on its token ids."""
    path = tmp_path / "cnn.json"
    path.write_text(json.dumps({"family": "cnn", "stem_width": 8, "image_size": 16, "channels": 1, "n_classes": 10,
                                "layers": [{"depth": 1, "width": 16, "kernel": 3, "expand": 1}]}))
    assert main(["profile", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "a 'cnn' model does not take" in err and "`dsnas export`" in err
    # A user family's exported arch.json: its builder took the token ids, and was timed on them (its own task's
    # snippets ran at 1/100 of that rate).
    path.write_text(json.dumps({"arch": {"family": "snippet_model:build", "width": 8}, "task": {"name": "x"}}))
    assert main(["profile", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "a user family's model takes its own task's input" in err
    route = tmp_path / "route"  # a route's folder: "arch.json missing ... re-export the trial"
    (route / "members").mkdir(parents=True)
    (route / "route.json").write_text("{}")
    assert main(["profile", str(route)]) == 2
    assert "a route bundle (`dsnas route`), not a model's" in capsys.readouterr().err


def test_the_throughput_column_says_what_the_task_counts():
    """An image model's profile said tokens/s, where its report and card say images/s."""
    from dsnas.spec import TaskSpec
    from dsnas.tasks import throughput_unit

    profile = {"fingerprint": {"device": "cpu", "cpu": "Test CPU"}, "backend": "eager-fp32", "dtype": "float32",
               "threads": 2, "batches": {"8": {"median_ms": 2.0, "throughput_tok_s": 4000.0, "repeats": 20}}}
    unit = throughput_unit(TaskSpec("images", {}, "."))
    heading = " ".join(_rows(ProfileReport("x", {}, profile, unit).table())["batch"])
    assert unit == "images/s" and "images/s" in heading and "tokens/s" not in heading
