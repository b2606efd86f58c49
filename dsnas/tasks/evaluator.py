"""A user's own evaluation function as the task: the object a `[task] name = "module:callable"` factory returns may
define ``evaluate_arch`` instead of train/evaluate, and then dsnas builds no model: the function returns the
trial's metrics (trained and measured its own way, or looked up in a table of recorded results). That is enough to
run a search, multi-fidelity included, and benchmarks/search_efficiency.py on a table of one's own.

The protocol::

    def arch_defaults(self) -> dict                 # architecture keys the task fixes (may be {})
    def fingerprint(self) -> dict                   # what the results are of (data, table, device)
    def evaluate_arch(self, arch, *, seed, rungs, report) -> dict[str, float]
    def count_arch(self, arch, batch_sizes) -> dict[str, float]   # optional: flops_bsN, bytes_bsN, params

``evaluate_arch`` returns every objective and limit the study names (``accuracy``, ``throughput_tok_s``,
``latency_ms``, ...) and, for the profile, ``latency_ms_bsN`` per batch size (with ``flops_bsN``, ``bytes_bsN``,
``peak_memory_mb_bsN`` where known). With ``rungs`` (shares of the training budget; empty without them) it calls
``report(0, hardware_metrics)`` before training and ``report(k, metrics)`` after share ``rungs[k - 1]``; ``report``
raises when the driver stops the trial, and the trial is PRUNED."""

from __future__ import annotations

import time
from typing import Any

from dsnas.rungs import RungReport, RungStop


def is_evaluator(task: Any) -> bool:
    return callable(getattr(task, "evaluate_arch", None))


def evaluate_with(task: Any, request: Any) -> Any:
    """The worker's side of a trial whose task evaluates architectures itself."""
    from dsnas.evaluate import TrialResult, worker_identity

    started = time.perf_counter()
    known: dict[str, float] = {}  # what the function reported so far
    hardware: dict[str, float] = {}  # what it reported before training: all a pruned trial keeps

    def report(rung: int, metrics: dict[str, Any]) -> None:
        known.update({k: float(v) for k, v in metrics.items()})
        if rung == 0:
            hardware.update(known)
        if request.rungs is None or request.channel is None:
            return  # no multi-fidelity in this study: every trial goes on
        fraction = 0.0 if rung == 0 else request.rungs[rung - 1]
        sent = RungReport(request.trial, rung, fraction, dict(known))
        if not request.channel.ask(sent):
            raise RungStop(sent)

    try:
        metrics = {k: float(v) for k, v in task.evaluate_arch(request.arch, seed=request.seed,
                                                             rungs=tuple(request.rungs or ()),
                                                             report=report).items()}
        pruned = None
    except RungStop as stop:
        metrics, pruned = {**hardware, "trained_fraction": stop.report.fraction}, stop.report
    profile = {**recorded_profile(metrics, request.hardware, task), "worker": worker_identity()}
    return TrialResult(metrics={**metrics, "trial_s": time.perf_counter() - started}, profile=profile,
                       pruned=pruned)


def recorded_profile(metrics: dict[str, float], hardware: Any, task: Any) -> dict[str, Any]:
    """The profile of figures dsnas did not measure: each batch size's latency as one sample, on a "device"
    named by the task's fingerprint, so that the measurement table, the cache and the predictor can use them while
    every row says where it came from."""
    batches = {}
    for bs in hardware.batch_sizes:
        ms = metrics.get(f"latency_ms_bs{bs}")
        if ms is None:
            continue
        figures = {name: metrics[f"{name}_bs{bs}"] for name in ("flops", "bytes", "peak_memory_mb", "throughput_tok_s")
                   if f"{name}_bs{bs}" in metrics}
        batches[str(bs)] = {"median_ms": ms, "p10_ms": ms, "p90_ms": ms, "spread": 0.0, "repeats": 1,
                            "latency_ms": ms, **figures}
    source = task.fingerprint()
    return {"fingerprint": {"device": "recorded", "source": source}, "batches": batches, "backend": "recorded",
            "dtype": "recorded", "threads": None, "task": source,
            "measured_by": "the task's evaluate_arch (figures it supplied; dsnas did not measure them)"}
