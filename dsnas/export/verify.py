"""Verifying a bundle here: its probe, its accuracy and its speed measured again and compared with metrics.json."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsnas.errors import DsnasError
from dsnas.export.bundle import (
    METRICS_TYPE,
    REEXPORT,
    _read_json,
    as_measured,
    eval_mode_probe,
    load_bundle,
    read_bundle,
    read_probe,
    recorded_hardware,
    recorded_task_spec,
)
from dsnas.export.formats import _one_line
from dsnas.profiler import MeasureGate, device_key, fingerprint, measure
from dsnas.profiler.device import named_device
from dsnas.tasks import data_differs, make_task

# Independent measurements of each speed figure; their median is compared (one busy round moves it little).
SPEED_ROUNDS = 5
# A shared host has slow spells that no /proc/stat counter shows (likely another guest on the core's SMT sibling): on
# a 2-core EPYC VM like CI's, one bundle timed 0.43 ms in most rounds and 0.8 ms in runs of 1-4 consecutive rounds,
# with no other process busy. When the rounds disagree among themselves beyond the tolerance and their median fails, the
# machine, not the bundle, is in doubt: measure another set after a pause and judge the median of them all.
EXTRA_SETS = 2
UNSTEADY_PAUSE_S = 1.0
# The recorded p10-p90 spread widens the tolerance to at most this (x/÷ 2): a record taken on a busy host had a
# spread of 112, within which a bundle 100x slower passed.
MAX_SPREAD_TOL = 1.0


@dataclass(frozen=True)
class Check:
    """One row of a verify table. ``failed`` rows fail the bundle; ``compared`` False rows are only shown."""
    figure: str
    recorded: str
    now: str
    drift: str
    verdict: str
    failed: bool = False
    compared: bool = True


@dataclass
class VerifyReport:
    bundle: str
    device: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.failed for c in self.checks)

    def table(self) -> str:
        head = ("figure", "recorded", "now", "drift", "verdict")
        rows = [head, *((c.figure, c.recorded, c.now, c.drift, c.verdict) for c in self.checks)]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[4] for r in rows]
        failed = [c.figure for c in self.checks if c.failed]
        skipped = [c.figure for c in self.checks if not c.compared]
        last = f"verify: FAILED ({', '.join(failed)})" if failed else "verify: OK"
        if skipped and not failed:
            last += f" (not compared: {', '.join(skipped)})"
        return "\n".join([f"verify {self.bundle} on {self.device}", *lines, last])


def verify_bundle(bundle: str | Path, accuracy_tol: float = 0.005, latency_tol: float = 0.25,
                  device: str = "auto") -> VerifyReport:
    """Load the bundle, check its probe, evaluate accuracy and measure speed again here, and compare each
    figure with metrics.json: accuracy beyond ``accuracy_tol`` (absolute) fails; latency and throughput beyond
    ``latency_tol`` (relative) fail only on a device with the recorded fingerprint."""
    doc = read_bundle(bundle)
    recorded = _read_metrics(Path(bundle) / "metrics.json")
    dev = named_device(device)
    model = load_bundle(bundle, device=str(dev))
    profile = recorded.get("profile", {})
    fp_then = recorded.get("fingerprint") or profile.get("fingerprint", {})
    here = fingerprint(dev)
    report = VerifyReport(str(bundle), f"{dev} ({here.get('gpu') or here['cpu']}, host {here['host']})")
    report.checks.append(_probe_check(bundle, model, dev, fp_then.get("device")))
    task, why = _recorded_task(doc)
    # `dsnas profile` measures a bundle that records its task (a version-1 bundle does not: export it again)
    report.checks.append(_form_check(model, profile.get("signature"), PROFILE_IT if "task" in doc else REEXPORT))
    if task is None:
        report.checks += [Check(name, _num(recorded.get("metrics", {}).get(key)), "-", "-", f"not re-measured: {why}",
                                compared=False) for name, key in (("accuracy", "accuracy"), ("speed", "latency_ms"))]
        return report
    report.checks += _accuracy_checks(model, task, dev, recorded, accuracy_tol)
    report.checks += _speed_checks(as_measured(model, recorded), task, dev,
                                   recorded_hardware(doc, Path(bundle) / "arch.json"), recorded, latency_tol)
    return report


def _read_metrics(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    if data.get("_type") != METRICS_TYPE:
        raise DsnasError(f"{path}: expected _type {METRICS_TYPE!r}, got {data.get('_type')!r}. Fix: {REEXPORT}")
    return data


def _num(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _probe_check(bundle: str | Path, model: Any, dev: Any, recorded_type: str | None) -> Check:
    """The loaded model gives the recorded logits on the recorded input: the weights are the trial's."""
    import torch

    probe = read_probe(bundle)
    with torch.inference_mode():
        now = model(probe["input"].to(dev)).float().cpu()
    # Kernels differ between device types; on the type that wrote the probe only summation order can differ.
    tol = 1e-5 if recorded_type in (None, dev.type) else 1e-3
    if now.shape != probe["logits"].shape:
        return Check("probe logits", str(tuple(probe["logits"].shape)), str(tuple(now.shape)), "-",
                     "FAIL: other shape", failed=True)
    diff = (now - probe["logits"]).abs().max().item()
    ok = diff <= tol
    if not ok and not eval_mode_probe(Path(bundle) / "probe.safetensors"):
        # An older dsnas's probe says no mode: a training-mode forward (dropout's random logits) differs so, the
        # weights being right. Exported again, the bundle's probe is of eval mode.
        return Check("probe logits", "-", "-", f"max |d| {diff:.2g}", "not compared: the probe of an older dsnas "
                     "says no model mode (one taken in training mode differs so); export the trial again",
                     compared=False)
    return Check("probe logits", "-", "-", f"max |d| {diff:.2g}", f"{'ok' if ok else 'FAIL'} (atol {tol:g})",
                 failed=not ok)


