"""A per-device predictor of latency (or peak memory) from architecture features, fitted on a study's stored
measurements, and its held-out accuracy per batch size next to a FLOPs-only power law.

numpy (scipy for Spearman's rank correlation): a few dozen rows and thirty features need no more than a ridge
regression, and a fit that takes microseconds can be redone whenever a new measurement disagrees with it."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dsnas.errors import DsnasError
from dsnas.kernels.choices import PRECISIONS, SPARSITIES
from dsnas.profiler.device import short_hash

TARGETS = {"latency": "latency_ms", "peak_memory": "peak_memory_mb"}
BASE_FEATURES = ("log_flops", "log_bytes", "log_params", "log_batch_size", "n_layers", "d_model",
                 *(f"n_{p}" for p in PRECISIONS), *(f"n_{s}" for s in SPARSITIES), "mean_ffn_ratio", "mean_heads")
# The architecture's shape also times log(batch size): at batch 1 a small model's latency is per-op overhead, at
# batch 32 it is compute, so what a layer, a width or an int8 layer costs differs by batch size. On the 108
# recorded models of benchmarks/data this took the held-out latency MAPE from 16% to 6.5% and peak memory's from
# 13% to 4%. FLOPs and bytes stay out of it: they grow with the batch already, and their products with it would
# bend the fit between the batch sizes measured (20% off at batch 8 when fitted on 1 and 32, against 8% this way).
BY_BATCH = tuple(f for f in BASE_FEATURES if f not in ("log_flops", "log_bytes", "log_batch_size"))
FEATURES = (*BASE_FEATURES, *(f"{f}*log_batch_size" for f in BY_BATCH))
MIN_ARCHS = 8  # below this a 5-fold split leaves one or two architectures to learn thirty weights from
L2 = 1.0  # on standardized features: small enough to fit, large enough that collinear counts stay tame
WITHIN = 0.10


@dataclass(frozen=True)
class MeasuredRow:
    """One architecture at one batch size on one device (repeated measurements merged by their median)."""

    fingerprint_id: str
    device: str
    arch_key: str  # the architecture's hash: the unit the folds split by
    arch: dict[str, Any]
    batch_size: int
    flops: float  # counted per call (one forward pass at this batch size)
    bytes: float
    params: float
    latency_ms: float
    peak_memory_mb: float | None

    def value(self, target: str) -> float | None:
        return getattr(self, TARGETS[_check_target(target)])


@dataclass(frozen=True)
class Scores:
    """Held-out accuracy of one model: share of predictions within +-10%, Spearman rank correlation, MAPE."""

    within_10: float
    spearman: float
    mape: float
    n: int


@dataclass(frozen=True)
class BatchScores:
    """Held-out scores at one batch size: how well each model ranks and sizes the architectures against each other
    when the batch size is fixed, which is what a search compares."""

    batch_size: int
    predictor: Scores
    baseline: Scores


@dataclass(frozen=True)
class CrossValidation:
    target: str
    fingerprint_id: str
    device: str
    n_rows: int
    n_archs: int
    folds: int
    # Pooled over every batch size. Its Spearman flatters both models: batch 32 is slower than batch 1 whatever the
    # architecture, so ranking the batch sizes apart already earns most of it. by_batch is the figure to judge by.
    predictor: Scores
    baseline: Scores  # log(target) = a + b log(FLOPs), fitted on the same training folds
    by_batch: tuple[BatchScores, ...]  # one per batch size, smallest first

    def table(self) -> str:
        head = (f"device {self.fingerprint_id} ({self.device}): {self.n_rows} rows, {self.n_archs} architectures, "
                f"{self.folds}-fold split by architecture, target {self.target}")
        lines = [head, f"  {'batch size':<10} {'model':<20} {'within +-10%':>12} {'Spearman':>9} {'MAPE':>8} {'n':>5}"]
        groups = [(str(b.batch_size), b.predictor, b.baseline) for b in self.by_batch]
        for label, ours, base in [*groups, ("pooled", self.predictor, self.baseline)]:
            for name, s in (("predictor (ridge)", ours), ("FLOPs-only baseline", base)):
                lines.append(f"  {label:<10} {name:<20} {s.within_10:>12.0%} {s.spearman:>9.3f} {s.mape:>8.1%} "
                             f"{s.n:>5}")
        lines.append("  pooled: all batch sizes ranked together, which flatters Spearman; judge by each batch size")
        return "\n".join(lines)


@dataclass(frozen=True)
class Predictor:
    """A fitted ridge regression on log(target); ``predict`` answers in the target's unit (ms or MB)."""

    target: str
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    n_rows: int
    n_archs: int
    train: Scores  # on its own training rows: a lower bound on its error, for the driver's drift guard

    def predict(self, arch: dict[str, Any], flops: float, bytes: float, params: float, batch_size: int) -> float:
        x = features(arch, flops, bytes, params, batch_size)[None, :]
        return float(self._predict(x)[0])

    def predict_rows(self, rows: list[MeasuredRow]) -> np.ndarray:
        return self._predict(_matrix(rows))

    def _predict(self, x: np.ndarray) -> np.ndarray:
        return np.exp((x - self.mean) / self.scale @ self.coef + self.intercept)


