"""A slowed host is caught: the reference GEMM's slowdown against the fastest seen (recorded probes), a slowdown
counted as disturbance beside others' CPU share, and a real competitor /proc/stat cannot see (threads of this very
process) caught during a measurement."""

from __future__ import annotations

import os
import threading
import time

import pytest

from dsnas.profiler import host_speed
from dsnas.profiler.disturbance import MAX_ATTEMPTS, SLOWDOWN_LIMIT, Share, least_disturbed
from dsnas.profiler.timing import HostGate, time_calls


@pytest.fixture
def probes(monkeypatch):
    """probe_ms answers from a list, in order; the process's fastest probes start empty."""
    answers: list[float] = []
    monkeypatch.setattr(host_speed, "probe_ms", lambda calls=None: answers.pop(0))
    monkeypatch.setattr(host_speed, "_fastest", {})
    return answers


def test_the_slowdown_is_against_the_fastest_probe_seen_or_the_stored_reference(probes):
    probes.extend([0.30, 0.20, 0.25, 0.12, 0.18])
    assert host_speed.slowdown(0.20) == pytest.approx(1.5)  # 0.30 against the stored 0.20
    assert host_speed.slowdown(0.20) == pytest.approx(1.0)
    assert host_speed.slowdown(0.20) == pytest.approx(1.25)
    assert host_speed.slowdown(0.20) == pytest.approx(1.0)  # faster than the stored reference: the new fastest
    assert host_speed.slowdown(0.20) == pytest.approx(1.5)  # 0.18 against 0.12, not against 0.20
    assert host_speed.slowdown(None) is None and probes == []  # no reference: not probed at all


def test_a_slowed_host_is_disturbance_beside_the_cpu_shares_and_the_least_disturbed_attempt_is_kept():
    assert not Share(0.0, 0.0, host_slowdown=1.25).disturbed() and Share(0.0, 0.0, host_slowdown=1.35).disturbed()
    assert Share(None, None, "no /proc/stat", host_slowdown=1.5).disturbed()  # one reading suffices
    assert Share(None, None, "no /proc/stat").disturbed() is None and Share(0.0, 0.0).disturbed() is False
    # Severity: how far past its line the worse reading is. 1.6x slowed is twice the line; 15% of others 1.5x.
    assert Share(0.15, 0.0, host_slowdown=1.6).severity() == pytest.approx(2.0)
    assert Share(0.15, 0.0, host_slowdown=1.1).severity() == pytest.approx(1.5)

    readings = iter([Share(0.02, 0.0, host_slowdown=1.9), Share(0.12, 0.0, host_slowdown=1.05),
                     Share(0.0, 0.0, host_slowdown=1.5)])
    result, record = least_disturbed(lambda: ("timing", next(readings)), lambda: None)
    assert record["kept"] == 1 and record["disturbed"] is True and len(record["attempts"]) == MAX_ATTEMPTS
    assert record["host_slowdown"] == 1.05 and record["slowdown_limit"] == SLOWDOWN_LIMIT
    assert [a["host_slowdown"] for a in record["attempts"]] == [1.9, 1.05, 1.5]


def test_a_probe_times_the_reference_gemm():
    # 256^3 fp32 is 33.6 MFLOP: no CPU does it in a microsecond, and no working one takes a second.
    assert 0.001 < host_speed.probe_ms() < 1000.0
    assert host_speed.reference_ms(probes=2) > 0.001


def test_threads_of_this_process_competing_for_the_cores_are_caught_by_the_host_probe(measure_beside, monkeypatch,
                                                                                      tmp_path):
    """Threads of this very process multiplying matrices, twice as many as its CPUs, started by the
    model's first call: /proc/stat counts their work as this process's own, so others' share cannot see them, but
    the reference GEMM between the timed calls runs slower than at its fastest, in every attempt."""
    import torch

    from dsnas.spec import HardwareSpec

    monkeypatch.setenv("DSNAS_CACHE_DIR", str(tmp_path / "cache"))  # the reference is measured here, quiet
    stop = threading.Event()
    competitors: list[threading.Thread] = []
    a = torch.randn(256, 256)

    def multiply_forever() -> None:
        with torch.inference_mode():
            while not stop.is_set():
                a @ a  # torch lets go of the GIL inside an op: these threads run beside the timed calls

    def start_competitors() -> None:
        competitors.extend(threading.Thread(target=multiply_forever, daemon=True)
                           for _ in range(2 * len(os.sched_getaffinity(0))))
        for thread in competitors:
            thread.start()

    def stop_competitors() -> None:
        stop.set()
        for thread in competitors:
            thread.join()

    hardware = HardwareSpec(device="cpu", batch_sizes=(8,), warmup_s=0.1, measure_s=0.3, max_measure_s=0.3)
    metrics, profile = measure_beside(start_competitors, stop_competitors, hardware)
    record = profile["batches"]["8"]["disturbance"]
    slowdowns = [a["host_slowdown"] for a in record["attempts"]]
    assert len(slowdowns) == MAX_ATTEMPTS and min(slowdowns) > SLOWDOWN_LIMIT, record
    assert record["disturbed"] is True and profile["disturbed"] is True and metrics["disturbed"] == 1.0
    assert record["host_slowdown"] > SLOWDOWN_LIMIT and profile["ceilings"]["reference_ms"] > 0


