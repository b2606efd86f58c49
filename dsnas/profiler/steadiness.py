"""Is this host steady enough for repeatable timings? `dsnas doctor`'s "host speed" row: a second of host-speed
probes (dsnas.profiler.host_speed) against the reference stored with this machine's CPU ceilings. A timing taken
while the host runs more than SLOWDOWN_LIMIT times slower is flagged disturbed and measured again, so a host that
often does gives retries and flags: on a 2-core EPYC VM the reference GEMM ran in slow spells of a fraction of a
second to several seconds at a 1-thread GEMM's time, with no process using the CPUs."""

from __future__ import annotations

from dsnas.profiler import host_speed
from dsnas.profiler.capabilities import Capability, usable_cpus
from dsnas.profiler.ceilings import stored_reference
from dsnas.profiler.disturbance import SLOWDOWN_LIMIT
from dsnas.profiler.timing import cpu_threads

# A host whose probes fall past the disturbance line this often makes retries common, not rare.
UNSTEADY_SHARE = 0.05


def host_speed_row(threads: int | None = None) -> Capability:
    """The row: steady or not, with the probes' median and slowest against the fastest (the stored reference where
    it is faster than every probe: a slow spell can outlast the second) and their share above the line. Probed
    with ``threads`` (default: the CPUs this process may use), as a measurement probes: with torch's own count
    (1 under OMP_NUM_THREADS=1) it found no reference stored for it and called a host steady whose 2-thread
    probes ran up to 200x slow."""
    threads = threads or usable_cpus()
    with cpu_threads(threads):
        found = host_speed.steadiness(reference_ms=stored_reference(threads))
    slowed = found.share_slowed(SLOWDOWN_LIMIT)
    against = "the stored reference" if found.against_reference else \
        "the fastest probe" + ("" if found.reference_ms is not None else " (none stored yet)")
    detail = (f"{len(found.probes)} probes over 1 s of a {host_speed.REFERENCE_N}^3 fp32 GEMM on {threads} "
              f"thread(s) against {against}, "
              f"{found.fastest_ms:.3f} ms: median {found.median:.2f}x, slowest {found.slowest:.2f}x, "
              f"{slowed:.0%} above {SLOWDOWN_LIMIT:g}x (where a timing counts as disturbed)")
    if slowed < UNSTEADY_SHARE:
        return Capability("host speed", True, f"steady: {detail}")
    return Capability("host speed", False, f"unsteady: {detail}; expect retries and disturbed flags (a "
                      "hypervisor's other guests, a lowered clock)")
