"""Which engine choices pay on this device: a short measured probe of the engine's inference layers against fp32
at a search space's linear shapes, cached per device fingerprint (as the CPU ceilings are). A space whose
precision is "auto" (or whose engine is "auto") offers exactly the choices the probe found faster: bf16 where the
CPU has AVX512-BF16 or AMX, or on a GPU; int8 where an INT8 kernel beats fp32 at these shapes; fp8 on a GPU of
compute capability 8.9+; 2:4 only where a semi-structured sparse kernel runs and beats the dense layer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dsnas.allocator import hold_freed_memory
from dsnas.errors import TrialError
from dsnas.profiler import host_speed
from dsnas.profiler.cache import cache_dir, entry_key, read_entries, store_entry
from dsnas.profiler.capabilities import usable_cpus
from dsnas.profiler.device import device_key, fingerprint, fingerprint_id, resolve_device
from dsnas.profiler.disturbance import MAX_SETTLE_S, SLOWDOWN_LIMIT, THRESHOLD, CpuWindow, wait_for_quiet
from dsnas.profiler.gate import MeasureGate
from dsnas.profiler.timing import call_ms, cpu_threads, time_calls

PRECISIONS = ("bf16", "fp16", "int8", "fp8")  # the low precisions the probe may offer beside fp32
SPARSITY = "2:4"
SPARSE_WITH = "bf16"  # the precision the probe times 2:4 in on a GPU: where it is not offered, 2:4 runs masked-dense
SPARSE_KERNEL_PRECISIONS = ("bf16", "fp16")  # those convert gives a semi-structured kernel (int8 and fp8 run dense)
# A choice is offered when its layers run at least this much faster than the baseline (the geometric mean over the
# shapes): 10%, beyond the spread of a short probe on a quiet machine, so that a choice offered is one that pays.
PAYS = 1.10
# An 8-bit layer is less exact than a 16-bit one, so where an offered 16-bit precision runs at least as fast, the
# 8-bit choice can only lose: searching it spends trials on candidates dominated before they train. Measured: on
# an H200 fp8 ran at 0.74x and int8-static at 0.51x of bf16 (8192^2, 4096 rows); on an AMX Xeon bf16 ran 5-8x
# fp32 and dynamic INT8 2x. fp16 and bf16 are not ranked against each other (more mantissa or more range).
MORE_EXACT = {"int8": ("bf16", "fp16"), "fp8": ("bf16", "fp16")}
# A choice this many times slower than its baseline at the faster of two calls is timed no further at that shape:
# it cannot pay, and timing bf16 in full at 0.1x fp32 on an AVX2 CPU only costs seconds.
LOSING = 3.0
CACHE_TYPE = "dsnas.engine_probe_cache"
RULE = "per-width"  # in the cache key: entries decided by an earlier rule (one offer for every width) are not read


@dataclass(frozen=True)
class Shape:
    rows: int  # tokens in one forward pass: batch size x context
    in_features: int
    out_features: int

    def __str__(self) -> str:
        return f"{self.rows}x{self.in_features}->{self.out_features}"


@dataclass(frozen=True)
class Verdict:
    choice: str
    offered: bool
    speedup: float | None  # geometric mean over the shapes of baseline time / choice time; None: it cannot run here
    kernel: str  # what ran ("torch-dynamic", "cusparselt bf16", ...); "" when nothing did
    why: str  # one line: why it is offered or not
    per_shape: dict[str, float] = field(default_factory=dict)  # str(Shape) -> speedup
    # Model width (a layer's input features: d_model) -> geometric mean speedup over that width's shapes. A choice
    # is offered at the widths where it pays: bf16 may pay at d 128 and lose at d 32 on the same CPU.
    widths: dict[str, float] = field(default_factory=dict)

    def pays_at(self) -> list[int]:
        """The widths where it is offered."""
        return [int(w) for w, r in self.widths.items() if r >= PAYS] if self.offered else []


def decide(choice: str, baseline_s: dict[str, float], choice_s: dict[str, float] | None, kernel: str,
           missing: str = "", baseline: str = "fp32") -> Verdict:
    """The verdict on one choice from its timings and the baseline's at the same shapes (seconds per call)."""
    if choice_s is None:
        return Verdict(choice, False, None, kernel, f"cannot run here: {missing}")
    per_shape = {s: baseline_s[s] / t for s, t in choice_s.items() if t > 0 and s in baseline_s}
    speedup = _geomean(per_shape.values())
    by_width: dict[str, list[float]] = {}
    for s, r in per_shape.items():
        by_width.setdefault(str(_width(s)), []).append(r)
    widths = {w: _geomean(rs) for w, rs in sorted(by_width.items(), key=lambda item: int(item[0]))}
    low, high = min(per_shape.values()), max(per_shape.values())
    span = f"{speedup:.2f}x {baseline} (geomean of {len(per_shape)} shapes, {low:.2f}x-{high:.2f}x)"
    if missing:  # it ran, but not as its kernel would: e.g. 2:4 zeros multiplied densely
        return Verdict(choice, False, speedup, kernel, f"{span}, but {missing}", per_shape, widths)
    paying = [w for w, r in widths.items() if r >= PAYS]
    if len(paying) == len(widths):
        return Verdict(choice, True, speedup, kernel, f"{span}: pays", per_shape, widths)
    if paying:
        at = ", ".join(f"{w} ({widths[w]:.2f}x)" for w in paying)
        not_at = ", ".join(f"{w} ({r:.2f}x)" for w, r in widths.items() if r < PAYS)
        return Verdict(choice, True, speedup, kernel, f"{span}: pays at width {at}; not at {not_at}", per_shape,
                       widths)
    return Verdict(choice, False, speedup, kernel, f"{span}: below {PAYS:.2f}x at every width, does not pay",
                   per_shape, widths)