# What gives a bundle a record its trial lacks: exporting again copies the trial's record, which stays as it was.
PROFILE_IT = "`dsnas profile` on this bundle measures it here"


def _form_check(model: Any, recorded: dict[str, Any] | None, fix: str = PROFILE_IT) -> Check:
    """The loaded model runs what was measured: each layer's precision, sparsity pattern and backend (the
    signature recorded with the measurement; dsnas.kernels.convert.inference_signature)."""
    from dsnas.kernels.convert import inference_signature, signature_difference  # torch loads on first use

    if not recorded:  # exporting again copies the same trial's record: only a new measurement has one
        return Check("inference form", "-", "-", "-", f"not recorded by its trial (an older dsnas measured it; "
                     f"{fix})", compared=False)
    now = inference_signature(model)
    layers = len(now["layers"])
    why = signature_difference({**recorded, "compiled": False}, now)
    if why:
        return Check("inference form", "measured", "loaded", "-", f"FAIL: {why}", failed=True)
    compiled = " (measured under torch.compile, and timed so again)" if recorded.get("compiled") else ""
    return Check("inference form", f"{layers} layers", f"{layers} layers", "-", f"same{compiled}")


def _recorded_task(doc: dict[str, Any]) -> tuple[Any, str]:
    """(the task the bundle's trial trained with, "") or (None, why it cannot be rebuilt here)."""
    if "task" not in doc or "hardware" not in doc:
        return None, f"a version-{doc['_version']} bundle does not record its task and hardware ({REEXPORT})"
    recorded = doc["task"]
    try:
        return make_task(recorded_task_spec(doc)), ""
    except Exception as e:  # a corpus or a task module this machine lacks: say so rather than fail the bundle
        return None, f"the task {recorded.get('name')!r} cannot be rebuilt here ({_one_line(e)})"


def data_check(recorded: dict[str, Any], task: Any) -> Check:
    """Whether ``task`` (built here) reads the data the bundle's trial trained on (``recorded``: its metrics.json):
    accuracy on other data is no verdict. Compared is False where it differs."""
    then_fp = recorded.get("profile", {}).get("task", {})
    now_fp = task.fingerprint()
    differs = data_differs(then_fp, now_fp)  # the data, not where it lives: a study folder moved is the same
    # A user task names its data's hash as it likes: examples/own_model's "sha256" was shown as "-", as if unrecorded.
    hashed = next((k for k in then_fp if k == "sha256" or k.endswith("_sha256")), "")
    sha = (str(then_fp.get(hashed, "-"))[:12], str(now_fp.get(hashed, "-"))[:12])
    return Check("task data", *sha, "-", f"differs ({', '.join(differs)}): accuracy not comparable" if differs
                 else "same", compared=not differs)


