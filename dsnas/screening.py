"""The latency predictor in the search (dsnas.predictor): before a candidate is trained, predict the figures
the study's hardware limits are on, and skip one predicted over a limit by more than a margin. A drift guard keeps
it honest: every prediction is checked against the measurement that follows it; an error beyond ``refit_error``
re-fits the predictor at once; when the recent errors stay beyond it (the device changed: throttling, another
tenant), the predictor forgets the measurements from before and learns again from the new ones; and skipping pauses
while the recent errors exceed the margin. A skipped candidate is PRUNED, never on the front; every candidate that
trains is measured for real, so the front is all measurement."""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dsnas.errors import DsnasError
from dsnas.models import build
from dsnas.profiler import MeasureGate, device_key
from dsnas.profiler.counting import count_flops_and_bytes
from dsnas.profiler.timing import cpu_threads
from dsnas.spec import MIN_CHECKED
from dsnas.tasks import runs_own_trials

# The limits a predictor answers (limit metric -> predictor target); a params limit is checked on the count itself.
PREDICTED = {"latency_ms": "latency", "peak_memory_mb": "peak_memory"}


@dataclass(frozen=True)
class Verdict:
    skip: bool
    reason: str  # why it is skipped (one line); empty when it is not
    predicted: dict[str, float]  # limit metric -> predicted (or counted) value


CountFn = Callable[[dict[str, Any]], "dict[str, float] | None"]


class Screen:
    """The driver's predictor: fitted on the study's own measurements, per device, re-fitted as they grow."""

    def __init__(self, spec: Any, study: Any, counts: CountFn) -> None:
        self.spec, self.study, self.counts = spec.predictor, study, counts
        self.limits = dict(spec.hardware.constraints.items())
        self.batch_sizes = tuple(sorted(spec.hardware.batch_sizes))
        self.fits: dict[str, list[Any]] = {}  # target -> one fitted Predictor per device with enough data
        self.cv_error: dict[str, float] = {}  # target -> held-out MAPE of the latest fit (worst device)
        # metric -> (trial number, |relative error|) of the latest held-out predictions
        self.errors: dict[str, deque[tuple[int, float]]] = {m: deque(maxlen=self.spec.recent) for m in PREDICTED}
        self.stale = True  # fit before the next prediction
        self.since_fit = 0
        self.drift_from: int | None = None  # learn only from trials numbered from here on (after a drift)
        self.unproven: set[str] = set()  # metrics whose predictor must pass MIN_CHECKED held-out checks (drift)

    @property
    def active(self) -> bool:
        return self.spec.skip and any(m in self.limits for m in (*PREDICTED, "params"))

    def judge(self, arch: dict[str, Any]) -> Verdict | None:
        """None when there is nothing to judge with (no limit it can answer, too few measurements, no counts);
        else the verdict. Counting builds the model, so it happens only when a limit can use the counts."""
        if not self.active:
            return None
        if self.stale:
            self._fit()
        answerable = [m for m in PREDICTED if m in self.limits and self.fits.get(PREDICTED[m])]
        if not answerable and "params" not in self.limits:
            return None
        counts = self.counts(arch)
        if counts is None:
            return None
        if "params" in self.limits and counts["params"] > self.limits["params"]:
            return Verdict(True, f"params {counts['params']:,.0f} > {self.limits['params']:g} (counted)",
                           {"params": counts["params"]})
        predicted = {m: self._predict(m, arch, counts) for m in answerable}
        for metric, value in predicted.items():
            limit, margin = self.limits[metric], self.spec.margin
            if value > limit * (1 + margin) and self.trusted(metric):
                which = ("recent error" if len(self.errors[metric]) >= MIN_CHECKED else
                         f"cross-validated error (fewer than {MIN_CHECKED} checks in the search yet)")
                return Verdict(True, f"predicted {metric} {value:.4g} > {limit:g} by more than the margin "
                               f"({margin:.0%}; the predictor's {which} {self.recent_error(metric):.0%})",
                               predicted)
        return Verdict(False, "", predicted)

    def trusted(self, metric: str) -> bool:
        return self.recent_error(metric) <= self.spec.margin

    def recent_error(self, metric: str) -> float:
        """The median relative error of the last held-out predictions, or the fit's cross-validated MAPE while
        there are fewer than MIN_CHECKED of them."""
        recent = [e for _, e in self.errors[metric]]
        if len(recent) >= MIN_CHECKED:
            return statistics.median(recent)
        if metric in self.unproven:
            return float("inf")
        return self.cv_error.get(PREDICTED[metric], float("inf"))

    def observe(self, number: int, predicted: dict[str, float],
                metrics: dict[str, float]) -> tuple[dict[str, Any], str]:
        """Trial ``number``'s measurement: check the predictions made for it before it ran. Returns the attributes
        to store (``predictor_error.METRIC``: predicted / measured - 1) and a line to print when it forces a
        re-fit."""
        self.since_fit += 1
        self.stale = self.stale or self.since_fit >= self.spec.refit_every
        attrs: dict[str, Any] = {}
        said = ""
        for metric, value in predicted.items():
            actual = metrics.get(metric)
            if metric not in PREDICTED or not actual:
                continue
            error = value / actual - 1
            attrs[f"predictor_error.{metric}"] = error
            self.errors[metric].append((number, abs(error)))
            if abs(error) > self.spec.refit_error:
                self.stale = True
                said = (f"predicted {metric} {value:.4g}, measured {actual:.4g} ({error:+.0%}, beyond refit_error "
                        f"{self.spec.refit_error:.0%}): the predictor is re-fitted before the next candidate")
                said += self._drifted(metric)
                attrs["predictor_refit"] = said
        return attrs, said

    def _drifted(self, metric: str) -> str:
        """When most recent predictions missed by more than refit_error, the device is not the one measured
        before: learn only from the measurements since the first of those misses."""
        recent = list(self.errors[metric])
        if len(recent) < MIN_CHECKED or statistics.median(e for _, e in recent) <= self.spec.refit_error:
            return ""
        first = min(n for n, e in recent if e > self.spec.refit_error)
        if self.drift_from is not None and first <= self.drift_from:
            return ""
        self.drift_from = first
        self.errors[metric].clear()  # the old device's errors say nothing of the new fit
        self.unproven.add(metric)
        return (f"; the recent predictions mostly missed (the device changed?): it now learns only from trial "
                f"{first} on, and skips nothing until its predictions are within the margin again")

    def _fit(self) -> None:
        # numpy loads on first use
        from dsnas.predictor import by_device, cross_validate, fit_predictor, study_rows

        self.stale, self.since_fit = False, 0
        devices = by_device(study_rows(self.study, since_trial=self.drift_from))
        for metric, target in PREDICTED.items():
            if metric not in self.limits:
                continue
            fits, errors = [], []
            for rows in devices.values():
                try:
                    fits.append(fit_predictor(rows, target))
                    errors.append(cross_validate(rows, target).predictor.mape)
                except DsnasError:
                    continue  # too few architectures on this device yet
            self.fits[target] = fits
            if errors:
                self.cv_error[target] = max(errors)

    def _predict(self, metric: str, arch: dict[str, Any], counts: dict[str, float]) -> float:
        """The limit's figure on the most favourable device (a cluster's trial may land on any of them)."""
        sizes = self.batch_sizes[:1] if metric == "latency_ms" else self.batch_sizes  # peak memory: the largest
        return min(max(p.predict(arch, counts[f"flops_bs{bs}"], counts[f"bytes_bs{bs}"], counts["params"], bs)
                       for bs in sizes) for p in self.fits[PREDICTED[metric]])


