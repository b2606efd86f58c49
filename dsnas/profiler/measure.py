"""Measure a trained model on the device that trained it: at each configured batch size the timing protocol
(wall and, on a GPU, device time), peak memory, counted FLOPs and bytes with the achieved rates against the
device's ceilings; on an NVIDIA GPU a steady window with NVML/GPM figures; and how each number was obtained."""

from __future__ import annotations

import datetime
import re
from dataclasses import replace
from typing import Any

from dsnas.allocator import hold_freed_memory
from dsnas.profiler import host_speed
from dsnas.profiler.capabilities import usable_cpus
from dsnas.profiler.ceilings import ceilings, gpu_peaks
from dsnas.profiler.counting import PRECISION_OF, count_work
from dsnas.profiler.device import fingerprint, fingerprint_id, short_hash
from dsnas.profiler.disturbance import MachineWindow, Share, least_disturbed, sample_share, settle_s, wait_for_quiet
from dsnas.profiler.memory import CPU_METHOD, CUDA_METHOD, _native_stderr_silenced, peak_memory
from dsnas.profiler.nvml import nvml_handle
from dsnas.profiler.timing import Timing, cpu_threads, time_calls
from dsnas.profiler.utilization import effective_peak, weights_dtype
from dsnas.profiler.window import measure_window

# The timing protocol's settings: a measurement taken under others is another number (see measurement_key).
PROTOCOL_KEYS = ("warmup_s", "measure_s", "max_measure_s", "ci_tolerance", "cuda_graphs", "steady_s")
# Figures of the largest batch size that also stand for the whole trial (besides latency at the smallest).
AT_LARGEST = ("gflop_s", "gb_s", "flop_util", "bw_util", "flops_per_token")


def _size(model: Any) -> tuple[int, int]:
    """(parameters, weight bytes at inference) of the model as it runs (see dsnas.kernels.convert)."""
    from dsnas.kernels.convert import inference_size  # torch loads on first use

    return inference_size(getattr(model, "_orig_mod", model))


def _backend(model: Any) -> tuple[str, str]:
    """What runs: "eager-fp32" (a plain model: its weights' precision), or the engine layers' backends (e.g.
    "engine:fp32+int8:torch-dynamic") and "mixed" when their precisions differ; "compiled-" in front under
    torch.compile. At most 64 characters."""
    from dsnas.kernels.linear import engine_layers  # torch loads on first use

    eager = getattr(model, "_orig_mod", model)
    layers = engine_layers(eager).values()
    backends = sorted({m.backend for m in layers})
    precisions = {m.precision for m in layers}
    plain = weights_dtype(eager)  # a model of the user's in bf16, say, has no engine layer to say so
    name = f"eager-{PRECISION_OF.get(plain, plain)}" if backends in ([], ["fp32"], ["dense"]) else \
        "engine:" + "+".join(backends)
    name = ("compiled-" if eager is not model else "") + name
    dtype = plain if precisions <= {"fp32"} else (precisions.pop() if len(precisions) == 1 else "mixed")
    return name[:64], dtype