def _accuracy_checks(model: Any, task: Any, dev: Any, recorded: dict[str, Any], tol: float) -> list[Check]:
    data = data_check(recorded, task)
    same = data.compared
    then = recorded.get("metrics", {}).get("accuracy")
    now = task.evaluate(model, dev)["accuracy"]
    if then is None or not same:
        return [data, Check("accuracy", _num(then), _num(now), "-", "other data: not compared", compared=False)]
    ok = abs(now - then) <= tol
    verdict = f"{'ok' if ok else 'FAIL'} (tol ±{tol:g})"
    return [data, Check("accuracy", _num(then), _num(now), f"{now - then:+.4f}", verdict, failed=not ok)]


def _speed_checks(model: Any, task: Any, dev: Any, hardware: Any, recorded: dict[str, Any],
                  tol: float) -> list[Check]:
    rounds: list[tuple[dict[str, float], dict[str, Any]]] = []
    then = recorded.get("metrics", {})
    batches = recorded.get("profile", {}).get("batches", {})
    then_fp = recorded.get("fingerprint") or recorded.get("profile", {}).get("fingerprint", {})
    with MeasureGate(device_key(dev), announce="dsnas verify").exclusive():
        rounds += [measure(model, task, dev, hardware) for _ in range(SPEED_ROUNDS)]
        profile = rounds[0][1]
        # Every field of a fingerprint is stable on one machine and install (none is volatile), so the whole
        # dict must match: another host, CPU, GPU, torch or dsnas version may legitimately measure other numbers.
        differs = sorted(k for k in set(then_fp) | set(profile["fingerprint"])
                         if then_fp.get(k) != profile["fingerprint"].get(k))
        allocator = _allocator_check(recorded.get("profile", {}), profile)
        why_not = "other device" if differs else ("" if allocator.compared else "other allocator policy")
        # Figures that will not be compared need no more sets to be judged.
        for _ in range(0 if why_not else EXTRA_SETS):
            now = _figures(rounds)
            if not any(_unsteady(then.get(k), now[k], _tolerance(tol, batches, k)) for k in _speed_keys(now)):
                break
            time.sleep(UNSTEADY_PAUSE_S)
            rounds += [measure(model, task, dev, hardware) for _ in range(SPEED_ROUNDS)]
    now = _figures(rounds)
    checks = [Check("device", then_fp.get("device", "-"), dev.type, "-",
                    f"other device ({_differences(differs, then_fp)})" if differs else "same fingerprint",
                    compared=not differs), allocator]
    if not why_not and all(p.get("disturbed") for _, p in rounds):
        why_not = "every round disturbed (other processes or a slow host; see dsnas profile): run again when quiet"
    notes = []
    left_out = sum(bool(p.get("disturbed")) for _, p in rounds)
    if 0 < left_out < len(rounds):
        notes.append(f"{left_out} disturbed round{'s' * (left_out > 1)} left out")
    if recorded.get("profile", {}).get("disturbed"):  # likely slower than the bundle: a drift that says so
        notes.append("recorded while disturbed")
    if all(p.get("disturbed") is None for _, p in rounds):  # no /proc/stat: a verdict blind to a busy machine
        why = (rounds[0][1].get("unavailable") or {}).get("disturbance")
        notes.append("others' use of the CPUs unknown" + (f" ({why})" if why else ""))
    for key in _speed_keys(now):
        spread = _spread(batches, key)
        wide = [f"recorded spread {spread:.3g} counted as {MAX_SPREAD_TOL:g}"] if spread > MAX_SPREAD_TOL else []
        checks.append(_relative(key, then.get(key), now[key], _tolerance(tol, batches, key), why_not,
                                "; ".join(notes + wide)))
    return checks


