"""The GPU check's measuring sections: the device against its physical limits, every engine layer type inside a
model and alone against bf16 dense, and CUDA training with loss scaling and a forced fp32 fallback.

With ``dry`` (a CPU machine) the same code runs at tiny sizes on the CPU, against fp32 dense, so that CI runs it."""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from kernels import Kind  # benchmarks/kernels.py, beside this file

from dsnas.kernels.convert import convert, held_bytes, inference_size, shed_training_form
from dsnas.kernels.linear import engine_layers
from dsnas.kernels.quant import _import_torchao
from dsnas.kernels.sparsity import magnitude_scores, sparsify_layer
from dsnas.models import build

GEMM_N = 8192
COPY_BYTES = 2 * 2**30


@dataclass(frozen=True)
class Variant(Kind):
    """One engine layer type (benchmarks/kernels.py's Kind) for every linear layer of a model."""

    # Relative L2 error of the logits against fp32 that still counts as close: fp32 is the same arithmetic;
    # fp16 keeps 11 significant bits, bf16 8, int8 quantizes inputs and weights to 8 bits, and e4m3 keeps 4
    # significant bits (up to 6% rounding per value, on inputs and weights), each through two blocks of four layers.
    tolerance: float = 1e-4


VARIANTS = (
    Variant("fp32", "fp32"), Variant("bf16", "bf16", tolerance=3e-2), Variant("fp16", "fp16", tolerance=5e-3),
    Variant("int8 int8-static", "int8", int8_backend="int8-static", tolerance=6e-2),
    Variant("int8 torchao-dynamic", "int8", int8_backend="torchao-dynamic", tolerance=6e-2),
    Variant("int8 torch-dynamic", "int8", int8_backend="torch-dynamic", tolerance=6e-2),
    Variant("fp8", "fp8", tolerance=0.12),
    Variant("2:4 fp32", "fp32", "2:4"), Variant("2:4 bf16", "bf16", "2:4", tolerance=3e-2),
    Variant("2:4 fp16", "fp16", "2:4", tolerance=5e-3), Variant("2:4 fp8", "fp8", "2:4", tolerance=0.12),
    Variant("2:4 int8 int8-static", "int8", "2:4", int8_backend="int8-static", tolerance=6e-2),
)