def _geomean(ratios: Iterable[float]) -> float:
    ratios = list(ratios)
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def _width(shape: str) -> int:
    """The model width of a shape "ROWSxIN->OUT": its input features (the space's widths are d->d and d->r*d)."""
    return int(shape.split("x", 1)[1].split("->")[0])


@dataclass(frozen=True)
class EngineProbe:
    device: str  # the device's name, as the fingerprint says it
    fingerprint_id: str
    shapes: tuple[str, ...]
    verdicts: dict[str, Verdict]
    cached: bool = False
    # Others' share of the host's CPUs while it ran (dsnas.profiler.disturbance); above the threshold the probe is
    # used for this study but not cached, so that a busy moment does not decide for every later study. None: unknown.
    load: float | None = None
    # The host's slowest over its fastest moment while it ran (dsnas.profiler.host_speed, probed between shapes):
    # a choice is timed beside fp32 at each shape, but a probe that spans a change of speed is not cached either.
    host_drift: float | None = None

    def precisions(self) -> tuple[str, ...]:
        """fp32, then each low precision that pays here, at some width where no more exact one is as fast."""
        return ("fp32",) + tuple(p for p in PRECISIONS if self._kept(p))

    def _kept(self, choice: str) -> bool:
        verdict = self.verdicts.get(choice)
        if verdict is None or not verdict.offered:
            return False
        return not verdict.widths or any(not self.dominated_by(choice, w) for w in verdict.pays_at())

    def dominated_by(self, choice: str, width: int) -> str:
        """The more exact precision (MORE_EXACT) that pays at ``width`` and runs there at least as fast as
        ``choice``; "" when there is none."""
        mine = self.verdicts[choice].widths.get(str(width))
        for other in MORE_EXACT.get(choice, ()):
            verdict = self.verdicts.get(other)
            if mine is not None and verdict is not None and width in verdict.pays_at() \
                    and verdict.widths[str(width)] >= mine:
                return other
        return ""

    def sparsities(self) -> tuple[str, ...]:
        offered = SPARSITY in self.verdicts and self.verdicts[SPARSITY].offered
        if offered and self.verdicts[SPARSITY].widths:  # with its sparse kernel's precision at some width
            offered = any(SPARSITY in there["sparsity"] for there in self.by_width().values())
        return ("dense", SPARSITY) if offered else ("dense",)

    def sparse_with(self) -> tuple[str, ...]:
        """The offered precisions a semi-structured sparse kernel takes (bf16, fp16), where the probe's 2:4 ran one;
        () where it did not (a CPU: 2:4 is masked-dense beside every precision there). A 2:4 layer of another
        precision multiplies its zeros densely (convert says so), so a space searches 2:4 only beside these."""
        verdict = self.verdicts.get(SPARSITY)
        if verdict is None or verdict.speedup is None or "masked-dense" in verdict.kernel or not verdict.kernel:
            return ()
        return tuple(p for p in self.precisions() if p in SPARSE_KERNEL_PRECISIONS)

    def by_width(self) -> dict[int, dict[str, tuple[str, ...]]]:
        """Per model width, the precisions and sparsities offered there: fp32 and dense, and what pays at it; 2:4
        only beside the precision its sparse kernel takes (SPARSE_WITH), which it paid against."""
        widths = sorted({w for v in self.verdicts.values() for w in map(int, v.widths)})
        pays = {c: set(v.pays_at()) for c, v in self.verdicts.items()}
        sparse = SPARSITY in self.verdicts and self.verdicts[SPARSITY].offered
        out = {}
        for w in widths:
            precisions = tuple(p for p in self.precisions()
                               if p == "fp32" or (w in pays[p] and not self.dominated_by(p, w)))
            with_kernel = sparse and w in pays[SPARSITY] and SPARSE_WITH in precisions
            out[w] = {"precision": precisions, "sparsity": ("dense", SPARSITY) if with_kernel else ("dense",)}
        return out

    def table(self) -> str:
        why = []
        if self.load is not None and self.load > THRESHOLD:
            why.append(f"others used {self.load:.0%} of the CPUs")
        if self.host_drift is not None and self.host_drift > SLOWDOWN_LIMIT:
            why.append(f"the host's speed changed {self.host_drift:.2f}x")
        busy = f", disturbed: {' and '.join(why)}, so not cached" if why else ""
        if self.load is None and not self.cached and not why:
            busy = ", others' use of the CPUs unknown (no /proc/stat), so not cached"
        lines = [f"engine probe on {self.device} (fingerprint {self.fingerprint_id}"
                 f"{', cached' if self.cached else ''}{busy}), shapes rows x in -> out: {', '.join(self.shapes)}",
                 f"{'choice':8} {'offered':8} {'speed':>7}  {'kernel':26} why"]
        for v in self.verdicts.values():
            speed = "-" if v.speedup is None else f"{v.speedup:.2f}x"
            offered = self._kept(v.choice) if v.choice in PRECISIONS else v.choice in self.sparsities()
            lines.append(f"{v.choice:8} {'yes' if offered else 'no':8} {speed:>7}  {v.kernel or '-':26} {v.why}"
                         f"{self.dominance_note(v)}")
        return "\n".join(lines)

    def dominance_note(self, v: Verdict) -> str:
        """"; not offered at width 64, where bf16 runs 7.50x and is more exact" (per width), or ""."""
        beaten = [(w, self.dominated_by(v.choice, w)) for w in v.pays_at()] if v.choice in MORE_EXACT else []
        beaten = [(w, by) for w, by in beaten if by]
        if not beaten:
            return ""
        return "; not offered at " + ", ".join(
            f"width {w}, where {by} runs {self.verdicts[by].widths[str(w)]:.2f}x and is more exact"
            for w, by in beaten)

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "fingerprint_id": self.fingerprint_id, "shapes": list(self.shapes),
                "verdicts": {k: asdict(v) for k, v in self.verdicts.items()}, "load": self.load,
                "host_drift": self.host_drift}

    @classmethod
    def from_dict(cls, data: dict[str, Any], cached: bool = False) -> EngineProbe:
        return cls(data["device"], data["fingerprint_id"], tuple(data["shapes"]),
                   {k: Verdict(**v) for k, v in data["verdicts"].items()}, cached, data.get("load"),
                   data.get("host_drift"))