def arch_counter(task: Any, batch_sizes: tuple[int, ...], int8_backend: str = "auto") -> CountFn:
    """What the predictor reads of an architecture before it trains (FLOPs, bytes, parameters): the task's own
    ``count_arch`` when it has one, else the model built and counted here with the study's [engine] int8_backend;
    nothing for a user's evaluation function that counts nothing (there is no model to count)."""
    if callable(getattr(task, "count_arch", None)):
        return lambda arch: task.count_arch(arch, batch_sizes)
    if runs_own_trials(task):
        return lambda arch: None

    def counted(arch: dict[str, Any]) -> dict[str, float] | None:
        import torch


        with MeasureGate(device_key(torch.device("cpu"))).shared():  # counting computes: not while a trial measures
            return count_arch(arch, task, batch_sizes, int8_backend)

    return counted


def count_arch(arch: dict[str, Any], task: Any, batch_sizes: tuple[int, ...],
               int8_backend: str = "auto") -> dict[str, float] | None:
    """FLOPs and bytes per batch size, and parameters, of an architecture's untrained inference form, counted on
    this CPU as the worker counts them: an INT8 layer with the backend the study names (counting every candidate in
    torch's dynamic kernel gave an int8-static study's predictions bytes 2.5 times too few); under "auto", torch's
    dynamic kernel still, as the worker's choice is made by timing each backend on its exclusive hold (timed here,
    on the driver's share of a busy machine, it took 3-15 s a shape holding the gate, and chose otherwise at
    random); None when it cannot be built here (an fp8 layer on a CPU, say)."""
    import torch

    from dsnas.kernels.convert import inference_size, untrained_inference_form  # torch loads on first use

    backend = "torch-dynamic" if int8_backend == "auto" else int8_backend
    try:
        model = untrained_inference_form(build(arch), int8_backend=backend)
    except Exception:
        return None
    out = {"params": float(inference_size(model)[0])}
    with cpu_threads(1), torch.inference_mode():  # one core: the driver must not crowd the trials
        for bs in batch_sizes:
            batch = task.example_batch(bs, torch.device("cpu"))
            flops, nbytes = count_flops_and_bytes(lambda: model(batch))
            out[f"flops_bs{bs}"], out[f"bytes_bs{bs}"] = float(flops), float(nbytes)
    return out


def search_record(study: Any) -> str | None:
    """How the predictor did inside the search, from what each trial stored: its predictions checked against the
    measurement that followed (held out: made before the candidate ran), the skips and the re-fits."""
    import numpy as np

    from dsnas.predictor import _scores  # numpy loads on first use

    checked: dict[str, tuple[list[float], list[float]]] = {}
    skipped, refits = 0, 0  # re-fits a missed prediction caused
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if "reused_from" in attrs:
            continue  # a repeat predicted nothing (an older dsnas copied its original's check onto it)
        skipped += attrs.get("pruned_by") == "predictor"
        refits += "predictor_refit" in attrs
        for metric in PREDICTED:
            if f"predictor_error.{metric}" in attrs and attrs.get(metric):
                predicted, actual = checked.setdefault(metric, ([], []))
                predicted.append(attrs[f"predicted.{metric}"])
                actual.append(attrs[metric])
    if not checked and not skipped:
        return None
    lines = [f"in the search: {skipped} candidate(s) skipped untrained as predicted over a limit; {refits} re-fit(s) "
             "after a prediction missed by more than refit_error"]
    for metric, (predicted, actual) in checked.items():
        s = _scores(np.array(actual), np.array(predicted))
        lines.append(f"  {metric}: {s.n} predictions checked against the measurement that followed: within +-10% "
                     f"{s.within_10:.0%}, Spearman {s.spearman:.3f}, MAPE {s.mape:.1%}")
    return "\n".join(lines)