def features(arch: dict[str, Any], flops: float, bytes: float, params: float, batch_size: int) -> np.ndarray:
    """The feature vector (see FEATURES): counts in log space, because latency follows them as a power law."""
    layers = arch.get("layers", [])
    groups = arch.get("engine", ())  # an [engine] group's choice (hf_causal_lm's only engine choice) counts too
    precisions = [layer.get("precision", "fp32") for layer in layers] + [g["precision"] for g in groups]
    sparsities = [layer.get("sparsity", "dense") for layer in layers] + [g["sparsity"] for g in groups]
    # hf_causal_lm names its width hidden_size and its heads and FFN once for all layers: read from those keys.
    width = arch.get("d_model", arch.get("hidden_size", 0))
    ffn = _layer_mean(layers, "ffn_ratio") or (arch["intermediate_size"] / width
                                               if "intermediate_size" in arch and width else 0.0)
    heads = _layer_mean(layers, "n_heads") or float(arch.get("n_heads", 0))
    base = np.array([math.log(flops), math.log(bytes), math.log(params), math.log(batch_size), len(layers),
                     width, *(precisions.count(p) for p in PRECISIONS),
                     *(sparsities.count(s) for s in SPARSITIES), ffn, heads], dtype=float)
    return np.concatenate([base, base[_BY_BATCH] * math.log(batch_size)])


_BY_BATCH = [BASE_FEATURES.index(f) for f in BY_BATCH]


def _layer_mean(layers: list[dict[str, Any]], key: str) -> float:
    """The mean of a transformer layer's ``key``; 0 for a family whose layers have none (a cnn's stages)."""
    values = [layer[key] for layer in layers if key in layer]
    return float(np.mean(values)) if values else 0.0


def study_rows(study: Any, since_trial: int | None = None) -> list[MeasuredRow]:
    """Every measurement of an open study joined with its trial's architecture and counted FLOPs/bytes/params,
    one row per (device, architecture, batch size); only trials numbered ``since_trial`` or later when given.
    Trials without counts (older dsnas) are left out."""
    from dsnas.tables import measurements  # SQLAlchemy loads on first use

    attrs = {t.number: t.user_attrs for t in study.get_trials(deepcopy=False)}
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    archs: dict[str, dict[str, Any]] = {}
    for rec in measurements(study).to_dict("records"):
        if since_trial is not None and rec["trial_number"] < since_trial:
            continue
        ua, bs = attrs.get(rec["trial_number"], {}), int(rec["batch_size"])
        counts = (ua.get(f"flops_bs{bs}"), ua.get(f"bytes_bs{bs}"), ua.get("params"))
        if "arch" not in ua or not all(counts):
            continue
        key = short_hash(ua["arch"])
        archs[key] = ua["arch"]
        groups.setdefault((rec["fingerprint_id"], key, bs), []).append({**rec, "counts": counts})
    return [_merge(fp, key, archs[key], bs, recs) for (fp, key, bs), recs in groups.items()]


def _merge(fp: str, key: str, arch: dict[str, Any], bs: int, recs: list[dict[str, Any]]) -> MeasuredRow:
    # A cached or repeated measurement of the same architecture is one data point, not several: counting it
    # twice would weigh the architectures the sampler liked more than the others.
    peaks = [r["peak_memory_bytes"] / 2**20 for r in recs if _number(r.get("peak_memory_bytes"))]
    flops, bytes_, params = recs[0]["counts"]
    return MeasuredRow(fp, str(recs[0].get("device") or "?"), key, arch, bs, float(flops), float(bytes_),
                       float(params), float(np.median([r["latency_ms_median"] for r in recs])),
                       float(np.median(peaks)) if peaks else None)


def _number(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x)) and x > 0


def by_device(rows: list[MeasuredRow]) -> dict[str, list[MeasuredRow]]:
    """Rows per device fingerprint id: a latency measured on one device says nothing about another."""
    out: dict[str, list[MeasuredRow]] = {}
    for row in rows:
        out.setdefault(row.fingerprint_id, []).append(row)
    return out


def fit_predictor(rows: list[MeasuredRow], target: str = "latency") -> Predictor:
    """Fit the ridge predictor of ``target`` ("latency" or "peak_memory") on the rows of one device."""
    rows = _usable(rows, target)
    x, y = _matrix(rows), np.log([r.value(target) for r in rows])
    mean, scale, coef, intercept = _ridge(x, y)
    fitted = np.exp((x - mean) / scale @ coef + intercept)
    return Predictor(target, mean, scale, coef, intercept, len(rows), len({r.arch_key for r in rows}),
                     _scores(np.exp(y), fitted))