def linear_shapes(widths: Iterable[tuple[int, int]], rows: Iterable[int]) -> tuple[Shape, ...]:
    """Every (in, out) width at every row count, without repeats."""
    return tuple(dict.fromkeys(Shape(r, i, o) for r in rows for i, o in widths))


def probe_engine(device: Any, shapes: Sequence[Shape], threads: int | None = None,
                 use_cache: bool = True, int8_backend: str = "auto") -> EngineProbe:
    """Measure (or read from the cache) each choice's layers against fp32 at ``shapes`` on ``device``; int8 with
    the study's ``int8_backend`` (a study that pins one is offered int8 only where that one pays). The caller
    holds the device exclusively (MeasureGate), as for any measurement."""
    import torch

    device = torch.device(device)
    fp = fingerprint(device)
    with cpu_threads(threads if device.type == "cpu" else None) as used:
        key = entry_key(fingerprint=fp, threads=used if device.type == "cpu" else None,
                        shapes=[str(s) for s in shapes], rule=RULE, allocator=hold_freed_memory()["policy"],
                        **({"int8_backend": int8_backend} if int8_backend != "auto" else {}))
        path = cache_dir() / "engine_probe.json"
        entry = read_entries(path, CACHE_TYPE).get(key) if use_cache else None
        if isinstance(entry, dict):
            try:
                return EngineProbe.from_dict(entry, cached=True)
            except (KeyError, TypeError, AttributeError, ValueError):
                pass  # a malformed entry: measure again, and overwrite it
        wait_for_quiet(MAX_SETTLE_S)  # a neighbour's burst that ends within a second does not decide the offer
        speeds: list[float] = []  # the host-speed probe between shapes, ms: only a CPU layer's time follows it
        between = (lambda: speeds.append(host_speed.probe_ms())) if device.type == "cpu" else (lambda: None)
        with CpuWindow() as window:
            verdicts = _measure(device, shapes, between, int8_backend)
        drift = max(speeds) / min(speeds) if speeds else None
        probe = EngineProbe(str(fp.get("gpu") or fp.get("cpu")), fingerprint_id(fp), tuple(map(str, shapes)),
                            verdicts, load=window.share.load if window.share.others is not None else None,
                            host_drift=drift)
        # Stored only when known quiet: one taken under others' load, or where it cannot be read (no /proc/stat),
        # would decide the offer for good.
        if replace(window.share, host_slowdown=drift).disturbed() is False:
            store_entry(path, CACHE_TYPE, key, probe.as_dict())
    return probe