def device_of(dry: bool) -> torch.device:
    return torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def event_ms(fn: Any, calls: int = 20, warmup: int = 5) -> list[float]:
    """Milliseconds of each of ``calls`` calls by CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


# --- the device against its physical limits ------------------------------------------------------------------------

def limits(sec: Any, dry: bool) -> None:
    """bf16 GEMM and copy rates against this device's peaks; GPM, energy and power in NVML's steady window; CUDA events
    against the wall clock; five independent dsnas measurements of one model."""
    from dsnas.profiler.ceilings import gpu_peaks
    from dsnas.profiler.nvml import _call, nvml_handle
    from dsnas.profiler.timing import time_calls
    from dsnas.profiler.window import measure_window

    dev = device_of(dry)
    a = torch.randn(GEMM_N, GEMM_N, device=dev, dtype=torch.bfloat16)
    b = torch.randn(GEMM_N, GEMM_N, device=dev, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    gemm = lambda: torch.mm(a, b, out=c)  # noqa: E731
    # The bounds are this device's own peaks at its maximum clocks (SMs x tensor-core rate x clock; memory clock x
    # bus width x 2), not an H200's: the next machine may be an H100 PCIe (2.0 TB/s) or SXM (3.35 TB/s).
    peaks = gpu_peaks(dev)
    tflop_s = 2 * GEMM_N**3 / (statistics.median(event_ms(gemm)) / 1e3) / 1e12
    sec.within_peak(f"bf16 GEMM {GEMM_N}^3", tflop_s, _per_1e3(peaks.bf16_tensor_gflop_s), 0.5, unit="TFLOP/s",
                    how=peaks.details["bf16_tensor"],
                    why="above the dense peak is a timing error; below half of it, a slow path (H200: 73% of it)")
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ = lambda: dst.copy_(src)  # noqa: E731
    tb_s = 2 * COPY_BYTES / (statistics.median(event_ms(copy_)) / 1e3) / 1e12
    sec.within_peak("device-to-device copy, read + write", tb_s, _per_1e3(peaks.memory_gb_s), 0.5, unit="TB/s",
                    how=peaks.details["memory"], why="a copy reaches 80-90% of DRAM's peak (H200: 87% of 4.81 TB/s)")

    timing = time_calls(gemm, lambda: sync(dev), warmup_s=0.2, measure_s=0.5, events=torch.cuda.Event)
    sec.check("CUDA-event / wall-clock median, 8192^3 GEMM", timing.device_median_ms / timing.median_ms, 0.9, 1.1,
              why="a ~1 ms kernel: the host's launch and sync add little")

    repeatability(sec, dev)  # before the windows below run the board at its power cap
    co_tenant(sec, dev)
    handle, how = nvml_handle(dev)
    if handle is None:
        sec.note(f"NVML window: unavailable: {how}")
        return
    limit_mw, why = _call("nvmlDeviceGetEnforcedPowerLimit", handle)
    on_gemm = measure_window(handle, gemm, lambda: sync(dev), min_s=1.0)
    on_copy = measure_window(handle, copy_, lambda: sync(dev), min_s=1.0)
    # GPM's percentages are stored as shares (0..1), as dsnas's profiles hold them.
    sec.check("GPM SM utilization, GEMM loop", on_gemm.sm_util, 0.8, 1.0,
              why=on_gemm.unavailable.get("sm_util", "a large GEMM keeps every SM busy"))
    sec.check("GPM tensor-core utilization, GEMM loop", on_gemm.tensor_util, 0.5, 1.0,
              why=on_gemm.unavailable.get("tensor_util", "a bf16 GEMM runs on the tensor cores"))
    sec.check("GPM DRAM bandwidth utilization, copy loop", on_copy.dram_bw_util, 0.6, 1.0,
              why=on_copy.unavailable.get("dram_bw_util", "a large copy is bound by DRAM"))
    sec.check("energy per GEMM", on_gemm.energy_per_call_j, 1e-6, None, unit="J",
              why=on_gemm.unavailable.get("energy_per_call_j", "the energy counter advanced"))
    limit_w = None if why else limit_mw / 1e3
    sec.check("power, max over the GEMM window", on_gemm.power_w_max, 1, limit_w, unit="W",
              why=why or on_gemm.unavailable.get("power_w_max", f"below the enforced board limit ({limit_w} W)"))
    sec.table("NVML steady windows", ["loop", "seconds", "calls", "J/call", "W mean", "SM util", "tensor util",
                                      "DRAM util", "SM MHz end", "clock events end"],
              [[name, w.seconds, w.calls, w.energy_per_call_j, w.power_w_mean, w.sm_util, w.tensor_util,
                w.dram_bw_util, w.sm_clock_mhz_end, ",".join(w.clock_events_end or [])]
               for name, w in (("GEMM", on_gemm), ("copy", on_copy))])


def _per_1e3(value: float | None) -> float | None:
    return None if value is None else value / 1e3


def repeatability(sec: Any, dev: torch.device) -> None:
    """Five independent dsnas measurements of one bf16 model at a batch that keeps the GPU busy (256 x 64 tokens)
    and at one where eager calls are bound by the host's launches (32): the medians' coefficient of variation."""
    from dsnas.profiler import measure
    from dsnas.spec import HardwareSpec

    arch = model_arch(1024, 4, 16, "bf16")
    model = convert_model(build(arch).to(dev))
    task = RandomTokens(arch["context"])
    hardware = HardwareSpec(device=dev.type, batch_sizes=(32, 256), warmup_s=0.2, measure_s=0.5, steady_s=0.2,
                            cuda_graphs=True)
    # A fixed GEMM timed before each measurement: if it steps with the model's medians, the device's speed moved;
    # if it holds while they step, the model's own placement or launches did.
    # The host's dispatch speed likewise: eager calls at batch 32 are bound by the host's launches (H200: CV 19%).
    a = torch.randn(GEMM_N, GEMM_N, device=dev, dtype=torch.bfloat16)
    reference_ms, dispatch_us, runs = [], [], []
    for _ in range(5):
        reference_ms.append(statistics.median(event_ms(lambda: a @ a, calls=10, warmup=2)))
        dispatch_us.append(_dispatch_us())
        runs.append(measure(model, task, dev, hardware))
    sec.note(f"reference bf16 GEMM {GEMM_N}^3 before each measurement (CUDA events, median of 10): "
             + ", ".join(f"{m:.4f}" for m in reference_ms)
             + f" ms, CV {statistics.stdev(reference_ms) / statistics.mean(reference_ms):.2%}")
    eager = [metrics["latency_ms_bs32"] for metrics, _ in runs]
    sec.note("host dispatch before each measurement (one tiny CPU torch op, median): "
             + ", ".join(f"{d:.2f}" for d in dispatch_us) + " us; Pearson correlation with the eager batch-32 "
             f"medians: {_correlation(dispatch_us, eager):.2f}")
    for bs, key, what in ((256, "latency_ms", "wall-clock"), (32, "latency_ms", "wall-clock, launch-bound"),
                          (32, "graph_latency_ms", "CUDA-graph replay")):
        ms = [metrics[f"{key}_bs{bs}"] for metrics, _ in runs]
        sec.check(f"5 measurements of a d1024 L4 bf16 model at batch {bs}, {what} median, CV",
                  statistics.stdev(ms) / statistics.mean(ms) * 100, 0, 1.0, unit="%",
                  why="the target for a GPU: " + ", ".join(f"{m:.4f}" for m in ms) + " ms")
    # Where the spread comes from: the device's own time (CUDA events) steady while the wall clock is not points at
    # the host (launches, its allocator, its scheduler); both spread alike point at the GPU (clocks, placement).
    for bs in (256, 32):
        device_ms = [metrics.get(f"device_latency_ms_bs{bs}") for metrics, _ in runs]
        if all(device_ms):
            sec.note(f"batch {bs}: CUDA-event medians {', '.join(f'{m:.4f}' for m in device_ms)} ms, CV "
                     f"{statistics.stdev(device_ms) / statistics.mean(device_ms):.2%} (wall-clock CV above)")
    sec.check("flop_util of the bf16 model at batch 256", runs[0][0].get("flop_util_bs256"), 0.01, 1.0,
              why="against the bf16 tensor-core peak: above 1 is impossible, as the fp32 peak once made it look")
    # The H200's medians fell in two groups 3% apart at the same SM clock: the steady window's power, memory clock,
    # clock-event reasons and temperature, and the share of each timing window the driver held the clocks down for
    # power or heat (dsnas.profiler.gpu_share), say whether the board's state moved between them.
    sec.note("per measurement: " + "; ".join(
        f"{m['throughput_tok_s']:,.0f} tok/s at batch 256, SM clock {m.get('sm_clock_mhz', float('nan')):.0f} MHz, "
        f"memory clock {p.get('window', {}).get('mem_clock_mhz_end', float('nan')):.0f} MHz, "
        f"{m.get('power_w', float('nan')):.0f} W, clock events "
        f"{','.join(p.get('window', {}).get('clock_events_end') or []) or 'none'}, "
        f"{p.get('window', {}).get('temperature_c_end', float('nan')):.0f} C, "
        f"timing windows held down by power or heat (batch 256/32) {_throttled(p, 256)}/{_throttled(p, 32)}"
        for m, p in runs))


def _dispatch_us(calls: int = 2000) -> float:
    """The host's time to dispatch one tiny CPU torch op (an add of two 1-element tensors), median over ``calls``
    in microseconds: the path every eager kernel launch also takes, single-threaded."""
    import time

    x, y = torch.ones(1), torch.ones(1)
    times = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        torch.add(x, y)
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def _correlation(xs: list[float], ys: list[float]) -> float:
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:  # a constant series
        return float("nan")


def _throttled(profile: dict[str, Any], bs: int) -> str:
    share = profile["batches"][str(bs)]["disturbance"].get("gpu_throttled_share")
    return "-" if share is None else f"{share:.0%}"


def co_tenant(sec: Any, dev: torch.device) -> None:
    """A second process looping bf16 GEMMs on this GPU (benchmarks/gpu_co_tenant.py) during a dsnas measurement:
    NVML's per-process samples must show it past the line (dsnas.profiler.gpu_share), and the measurement is
    flagged. How much it slowed the model, against a measurement alone just before, is the evidence for the line."""
    import gpu_co_tenant  # benchmarks/gpu_co_tenant.py, beside this file

    from dsnas.profiler import measure
    from dsnas.profiler.disturbance import GPU_THRESHOLD
    from dsnas.spec import HardwareSpec

    arch = model_arch(512, 2, 8, "bf16")
    model = convert_model(build(arch).to(dev))
    task = RandomTokens(arch["context"])
    hardware = HardwareSpec(device=dev.type, batch_sizes=(32,), warmup_s=0.2, measure_s=0.5, max_measure_s=0.5,
                            steady_s=0.2)
    alone_m, alone_p = measure(model, task, dev, hardware)
    try:
        hog = gpu_co_tenant.start(30)
    except RuntimeError as err:
        sec.fact("a co-tenant process on the GPU", False, "did not start", str(err))
        return
    try:
        shared_m, shared_p = measure(model, task, dev, hardware)
    finally:
        hog.kill()
        hog.wait()
    alone, shared = alone_p["batches"]["32"]["disturbance"], shared_p["batches"]["32"]["disturbance"]
    slowed = shared_m["latency_ms"] / alone_m["latency_ms"]
    sec.check("others' share of the SMs, measured alone", alone.get("others_gpu_share"), 0, GPU_THRESHOLD,
              why=alone.get("gpu_unavailable", "nothing else runs on the GPU"))
    seen = [a.get("others_gpu_share") for a in shared["attempts"]]
    shown = ", ".join("-" if v is None else f"{v:.2f}" for v in seen)
    sec.check("others' share of the SMs beside a process looping GEMMs, least of the attempts",
              None if None in seen else min(seen), GPU_THRESHOLD, 1.0,
              why=shared.get("gpu_unavailable") or f"attempts {shown}; the model took {slowed:.2f}x its time "
              "alone (d512 L2 bf16, batch 32)")
    sec.fact("a measurement beside the co-tenant is flagged disturbed", bool(shared_p.get("disturbed")),
             str(shared_p.get("disturbed")), f"its kept attempt: {shared.get('others_gpu_share')} of the SMs to others")


# --- the engine inside a model, and alone ----------------------------------------------------------------------------

class RandomTokens:
    """The task interface measure() needs, with random token ids: timing does not depend on the data."""

    tokens_per_example: int

    def __init__(self, context: int) -> None:
        self.tokens_per_example = context

    def example_batch(self, batch_size: int, device: Any) -> torch.Tensor:
        gen = torch.Generator().manual_seed(batch_size)
        return torch.randint(0, 256, (batch_size, self.tokens_per_example), generator=gen).to(device)


def model_arch(d_model: int, layers: int, heads: int, precision: str = "fp32", sparsity: str = "dense") -> dict:
    return {"family": "transformer_lm", "vocab_size": 256, "context": 64, "d_model": d_model,
            "layers": [{"n_heads": heads, "ffn_ratio": 4, "precision": precision, "sparsity": sparsity}] * layers}


def convert_model(model: torch.nn.Module, backend: str = "auto") -> torch.nn.Module:
    with torch.no_grad():
        convert(model, int8_backend=backend)
    return model.eval()


def variant_model(v: Variant, ref: torch.nn.Module, arch: dict, x: torch.Tensor) -> tuple[Any, Any]:
    """(model of variant ``v`` with ``ref``'s weights, its fp32 reference: ``ref`` with the same 2:4 masks)."""
    model = build({**arch, "layers": [{**layer, "precision": v.precision, "sparsity": v.sparsity}
                                      for layer in arch["layers"]]}).to(x.device)
    model.load_state_dict(ref.state_dict(), strict=False)
    reference = copy.deepcopy(ref)
    ref_layers = engine_layers(reference)
    for name, layer in engine_layers(model).items():
        if v.sparsity != "dense":
            mask = sparsify_layer(layer, magnitude_scores(layer.weight.detach()))
            with torch.no_grad():
                ref_layers[name].weight.mul_(mask)
    if v.precision == "int8":  # what calibration sets: the largest |input| each layer sees
        seen: dict[str, float] = {}
        hooks = [ref_layers[n].register_forward_pre_hook(
            lambda _m, args, n=n: seen.__setitem__(n, float(args[0].abs().max()))) for n in ref_layers]
        with torch.inference_mode():
            reference(x)
        for h in hooks:
            h.remove()
        for name, layer in engine_layers(model).items():
            layer.act_amax.fill_(seen[name])
    return convert_model(model, v.int8_backend), reference.eval()


def engine_in_model(sec: Any, dry: bool) -> None:
    """Every layer type in a transformer_lm: logits against fp32, the backend each layer ran, and the model's
    latency against the same model in bf16 (fp32 on the CPU)."""
    dev = device_of(dry)
    arch = model_arch(64 if dry else 1024, 2, 4 if dry else 16)
    torch.manual_seed(0)
    ref = build(arch).to(dev).eval()
    x = torch.randint(0, 256, (8 if dry else 32, 64), device=dev)
    base_label = "fp32" if dry else "bf16"
    rows, latency = [], {}
    for v in VARIANTS:
        try:
            model, reference = variant_model(v, ref, arch, x)
            with torch.inference_mode():
                got, want = model(x).float(), reference(x).float()
        except Exception as err:  # the engine refused (a TrialError with its reason) or the device cannot
            rows.append([v.label, "unavailable", "-", "-", f"{type(err).__name__}: {str(err).splitlines()[0]}"[:160]])
            continue
        err = float((got - want).norm() / want.norm())
        backends = sorted({m.backend for m in engine_layers(model).values()})
        reasons = sorted({m.reason for m in engine_layers(model).values() if m.reason})
        shed_training_form(model)  # as dsnas.load ships it: the inference form alone
        latency[v.label] = model_ms(model, x)
        sec.check(f"{v.label}: logits vs fp32, relative L2", err, 0, v.tolerance, why=f"backend {', '.join(backends)}")
        # The weight bytes peak_memory_mb counts against those the device holds (a 2:4 weight: cuSPARSELt's kept
        # half and metadata; an int8 one: its scales and, for torchao, zero points)
        sec.check(f"{v.label}: weight bytes held / counted", held_bytes(model) / inference_size(model)[1], 0.99,
                  1.02, why="inference_size counts what a loaded model holds")
        if v.sparsity != "dense" and v.precision in ("bf16", "fp16") and not dry:
            sec.fact(f"{v.label}: a sparse kernel ran", any(m.sparse_kernel for m in engine_layers(model).values()),
                     ", ".join(backends), "; ".join(reasons))
        rows.append([v.label, ", ".join(backends), err, latency[v.label], "; ".join(reasons)[:300]])
    base = latency.get(base_label)
    for row in rows:
        row.insert(4, "-" if base is None or row[0] not in latency else f"{base / latency[row[0]]:.2f}x")
    sec.table(f"d{arch['d_model']} L2 transformer_lm, batch {tuple(x.shape)}: every linear layer of one type",
              ["layer type", "backends", "logits rel. error", "latency ms", f"speed vs {base_label}", "reason"], rows)
    torchao_rows(sec, dev)


def model_ms(model: torch.nn.Module, x: torch.Tensor) -> float:
    from dsnas.profiler.timing import time_calls

    with torch.inference_mode():
        t = time_calls(lambda: model(x), lambda: sync(x.device), warmup_s=0.1, measure_s=0.2, max_measure_s=1.0,
                       events=torch.cuda.Event if x.is_cuda else None)
    return t.device_median_ms or t.median_ms


def torchao_rows(sec: Any, dev: torch.device) -> None:
    """Whether torchao's dynamic INT8 layer runs an int8 GEMM (aten::_int_mm) at each row count, or falls back."""
    from torch.profiler import ProfilerActivity, profile

    from dsnas.kernels.quant import Int8Linear

    try:
        _import_torchao()
    except Exception as err:  # not installed, or built for another torch release
        sec.note(f"torchao rows: torchao does not import here ({type(err).__name__}: {err})")
        return
    weight = torch.randn(1024, 1024, device=dev) / 32
    layer = Int8Linear.from_float(weight, None, None, "torchao-dynamic")
    rows = []
    for n in (1, 16, 17, 256):
        x = torch.randn(n, 1024, device=dev)
        with torch.inference_mode():
            layer(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                layer(x)
        ops = {e.name for e in prof.events()}
        # torchao reaches the int8 GEMM through out_dtype(aten.mm): a plain aten::mm is its fp32 fallback.
        fallback = "aten::mm" in ops
        kind = "a fallback matmul (aten::mm)" if fallback else "int8 GEMM (aten::_int_mm)" if any(
            "_int_mm" in op for op in ops) else "neither: see the ops"
        rows.append([n, kind, ", ".join(sorted(op for op in ops if "mm" in op or "linear" in op))[:200]])
    sec.table("torchao Int8DynamicActivationInt8WeightConfig, 1024x1024, what runs per row count",
              ["rows", "kernel", "matmul-like ops seen"], rows)


def launch_costs(sec: Any, dry: bool) -> None:
    """Each layer type at 16 rows, where the device has little to do: how many kernels a call launches, the host's
    time until the call returns, the call's time to a synchronized end, and the kernels' own time. On the H200
    (2026-12-04) fp8 and int8-static took ~150 us a call at 16 rows at every shape, 2:4 ~580 us and bf16 8 us;
    a host time near the call's time, far above the kernels', says the launches bound it."""
    import time

    import kernels as kb

    from dsnas.profiler.measure import _kernels
    from dsnas.profiler.timing import call_ms

    dev = device_of(dry)
    n = 64 if dry else 1024
    x = torch.randn(16, n, device=dev, dtype=torch.float32 if dry else torch.bfloat16)
    kinds = kb.CPU_KINDS[1:] if dry else (*kb.CUDA_KINDS, Kind("2:4 fp8", "fp8", "2:4"))

    def cost(label: str, backend: str, fn: Any) -> list[Any]:
        host, call = [], []
        with torch.inference_mode():
            for _ in range(5):
                fn(x)
            for _ in range(30):
                sync(dev)
                start = time.perf_counter_ns()
                fn(x)
                host.append((time.perf_counter_ns() - start) / 1e3)
                sync(dev)
                call.append(call_ms(lambda: fn(x), lambda: sync(dev)) * 1e3)
            seen = _kernels(fn, x, dev, top=100)  # every kernel (CPU: operator) with its number of calls
        top = seen.get("top", [])
        return [label, backend, sum(k["calls"] for k in top) or "-", statistics.median(host),
                statistics.median(call), "-" if dry else seen.get("total_us", "-"),
                ", ".join(f"{k['name']} x{k['calls']}" for k in top[:4])[:160]]

    rows = []
    for kind in kinds:
        layer, why = kb.build_or_reason(kind, n, n, dev, {16: x})
        if layer is None:
            rows.append([kind.label, "unavailable", "-", "-", "-", "-", why[:120]])
            continue
        rows.append(cost(kind.label, layer.backend, layer))
        for name, fn in _library_calls(layer, x):  # the library call alone: what the layer adds around it
            label = f"{kind.label}: {name}"
            try:  # a private torch call whose signature differs in this torch: a row saying so, not the table lost
                rows.append(cost(label, "library call alone", fn) if callable(fn)
                            else [label, "unavailable", "-", "-", "-", "-", fn[:120]])
            except (RuntimeError, TypeError) as e:
                rows.append([label, "unavailable", "-", "-", "-", "-", f"{type(e).__name__}: {e}"[:120]])
    sec.table(f"one call at 16 rows, {n}x{n}: launches, host time to return, synchronized call time, kernel time",
              ["layer type", "backend", "operators" if dry else "kernel launches", "host us", "call us",
               "kernel us", "longest"], rows)


def _library_calls(layer: Any, x: torch.Tensor) -> list[tuple[str, Any]]:
    """The GEMM library call inside an fp8, int8-static or cuSPARSELt layer, on operands prepared once, each as a
    function of x (ignored), or why it cannot run: what the call costs without the layer's quantization, casts and
    Python around it. For 2:4, also with the algorithm cuSPARSELt's own search picks (torch's default is 0)."""
    from dsnas.kernels.quant import fp8_quantize_rows

    inner = layer.inference
    if hasattr(inner, "weight_fp8"):
        values, scale = fp8_quantize_rows(x.reshape(-1, inner.in_features))
        return [("torch._scaled_mm", lambda _x: torch._scaled_mm(
            values, inner.weight_fp8.t(), scale_a=scale, scale_b=inner.weight_scale, bias=inner.bias,
            out_dtype=torch.bfloat16, use_fast_accum=inner.fast_accum))]
    kernel = getattr(inner, "kernel", None)
    if hasattr(kernel, "weight_int8"):
        q = torch.zeros(17, x.shape[-1], dtype=torch.int8, device=x.device)  # as the layer pads 16 rows to 17
        return [("torch._int_mm", lambda _x: torch._int_mm(q, kernel.weight_int8.t()))]
    packed = getattr(getattr(inner, "weight", None), "packed", None)
    if packed is None:
        return []
    weight = inner.weight
    dense_t = x.to(inner.dtype).t()
    calls = [("torch._cslt_sparse_mm", lambda _x: torch._cslt_sparse_mm(
        packed, dense_t, transpose_result=True, alg_id=weight.alg_id_cusparselt))]
    try:
        alg = torch._cslt_sparse_mm_search(packed, dense_t)
    except (RuntimeError, TypeError) as e:
        return [*calls, ("searched algorithm", f"the search failed: {type(e).__name__}: {e}")]
    calls.append((f"torch._cslt_sparse_mm, searched algorithm {alg}", lambda _x: torch._cslt_sparse_mm(
        packed, dense_t, transpose_result=True, alg_id=alg)))
    return calls


def engine_layers_alone(sec: Any, dry: bool) -> None:
    """Each layer type alone at three shapes up to 8192x8192, against dense bf16 F.linear (fp32 on the CPU), with
    L2 flushed before every timed call (benchmarks/kernels.py's sweep, paired and interleaved)."""
    import kernels as kb

    dev = device_of(dry)
    extra = (Kind("2:4 fp16", "fp16", "2:4"), Kind("2:4 fp8", "fp8", "2:4"))
    if dry:
        sweep = kb.Sweep(kb.CPU_KINDS[1:], dev, torch.float32, "fp32 F.linear",
                         lambda fn, x: kb.cpu_timer(fn, x, 0.002), 3)
        shapes, rows = [("64^2", 64, 64), ("128^2", 128, 128), ("256^2", 256, 256)], (32,)
    else:
        l2 = torch.cuda.get_device_properties(dev).L2_cache_size
        buffer = torch.empty(max(2 * l2, 256 * 2**20), dtype=torch.uint8, device=dev)
        sweep = kb.Sweep(kb.CUDA_KINDS + extra, dev, torch.bfloat16, "bf16 F.linear",
                         lambda fn, x: kb.cuda_timer(fn, x, buffer.zero_), 7)
        shapes, rows = [("1024^2", 1024, 1024), ("4096^2", 4096, 4096), ("8192^2", 8192, 8192)], (16, 4096)
    table = []
    for label, in_f, out_f in shapes:
        for row in kb.sweep_shape(sweep, label, in_f, out_f, rows):
            cells = [f"{row['cells'][r][0] * 1e6:.1f} us, {row['cells'][r][1]:.2f}x" if r in row["cells"] else "-"
                     for r in rows]
            table.append([label, row["kind"], row["backend"], *cells, (row["reason"] or row["note"])[:200]])
        if not dry:
            torch.cuda.empty_cache()
    sec.table(f"layer types alone against {sweep.baseline} (time, speed ratio; > 1 is faster)",
              ["shape", "layer type", "backend", *[f"rows {r}" for r in rows], "reason"], table)


# --- training on the device ---------------------------------------------------------------------------------------

def training(sec: Any, dry: bool) -> None:
    """fp16 with loss scaling and one forced overflow in one layer: that step is skipped, the layer computes in fp32
    for fallback_steps steps and returns to fp16, no other layer falls back, and the loss still falls. bf16 (fp32's
    range: nothing to force) trains without a fallback."""
    from dsnas.kernels.precision import TrainStep

    dev = device_of(dry)
    for precision in ("fp16", "bf16"):
        torch.manual_seed(0)
        model = build(model_arch(32 if dry else 256, 2, 2 if dry else 4, precision)).to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        step = TrainStep(model, opt, fallback_steps=5)
        victim = model.blocks[0].up
        forced = 10 if precision == "fp16" else None
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (8, 65), generator=gen).to(dev)  # one batch, learnt by heart: the loss must fall
        losses, dtypes, skipped = [], {}, []
        for i in range(40):
            # 1e6 x a layer-normed input is finite in fp32 and beyond fp16's 65504 once cast.
            hook = victim.register_forward_pre_hook(lambda _m, args: (args[0] * 1e6,)) if i == forced else None
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
            if hook is not None:
                hook.remove()
            dtypes[i] = victim.compute_dtype
            if not step.step(loss):
                skipped.append(i)
            losses.append(float(loss))
        others = [m.fallbacks for m in engine_layers(model).values() if m is not victim]
        want = 1 if forced is not None else 0
        sec.check(f"{precision}: steps skipped", len(skipped), want, want,
                  why=f"skipped steps {skipped}; overflow forced at step {forced}")
        sec.check(f"{precision}: fallbacks of the overflowed layer", victim.fallbacks, want, want)
        sec.check(f"{precision}: fallbacks of the other layers", sum(others), 0, 0,
                  why="the layers after it see its inf input: not theirs to blame")
        if forced is not None:
            sec.fact(f"{precision}: the layer computed fp32 after the overflow, then its dtype again",
                     dtypes[forced + 1] == torch.float32 and dtypes[forced + 10] != torch.float32,
                     f"step {forced + 1} {dtypes[forced + 1]}, step {forced + 10} {dtypes[forced + 10]}")
            sec.fact(f"{precision}: loss scaling on", step.scaler.is_enabled(), f"scale {step.scaler.get_scale():g}")
        finite = [v for v in losses if v == v and abs(v) != float("inf")]
        sec.check(f"{precision}: last loss / first loss", finite[-1] / finite[0], 0, 0.7,
                  why="40 steps on one batch: the loss must fall")
        step.close()