def cross_validate(rows: list[MeasuredRow], target: str = "latency", folds: int = 5,
                   seed: int = 0) -> CrossValidation:
    """K-fold cross-validation split by architecture (an architecture's batch sizes are all on one side, so a
    held-out prediction is for an architecture the model never saw): the predictor and the FLOPs-only baseline,
    scored per batch size and pooled over all of them."""
    rows = _usable(rows, target)
    _check_enough_to_fold(rows, target, folds)
    y = np.array([r.value(target) for r in rows])
    ours, base = np.empty_like(y), np.empty_like(y)
    splits = arch_folds(rows, folds, seed)
    for held in splits:
        train = [r for i, r in enumerate(rows) if i not in held]
        idx = sorted(held)
        ours[idx] = fit_predictor(train, target).predict_rows([rows[i] for i in idx])
        a, b = _power_law(train, target)
        base[idx] = np.exp(a + b * np.log([rows[i].flops for i in idx]))
    sizes = np.array([r.batch_size for r in rows])
    by_batch = tuple(BatchScores(int(bs), _scores(y[sizes == bs], ours[sizes == bs]),
                                 _scores(y[sizes == bs], base[sizes == bs])) for bs in np.unique(sizes))
    return CrossValidation(target, rows[0].fingerprint_id, rows[0].device, len(rows), len({r.arch_key for r in rows}),
                      len(splits), _scores(y, ours), _scores(y, base), by_batch)


def arch_folds(rows: list[MeasuredRow], folds: int, seed: int = 0) -> list[set[int]]:
    """Row indices of each held-out fold; whole architectures are assigned to folds at random."""
    check_folds(folds)
    keys = sorted({r.arch_key for r in rows})
    order = np.random.default_rng(seed).permutation(len(keys))
    k = min(folds, len(keys))
    fold_of = {keys[j]: n % k for n, j in enumerate(order)}
    return [{i for i, r in enumerate(rows) if fold_of[r.arch_key] == f} for f in range(k)]


def _check_enough_to_fold(rows: list[MeasuredRow], target: str, folds: int) -> None:
    """Each fold's predictor learns from the other folds, which must hold MIN_ARCHS architectures themselves."""
    check_folds(folds)  # one fold would learn from nothing: no count is enough
    n = len({r.arch_key for r in rows})
    need = next(m for m in itertools.count(MIN_ARCHS) if m - math.ceil(m / min(folds, m)) >= MIN_ARCHS)
    if n < need:
        fits = next((f for f in range(folds + 1, n + 1) if n - math.ceil(n / f) >= MIN_ARCHS), None)
        raise DsnasError(f"cross-validating the {target} predictor over {folds} folds needs at least {need} measured "
                         f"architectures on one device (each fold learns from the others, which need {MIN_ARCHS}), "
                         f"got {n}. Fix: run more trials" + (f", or use --folds {fits}" if fits else ""))


def check_folds(folds: int) -> None:
    if folds < 2:
        raise DsnasError(f"--folds {folds}: cross-validation needs at least 2 folds. Fix: e.g. --folds 5")


def _usable(rows: list[MeasuredRow], target: str) -> list[MeasuredRow]:
    """The rows that have the target, of one device, refused when too few architectures to learn from."""
    rows = [r for r in rows if r.value(target) is not None and r.value(target) > 0]
    devices = sorted({r.fingerprint_id for r in rows})
    if len(devices) > 1:
        raise DsnasError(f"rows from {len(devices)} devices ({', '.join(devices)}): a predictor is per device. "
                         "Fix: split them with by_device(rows)")
    n = len({r.arch_key for r in rows})
    if n < MIN_ARCHS:
        raise DsnasError(f"the {target} predictor needs at least {MIN_ARCHS} measured architectures on one device, "
                         f"got {n}; run more trials")
    return rows


def _matrix(rows: list[MeasuredRow]) -> np.ndarray:
    return np.stack([features(r.arch, r.flops, r.bytes, r.params, r.batch_size) for r in rows])


def _ridge(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    # Standardized, so that one L2 weight means the same for a log count and a layer count; a feature that
    # never varies (no fp8 layer in this space) gets scale 1 and weight 0 instead of a division by zero.
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (x - mean) / scale
    intercept = float(y.mean())  # not penalized
    coef = np.linalg.solve(z.T @ z + L2 * np.eye(z.shape[1]), z.T @ (y - intercept))
    return mean, scale, coef, intercept


def _power_law(rows: list[MeasuredRow], target: str) -> tuple[float, float]:
    """a, b of log(target) = a + b log(FLOPs), by least squares."""
    x = np.log([r.flops for r in rows])
    y = np.log([r.value(target) for r in rows])
    design = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(a), float(b)


def _scores(actual: np.ndarray, predicted: np.ndarray) -> Scores:
    rel = np.abs(predicted - actual) / actual
    return Scores(float(np.mean(rel <= WITHIN)), spearman(actual, predicted), float(np.mean(rel)), len(actual))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (scipy's: ties share their average rank); nan when either side is constant."""
    from scipy.stats import spearmanr

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _check_target(target: str) -> str:
    if target not in TARGETS:
        raise DsnasError(f"target {target!r}: must be one of {', '.join(TARGETS)}. Fix: e.g. --target latency")
    return target