def _measure(device: Any, shapes: Sequence[Shape], between: Callable[[], None] = lambda: None,
             int8_backend: str = "auto") -> dict[str, Verdict]:
    """Every choice timed beside its baseline shape by shape: a choice's time at a shape is taken right after fp32's,
    so that a change in the host's speed over the probe's seconds moves both, not their ratio. ``between()`` runs
    before each shape and after the last (the host-speed probe, on the CPU)."""
    # 2:4 against the dense layer of the precision a sparse kernel takes (bf16): the sparsity's own gain.
    half = "bf16" if device.type == "cuda" else "fp32"
    timed = {choice: _Timed() for choice in dict.fromkeys([("fp32", "dense"), *((p, "dense") for p in PRECISIONS),
                                                           (half, SPARSITY)])}
    baseline = {choice: (half, "dense") if choice[1] == SPARSITY else ("fp32", "dense") for choice in timed}
    for shape in shapes:
        between()
        for (precision, sparsity), one in timed.items():
            if one.error is None:
                base = timed[baseline[precision, sparsity]].times.get(str(shape))
                one.time(shape, precision, sparsity, device, None if base is None else LOSING * base, int8_backend)
    between()
    fp32 = timed["fp32", "dense"].times
    verdicts = {p: decide(p, fp32, *timed[p, "dense"].outcome()) for p in PRECISIONS}
    base = timed[half, "dense"]
    if base.error is not None:
        verdicts[SPARSITY] = decide(SPARSITY, fp32, None, "", f"{half} does not run here")
    else:
        verdicts[SPARSITY] = decide(SPARSITY, base.times, *timed[half, SPARSITY].outcome(), baseline=f"dense {half}")
    return verdicts