class _Spells:
    """A host that runs slow in spells: each probe moves it to the next phase of ``phases`` (True: slow) and
    reads 2.0 when slow, 1.0 when not; a call takes 3 ms while slow and 1 ms otherwise."""

    def __init__(self, phases: list[bool]) -> None:
        self.phases, self.probes, self.slow = phases, 0, False

    def probe(self) -> float:
        self.slow = self.phases[self.probes % len(self.phases)]
        self.probes += 1
        return 2.0 if self.slow else 1.0

    def call(self) -> None:
        time.sleep(0.003 if self.slow else 0.001)


def test_only_calls_timed_while_the_host_ran_at_speed_count():
    """Three blocks at speed, three slow: without the gate a third of the calls or more are slow ones and the
    p90 is a slow call; with it, no slow call is kept (a block that ends in a slow probe is dropped too)."""
    host = _Spells([False, False, False, True, True, True])
    gate = HostGate(host.probe, limit=SLOWDOWN_LIMIT, block_s=0.01, block_calls=4)
    timing = time_calls(host.call, lambda: None, warmup_s=0, measure_s=0.3, max_measure_s=0.3, ci_tolerance=1e-9,
                        gate=gate)
    assert timing.p90_ms < 2.5 and timing.host_slowdown == 1.0, timing
    assert 0 < timing.host_blocks_kept < timing.host_blocks and host.probes == timing.host_blocks + 1
    # Kept: the blocks between two probes at speed. Block k lies between probes k-1 and k, and probes 0-2 of
    # each six read 1.0: blocks 1, 2, 7, 8, 13 ...
    assert timing.host_blocks_kept == sum(k % 6 in (1, 2) for k in range(1, timing.host_blocks + 1))
    host, calls = _Spells([False, False, False, True, True, True]), 0

    def the_same_spells_without_the_gate() -> None:
        nonlocal calls
        if calls % 10 == 0:
            host.probe()  # the phase moves on every 10 calls
        calls += 1
        host.call()

    ungated = time_calls(the_same_spells_without_the_gate, lambda: None, warmup_s=0, measure_s=0.3,
                         max_measure_s=0.3, ci_tolerance=1e-9)
    assert ungated.p90_ms >= 3.0 and ungated.host_blocks == 0 and ungated.host_slowdown is None


def test_a_host_never_at_speed_ends_the_window_early_with_every_call_and_its_slowdown():
    host = _Spells([True])
    gate = HostGate(host.probe, limit=SLOWDOWN_LIMIT, block_s=0.01, block_calls=4)
    started = time.perf_counter()
    timing = time_calls(host.call, lambda: None, warmup_s=0, measure_s=0.1, max_measure_s=5.0, gate=gate)
    assert time.perf_counter() - started < 1.0  # not on to the 5 s cap: no block at speed would come of it
    assert timing.host_blocks_kept == 0 and timing.host_slowdown == 2.0 and timing.median_ms >= 3.0
    assert timing.repeats >= 10 and Share(0.0, 0.0, host_slowdown=timing.host_slowdown).disturbed()


def test_the_probe_runs_inside_and_outside_inference_mode_in_either_order(monkeypatch):
    """Its operands are made once: made inside inference mode (during a measurement), they could not be written
    into outside it (the ceilings' check), and this order failed once."""
    import torch

    monkeypatch.setattr(host_speed, "_operands", [])
    with torch.inference_mode():
        assert host_speed.probe_ms(calls=host_speed.QUICK_CALLS) > 0
    assert host_speed.probe_ms() > 0


def test_a_block_of_short_calls_leaves_out_its_first_and_a_block_of_long_ones_keeps_every_call():
    """The first call after a probe finds the probe's operands in the caches: left out where a block holds many
    calls, kept where it holds two (long calls), so that the gate does not make a slow model time more calls."""
    for sleep_s, left_out_per_block in ((0.0005, 1), (0.004, 0)):
        calls: list[None] = []
        gate = HostGate(lambda: 1.0, limit=SLOWDOWN_LIMIT, block_s=0.005)
        timing = time_calls(lambda: calls.append(time.sleep(sleep_s)), lambda: None, warmup_s=0, measure_s=0.1,
                            max_measure_s=0.1, ci_tolerance=1e-9, gate=gate)
        timed = len(calls) - timing.warmup
        assert timing.host_blocks == timing.host_blocks_kept > 0
        assert timing.repeats == timed - left_out_per_block * timing.host_blocks, (sleep_s, timing)