def measure(model: Any, task: Any, device: Any, hardware: Any, cached: dict[str, Any] | None = None,
            context: dict[str, Any] | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Returns (numeric metrics, profile). The caller holds the device exclusively. ``cached``: what this
    architecture measured before, per fingerprint id (dsnas.tables.cached_figures); an entry of this
    device whose measurement key (measurement_key) matches at every batch size is reused instead of measuring
    again. ``context``: the other settings that made the model (the engine's), part of the key."""
    import torch

    from dsnas.kernels.convert import inference_signature  # torch loads on first use

    fp = fingerprint(device)
    params = float(_size(model)[0])
    threads = (hardware.threads or usable_cpus()) if device.type == "cpu" else None
    signature = inference_signature(model)
    allocator = hold_freed_memory()  # before anything is timed; it stays so for this process
    key = measurement_key(signature, hardware, threads, context, allocator["policy"])
    entry = (cached or {}).get(fingerprint_id(fp))
    stale = _stale(entry, key, hardware)
    if entry and not stale:
        # What the key fixes (the allocator's policy, the measuring rules' memory method) and what the reused
        # batches record (their disturbance): a hit left them out, and report warned of two memory definitions,
        # verify would not compare a hit's speed ("allocator not recorded").
        metrics, profile = _reuse(entry, fp, params, hardware)
        profile.update(signature=signature, measurement_key=key, allocator=allocator,
                       memory_method=CUDA_METHOD if device.type == "cuda" else CPU_METHOD)
        for batch in profile["batches"].values():
            if isinstance(batch.get("disturbance"), dict) and "disturbed" in batch["disturbance"]:
                _add_disturbance(profile, batch["disturbance"])
        if profile.setdefault("disturbed", None) is not None:
            metrics["disturbed"] = float(profile["disturbed"])
        return metrics, profile
    backend, dtype = _backend(model)
    profile: dict[str, Any] = {"fingerprint": fp, "batches": {}, "backend": backend, "dtype": dtype,
                               "signature": signature, "measurement_key": key, "allocator": allocator,
                               "measured_at": _utc_now(),
                               "unavailable": {},
                               "cache": {"hit": False, **({"why": stale} if entry else {})}}
    batches: dict[int, dict[str, Any]] = {}
    eval_mode(model)
    with cpu_threads(threads) as used, torch.inference_mode(), current_device(device):
        profile["threads"] = used if device.type == "cpu" else None
        ceilings = _ceilings(device, fp, used, profile)
        # On a GPU, NVML watches the device too (the timing windows, the steady window): looked up once.
        gpu = nvml_handle(device) if device.type == "cuda" else None
        per_example = getattr(task, "tokens_per_example", 1)  # what throughput counts (dsnas.tasks.Task)
        weight_bytes = _weight_bytes(model, task.example_batch(min(hardware.batch_sizes), device), profile)
        for bs in sorted(hardware.batch_sizes):
            batch = task.example_batch(bs, device)
            figures, timing, missing = _measure_batch(model, batch, bs * per_example, device, hardware, ceilings, gpu,
                                                      weight_bytes)
            if gpu is not None and bs == max(hardware.batch_sizes):
                figures.update(_steady_window(model, batch, device, hardware, profile, gpu))
            if hardware.kernels:
                profile.setdefault("kernels", {})[str(bs)] = _kernels(model, batch, device)
            batches[bs] = figures
            # What this batch size could not give, kept with it: a reuse from the cache says it again.
            profile["batches"][str(bs)] = {**timing, **figures, "measurement_key": key,
                                           **({"unavailable": missing} if missing else {})}
            _add_disturbance(profile, timing["disturbance"])
            profile["unavailable"].update(missing)
            if "peak_memory_mb" in missing:
                profile["memory_unavailable"] = missing["peak_memory_mb"]
    profile["memory_method"] = CUDA_METHOD if device.type == "cuda" else CPU_METHOD
    if device.type == "cpu":
        profile["peak_rss_mb"] = _peak_rss_mb()  # the worker process's, training included: context only
    metrics = metrics_from_batches(batches, params, hardware)
    if profile["disturbed"] is not None:
        metrics["disturbed"] = float(profile["disturbed"])  # numeric, so that the trial table shows it
    return metrics, profile


def eval_mode(model: Any) -> Any:
    """``model`` in eval mode, where its mode can be switched. torch.export's module (``ExportedProgram.module()``)
    refuses eval() with NotImplementedError: its graph runs in the mode it was exported in, and is measured as it
    is (dsnas.measure took the refusal for the model failing on a batch, and said its first dimension was not one);
    every other module of the model is set to eval."""
    try:
        return model.eval()
    except NotImplementedError:
        for module in model.modules():
            module.training = False  # train() stopped at the exported module: the modules after it were left as is
        return model


def current_device(device: Any) -> Any:
    """On ``cuda:N``, that GPU as torch's current device while it is measured: CUDA events and graph capture use the
    current device's stream, and on cuda:1 they timed cuda:0's (device ms read the launch time, 0.02 ms for 5 ms of
    kernels). Nothing to do elsewhere."""
    import contextlib

    import torch

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _utc_now() -> str:
    """When a measurement's timings were taken, as stored with it (ISO 8601, UTC)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# The rules a measured figure is made by (its counts' formulas, what a byte or a peak is, the timing's checks):
# raised whenever one changes, so that the measurement cache never hands out a figure made by older rules. The
# version of dsnas has not changed in its life, and a study of an older one handed its trials' byte counts (by
# the embedding rule since fixed: 400,896 where 372,224 are read) to new trials. 3: flop_util's peaks by each op's
# precision; a torch.ao quantized layer's packed weights counted. 4: eval-mode dropout moves no bytes. 5: a
# semi-structured 2:4 weight (GPU) counted at the bytes it holds, not at its dense shape; the fp32 masters a model's
# own forward reads counted in its peak memory.
MEASUREMENT_RULES = 5


def measurement_key(signature: dict[str, Any], hardware: Any, threads: int | None,
                    context: dict[str, Any] | None, allocator: str) -> str:
    """Everything besides the architecture and the device fingerprint that changes a measured number: the
    inference form, the timing protocol (with the allocator's policy, dsnas.allocator), the thread count, the
    settings that made the model and the measuring rules (MEASUREMENT_RULES)."""
    protocol = {**{k: getattr(hardware, k) for k in PROTOCOL_KEYS}, "allocator": allocator}
    return short_hash({"form": signature, "protocol": protocol, "threads": threads, "context": context or {},
                       "rules": MEASUREMENT_RULES})


def _stale(entry: dict[str, Any] | None, key: str, hardware: Any) -> str:
    """Why a cache entry of this architecture and device cannot stand for this measurement ('' when it can)."""
    if not entry:
        return "nothing stored"
    if hardware.kernels:  # a reused figure would come without the table asked for
        return "the per-kernel table (kernels = true) was asked for, which the cache does not keep"
    for bs in hardware.batch_sizes:
        stored = entry["batches"].get(str(bs))
        if stored is None:
            return f"batch size {bs} was not measured"
        if stored["figures"].get("measurement_key") != key:
            return (f"batch size {bs} was measured with another inference form, protocol, thread count or engine "
                    "setting, or by older measuring rules (measurement key)")
        if (stored.get("timing") or {}).get("disturbance", {}).get("disturbed"):
            return (f"batch size {bs} was measured while other processes took the CPUs or the GPU, or the host ran "
                    "slow (disturbed)")
    return ""


def _reuse(entry: dict[str, Any], fp: dict[str, Any], params: float,
           hardware: Any) -> tuple[dict[str, float], dict[str, Any]]:
    stored = {bs: entry["batches"][str(bs)] for bs in hardware.batch_sizes}
    # Labelled by the batches reused (one measurement key: the same threads, backend and dtype), from every trial
    # whose figures they are, and as old as the oldest of them.
    used = list(stored.values())
    labels = {**entry.get("profile", {}), **used[0].get("profile", {})}
    measured = [b["profile"]["measured_at"] for b in used if "measured_at" in b.get("profile", {})]
    if measured:
        labels["measured_at"] = min(measured)
    by_batch = {str(bs): b.get("source") or entry.get("source", "") for bs, b in stored.items()}
    sources = "; ".join(dict.fromkeys(by_batch.values()))
    profile = {**labels, "fingerprint": fp, "cache": {"hit": True, "from": sources, "from_by_batch": by_batch},
               "batches": {str(bs): {**b["timing"], **b["figures"]} for bs, b in stored.items()}}
    # What the measurement could not give (no flop_util, and why): a reuse dropped it, and said nothing of it.
    profile["unavailable"] = {k: v for b in used for k, v in (b["figures"].get("unavailable") or {}).items()}
    if "peak_memory_mb" in profile["unavailable"]:
        profile["memory_unavailable"] = profile["unavailable"]["peak_memory_mb"]
    return metrics_from_batches({bs: b["figures"] for bs, b in stored.items()}, params, hardware), profile


def _weight_bytes(model: Any, batch: Any, profile: dict[str, Any]) -> int:
    """The weight bytes the model holds as dsnas.load ships it: those its inference form reads, and the fp32
    masters its own forward still reads (a user's model calling F.linear on a layer's weight), which the load keeps
    (said in the profile's ``masters_read``)."""
    from dsnas.kernels.convert import masters_read_bytes  # torch loads on first use

    eager = getattr(model, "_orig_mod", model)  # a compiled model's shed attributes would only recompile it
    masters = masters_read_bytes(eager, lambda: eager(batch))
    if masters:
        profile["masters_read"] = (f"the model's own forward reads engine layers' fp32 masters: {masters:,} bytes "
                                   "of them counted in peak memory, as dsnas.load keeps them")
    return _size(model)[1] + masters


def _measure_batch(model: Any, batch: Any, tokens: int, device: Any, hardware: Any, ceilings: dict[str, Any],
                   gpu: tuple[Any, str] | None,
                   weight_bytes: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(numeric figures of one batch size, its timing statistics, why a figure is missing: name -> reason).
    ``gpu``: (NVML handle, why there is none) on a GPU, None on a CPU; ``weight_bytes``: _weight_bytes'."""
    import torch

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    # On the CPU the host's speed is probed at both ends of the window: a slowed host slows the timed calls
    # themselves. A GPU's timing is the device's and the host's launch path, which a CPU GEMM does not stand for.
    reference = None if cuda else ceilings.get("reference_ms")

    def probe() -> float | None:
        return host_speed.slowdown(reference) if reference else None

    # On a GPU, NVML watches the timing window too: another process's kernels share its SMs
    # (dsnas.profiler.gpu_share).
    def attempt() -> tuple[Timing, Share]:
        window = MachineWindow(gpu)
        before = probe()
        timing = time_calls(lambda: model(batch), sync, warmup_s=hardware.warmup_s, measure_s=hardware.measure_s,
                            max_measure_s=hardware.max_measure_s, ci_tolerance=hardware.ci_tolerance,
                            events=torch.cuda.Event if cuda else None, window=window)
        after = probe()
        worst = None if before is None or after is None else max(before, after)
        return timing, replace(window.share, host_slowdown=worst)

    # Others busy on the CPUs, or a slowed host, while timing: wait for it to pass and measure again; keep the
    # least disturbed.
    timing, disturbance = least_disturbed(attempt, lambda: wait_for_quiet(
        settle_s(hardware.measure_s), sample=lambda s: replace(sample_share(s, gpu), host_slowdown=probe())))
    peak = peak_memory(lambda: model(batch), device, weight_bytes)
    eager = getattr(model, "_orig_mod", model)  # a torch.compile'd model counts as its eager self: same algorithm
    seconds = timing.median_ms / 1e3
    figures: dict[str, Any] = {"latency_ms": timing.median_ms, "throughput_tok_s": tokens / seconds,
                               "peak_memory_mb": None if peak.bytes is None else peak.bytes / 2**20}
    missing: dict[str, str] = {}
    if not cuda and not reference:
        # Said, as a share is: a slowed host shows in neither share, and the attempts were judged on them alone.
        missing["host_slowdown"] = ("not probed: " + (f"{ceilings['unusable']}, and no host-speed reference is "
                                                      "kept from them" if "unusable" in ceilings else
                                                      "no host-speed reference is stored with the CPU ceilings")
                                    + "; disturbed reads others' CPU share alone")
    if peak.bytes is None:
        missing["peak_memory_mb"] = peak.reason
    if timing.device_median_ms is not None:
        figures["device_latency_ms"] = timing.device_median_ms
    try:
        figures.update(_counted(count_work(lambda: eager(batch)), tokens, seconds, ceilings, missing))
    except Exception as e:  # an op no counter can run under (torch.cond, flex_attention): timed, not counted
        # The failed count left torch.cond's compiled graph unusable: the next batch size's calls failed.
        torch._dynamo.reset()
        first = re.sub(r" at 0x[0-9a-f]+", "", str(e).strip().splitlines()[0] if str(e).strip() else "")
        why = f"the model's ops could not be counted ({type(e).__name__}: {first[:160]})"
        missing.update({"flops": why, "bytes": why})
    if cuda and hardware.cuda_graphs:
        figures["graph_latency_ms"] = _graph_latency(model, batch, device, hardware).median_ms
    return figures, {**timing.as_dict(), "disturbance": disturbance}, missing


def _counted(counts: Any, tokens: int, seconds: float, ceilings: dict[str, Any],
             missing: dict[str, str]) -> dict[str, float]:
    """The figures of one call's counts (dsnas.profiler.counting.Counts) over its median time; what is missing
    goes into ``missing``, with why."""
    flops, nbytes = counts.flops, counts.bytes
    figures = {"flops": float(flops), "bytes": float(nbytes), "flops_per_token": flops / tokens,
               "gflop_s": flops / seconds / 1e9, "gb_s": nbytes / seconds / 1e9}
    peak, why = effective_peak(counts.flops_at, ceilings["by_precision"])
    if counts.uncounted:  # matrix or attention ops with no FLOP formula: the count is short by their work, and
        # a share of a peak of the part counted read as a figure (5e-7 for a quantized conv model)
        missing["flops of"] = ", ".join(counts.uncounted)
        missing["flop_util"] = f"part of the work was not counted ({missing['flops of']})"
    elif why:  # a precision without a peak here: said first, as it holds on any day
        missing["flop_util"] = why
    elif "unusable" in ceilings:
        missing["flop_util"] = ceilings["unusable"]
    elif peak:
        figures["flop_util"] = figures["gflop_s"] / peak  # both GFLOP/s
    if "unusable" in ceilings:
        missing["bw_util"] = ceilings["unusable"]
    elif "gb_s" in ceilings:
        figures["bw_util"] = figures["gb_s"] / ceilings["gb_s"]
    return figures


def _add_disturbance(profile: dict[str, Any], record: dict[str, Any]) -> None:
    """The profile's ``disturbed``: any batch size still disturbed after its attempts; None while every batch
    size's share is unknown (no /proc/stat), with the reason under ``unavailable``."""
    if record["disturbed"] is None:
        profile["unavailable"]["disturbance"] = record.get("unavailable", "unknown")
        profile.setdefault("disturbed", None)
    else:
        profile["disturbed"] = bool(profile.get("disturbed")) or record["disturbed"]
    if "gpu_unavailable" in record:  # the host's reading stands; what NVML could not tell is said
        profile["unavailable"]["gpu disturbance"] = record["gpu_unavailable"]


def metrics_from_batches(batches: dict[int, dict[str, Any]], params: float, hardware: Any) -> dict[str, float]:
    """Flat trial metrics: every figure per batch size (``NAME_bsN``), latency at the smallest batch size,
    throughput and the achieved rates at the largest, peak memory over all, and the steady window's figures."""
    small, large = min(batches), max(batches)
    metrics: dict[str, float] = {"params": params}
    for bs, figures in batches.items():
        for name, value in figures.items():
            if isinstance(value, (int, float)) and not name.startswith("window_"):
                metrics[f"{name}_bs{bs}"] = float(value)
    metrics["latency_ms"] = metrics[f"latency_ms_bs{small}"]
    metrics["throughput_tok_s"] = metrics[f"throughput_tok_s_bs{large}"]
    for name in AT_LARGEST:
        if f"{name}_bs{large}" in metrics:
            metrics[name] = metrics[f"{name}_bs{large}"]
    peaks = [f["peak_memory_mb"] for f in batches.values() if f.get("peak_memory_mb") is not None]
    if peaks:
        metrics["peak_memory_mb"] = max(peaks)
    metrics.update({k.removeprefix("window_"): float(v) for k, v in batches[large].items()
                    if k.startswith("window_") and isinstance(v, (int, float))})
    return metrics


def _ceilings(device: Any, fp: dict[str, Any], threads: int, profile: dict[str, Any]) -> dict[str, Any]:
    """What the device could do at best, to put achieved rates in proportion: measured once per CPU
    fingerprint (an fp32 GEMM and a streaming loop: no other precision has a measured CPU ceiling yet), or the
    GPU's datasheet peaks per precision, derived from its clocks and units."""
    if device.type == "cpu":
        found = ceilings(fp, threads)
        profile["ceilings"] = found.as_dict()
        out = {"by_precision": {"fp32": found.gemm_gflop_s}, "gb_s": found.stream_gb_s,
               "reference_ms": found.reference_ms}
        if "disturbed" in found.details:  # too low by others' share: flop_util read 0.77 where 0.30 was true
            out.update(unusable=f"the CPU ceilings were not measured undisturbed ({found.details['disturbed']})",
                       reference_ms=None)
        return out
    peaks = gpu_peaks(device)
    profile["ceilings"] = peaks.as_dict()
    out: dict[str, Any] = {"by_precision": peaks.by_precision()}
    if peaks.memory_gb_s is not None:
        out["gb_s"] = peaks.memory_gb_s
    return out


def _steady_window(model: Any, batch: Any, device: Any, hardware: Any, profile: dict[str, Any],
                   gpu: tuple[Any, str]) -> dict[str, Any]:
    """NVML/GPM over a window of at least ``steady_s`` looping the model; figures prefixed ``window_``. ``gpu``:
    (NVML handle, why there is none)."""
    import torch

    handle, reason = gpu
    if handle is None:
        profile["unavailable"]["nvml"] = reason
        return {}
    window = measure_window(handle, lambda: model(batch), lambda: torch.cuda.synchronize(device),
                            min_s=hardware.steady_s)
    profile["window"] = window.as_profile()
    profile["unavailable"].update(window.unavailable)
    return {f"window_{k}": v for k, v in window.as_metrics().items()}


def _graph_latency(model: Any, batch: Any, device: Any, hardware: Any) -> Timing:
    """Latency of replaying a captured CUDA graph: the model without the host's launch overhead."""
    import torch

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up on a side stream, as capture requires
            model(batch)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(batch)
    return time_calls(graph.replay, lambda: torch.cuda.synchronize(device), warmup_s=hardware.warmup_s,
                      measure_s=hardware.measure_s, max_measure_s=hardware.max_measure_s,
                      ci_tolerance=hardware.ci_tolerance, events=torch.cuda.Event)


def _kernels(model: Any, batch: Any, device: Any, top: int = 10) -> dict[str, Any]:
    """The top kernels (CUDA) or operators (CPU) of one profiled call; an empty event list means the
    profiler could not see them, and says so."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _native_stderr_silenced(), profile(activities=activities) as prof:
        model(batch)
        if cuda:
            import torch

            torch.cuda.synchronize(device)
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = [e for e in events if getattr(e, key, 0) > 0]
    if cuda:
        # The kernels themselves: a CPU operator's self device time is the time of the kernels it launched, so
        # listing both would count every GEMM twice.
        rows = [e for e in rows if "CUDA" in str(e.device_type)]
    if not rows:
        return {"unavailable": f"the profiler recorded no {'kernel' if cuda else 'operator'} events"}
    rows.sort(key=lambda e: getattr(e, key), reverse=True)
    return {"kind": "cuda kernels" if cuda else "cpu operators", "count": len(rows),
            "total_us": sum(getattr(e, key) for e in rows),  # one call: at most its latency, or counted twice
            "top": [{"name": e.key, "calls": e.count, "self_us": getattr(e, key)} for e in rows[:top]]}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