@dataclass
class _Timed:
    """One choice's seconds per call at each shape, the kernels that ran, and what kept it from running as it
    should ("" when nothing did); ``error`` says why it cannot run here at all (then it is not timed)."""

    times: dict[str, float] = field(default_factory=dict)
    kernels: list[str] = field(default_factory=list)
    missing: str = ""
    error: str | None = None

    def time(self, shape: Shape, precision: str, sparsity: str, device: Any, give_up_s: float | None,
             int8_backend: str = "auto") -> None:
        try:
            layer = _layer(shape, precision, sparsity, device, int8_backend)
        except (TrialError, RuntimeError) as err:  # e.g. fp8 on a CPU, or on a GPU before compute capability 8.9
            self.error = str(err).split(". Fix:")[0].split("cannot run here: ")[-1]
            return
        if sparsity != "dense" and not layer.sparse_kernel:
            self.missing = f"no sparse kernel runs here ({layer.reason or layer.backend})"
        self.kernels.append(layer.backend)
        self.times[str(shape)] = _seconds(layer, shape, device, give_up_s)

    def outcome(self) -> tuple[dict[str, float] | None, str, str]:
        """decide()'s choice_s, kernel and missing: no times when the choice cannot run here."""
        if self.error is not None:
            return None, "", self.error
        return self.times, "/".join(dict.fromkeys(k.removeprefix("int8:") for k in self.kernels)), self.missing


def _layer(shape: Shape, precision: str, sparsity: str, device: Any, int8_backend: str = "auto") -> Any:
    """One engine layer of ``shape`` in its inference form (as convert leaves a trained one), int8 with the backend
    the study's [engine] int8_backend names (the fastest here when "auto")."""
    import torch

    from dsnas.kernels.convert import UNTRAINED_ACT_AMAX, convert  # torch loads on first use
    from dsnas.kernels.linear import EngineLinear  # torch loads on first use
    from dsnas.kernels.sparsity import magnitude_scores, sparsify_layer  # torch loads on first use

    torch.manual_seed(0)
    layer = EngineLinear(shape.in_features, shape.out_features, precision=precision, sparsity=sparsity).to(device)
    if sparsity != "dense":
        sparsify_layer(layer, magnitude_scores(layer.weight.detach()), 2, 4)
    if precision == "int8":
        layer.act_amax.fill_(UNTRAINED_ACT_AMAX)
    convert(torch.nn.Sequential(layer), int8_backend=int8_backend, rows=(shape.rows,))
    return layer


def _seconds(layer: Any, shape: Shape, device: Any, give_up_s: float | None = None) -> float:
    """Seconds per call, the median of a short timing; or, when the faster of two calls after a warm-up already
    takes ``give_up_s`` (LOSING times the baseline's), that call's: a layer so slow cannot pay, and a bf16 layer at
    0.1x fp32 on an AVX2 CPU is not worth timing in full."""
    import torch

    x = torch.randn(shape.rows, shape.in_features, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        if give_up_s is not None:
            layer(x)
            sync()
            first = min(call_ms(lambda: layer(x), sync) for _ in range(2)) / 1e3
            if first > give_up_s:
                return first
        timing = time_calls(lambda: layer(x), sync, warmup_s=0.02, measure_s=0.05, max_measure_s=0.3,
                            min_repeats=5)
    return timing.median_ms / 1e3


def probe_on_device(device: str, shapes: Sequence[Shape], threads: int | None = None,
                    int8_backend: str = "auto") -> EngineProbe:
    """The probe where trials run (the executor calls it there), holding the device and using the threads as a
    trial's measurement does (every core unless [hardware] threads says otherwise, also in a 1-CPU Ray worker)."""
    resolved = resolve_device(device)
    threads = threads or usable_cpus()
    with MeasureGate(device_key(resolved), announce="the engine probe").exclusive():
        return probe_engine(resolved, shapes, threads, int8_backend=int8_backend)
