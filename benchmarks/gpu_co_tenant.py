"""Another process on the GPU: loops bf16 8192^3 GEMMs on the current CUDA device for SECONDS, after printing
"ready" once its context and kernels are warm. The GPU check and tests/test_gpu_share.py run it beside a dsnas
measurement, which must see it in its others' share of the SMs (dsnas.profiler.gpu_share).

    python benchmarks/gpu_co_tenant.py SECONDS
"""

from __future__ import annotations

import sys
import time

import torch


def main(seconds: float) -> None:
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
    main(float(sys.argv[1]))