def _figures(rounds: list[tuple[dict[str, float], dict[str, Any]]]) -> dict[str, list[float]]:
    """Each figure's values over the rounds that other processes or a slowed host did not disturb
    (dsnas.profiler.disturbance: measure() tries three times before it gives a disturbed round); over every round
    when each was."""
    quiet = [metrics for metrics, profile in rounds if not profile.get("disturbed")] or [m for m, _ in rounds]
    return {key: [metrics[key] for metrics in quiet] for key in quiet[0]}


def _allocator_check(then: dict[str, Any], now: dict[str, Any]) -> Check:
    """Speed is compared only when it was measured with the allocator's policy of now (dsnas.allocator): glibc's
    default faults freed memory in again on each call, by an amount the process's history decides."""
    policy_then = (then.get("allocator") or {}).get("policy", "allocator default (not recorded)")
    policy_now = now["allocator"]["policy"]
    if policy_then == policy_now:
        return Check("allocator", policy_then, policy_now, "-", "same")
    return Check("allocator", policy_then, policy_now, "-", f"other policy: speed not compared ({PROFILE_IT})",
                 compared=False)


def _differences(differs: list[str], then: dict[str, Any]) -> str:
    """The fingerprint fields that differ, apart from those an older dsnas did not record."""
    changed = [k for k in differs if k in then]
    absent = [k for k in differs if k not in then]
    return "; ".join(part for part in (f"{', '.join(changed)} differ" if changed else "",
                                       f"{', '.join(absent)} not recorded then" if absent else "") if part)


def _speed_keys(now: dict[str, list[float]]) -> list[str]:
    return sorted(k for k in now if k.startswith(("latency_ms_bs", "throughput_tok_s_bs")))


def _tolerance(tol: float, batches: dict[str, Any], key: str) -> float:
    """The ratio a figure may drift by: ``tol``, or the recorded spread where wider, up to MAX_SPREAD_TOL. The same
    for the verdict and for whether to measure more sets (with the spread uncapped there, a wide one skipped them)."""
    return max(tol, min(_spread(batches, key), MAX_SPREAD_TOL))


def _spread(batches: dict[str, Any], key: str) -> float:
    """A drift inside the recorded p10-p90 spread is no evidence of a change: the tolerance is at least that (up
    to MAX_SPREAD_TOL)."""
    return batches.get(key.rsplit("_bs", 1)[1], {}).get("spread") or 0.0


def _median_within(then: float, rounds: list[float], tol: float) -> bool:
    """Whether the rounds' median is within a ratio of 1 + ``tol`` of the recorded figure, either way. In ratios, not
    differences: a figure 1000x smaller is a drift of -100% and would hide inside a tolerance widened past 100%."""
    ratio = statistics.median(rounds) / then if then else math.inf
    return 1 / (1 + tol) <= ratio <= 1 + tol


def _unsteady(then: float | None, rounds: list[float], tol: float) -> bool:
    """The median fails while the rounds themselves differ by more than the tolerance: the machine was unsteady."""
    if not then or min(rounds) <= 0:
        return False
    return not _median_within(then, rounds, tol) and max(rounds) / min(rounds) > 1 + tol


def _relative(key: str, then: float | None, rounds: list[float], tol: float, why_not: str, note: str = "") -> Check:
    """The median of the rounds against the recorded figure (itself a median): it fails when their ratio is beyond
    1 + ``tol`` either way. The rounds' range is shown beside it: a wide one says the machine was busy. ``why_not``:
    why the figures are not comparable ("" when they are); ``note``: said after the verdict."""
    now = statistics.median(rounds)
    shown = f"{_num(now)} ({_num(min(rounds), 3)}-{_num(max(rounds), 3)})"
    if then is None:
        return Check(key, "-", shown, "-", "not recorded", compared=False)
    drift = (now - then) / then if then else math.inf
    if why_not:
        return Check(key, _num(then), shown, f"{drift:+.0%}", f"{why_not}: not compared", compared=False)
    ok = _median_within(then, rounds, tol)
    verdict = f"{'ok' if ok else 'FAIL'} (median of {len(rounds)} rounds within x/÷ {1 + tol:.3g})"
    if note:
        verdict += f"; {note}"
    return Check(key, _num(then), shown, f"{drift:+.0%}", verdict, failed=not ok)
