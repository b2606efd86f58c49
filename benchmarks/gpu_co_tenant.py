"""Another process on the GPU: loops bf16 8192^3 GEMMs on the current CUDA device for SECONDS, after printing
"ready" once its context and kernels are warm. The GPU check and tests/test_gpu_share.py start it (start()) beside
a dsnas measurement, which must see it in its others' share of the SMs (dsnas.profiler.gpu_share).

    python benchmarks/gpu_co_tenant.py SECONDS
"""

from __future__ import annotations

import select
import subprocess
import sys
import time


def start(seconds: float, ready_within_s: float = 120.0) -> subprocess.Popen:
    """This script as a child process, returned once it is ready (its GEMMs running); killed, with RuntimeError,
    if it exits or stays silent for ``ready_within_s`` (a CUDA start that hangs must not hang the caller)."""
    child = subprocess.Popen([sys.executable, __file__, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    readable, _, _ = select.select([child.stdout], [], [], ready_within_s)
    line = child.stdout.readline().strip() if readable else ""
    if line != "ready":
        child.kill()
        child.wait()
        raise RuntimeError(f"the co-tenant process did not start: exit status {child.returncode}, said {line!r}")
    return child


def main(seconds: float) -> None:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(a)
    for _ in range(3):
        torch.mm(a, a, out=out)
    torch.cuda.synchronize()
    print("ready", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(20):  # ~30 ms of GEMMs on an H100 between syncs: the SMs stay busy
            torch.mm(a, a, out=out)
        torch.cuda.synchronize()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seconds", type=float, help="how long to keep the GPU busy")
    main(parser.parse_args().seconds)
