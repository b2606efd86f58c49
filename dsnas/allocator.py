"""The process's memory allocator while timing: glibc's malloc made to keep the memory a call frees, so that the
next call does not fault it in again. Reading it loads no torch.

glibc by default hands a large freed block back to the kernel (a block above its dynamic mmap threshold is
unmapped, and free memory at the top of a heap is trimmed), and the next call page-faults it in afresh. How much
depends on the heap's history, not on the model: on a 2-core Xeon (2026-12-05) the same bf16 d384 model at batch 32
took 5,000-6,800 faults and 14.1-15.7 ms a call in some processes, 240-1,040 faults and 8.2-9.4 ms in others, and
7.7-8.8 ms with no fault in every process once the memory was held. A d128 fp32 model at batch 32 spent 10% of its
time faulting on 2 threads and 30% on one. Deployments of CPU inference hold their memory for this reason
(jemalloc or tcmalloc, as PyTorch's CPU tuning guide advises); a search ranks the model, not glibc's trimming."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and stay there once freed. glibc may refuse a threshold above its
# heap's limit (32 MiB by the manual on 64-bit; 2.36 accepts 1 GiB); the next size down is then tried.
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
NEVER_TRIM = 2**31 - 1  # the largest int mallopt takes: free memory at a heap's top is never given back
POLICY = "held"  # what the timing protocol records; "allocator default" where holding was not possible


@functools.cache
def hold_freed_memory() -> dict[str, object]:
    """Make the allocator keep freed memory (once per process; it stays so), and say what it is: ``policy`` is
    "held" with the thresholds set, or "allocator default" with ``why``. Every dsnas timing calls it first."""
    libc_name, version = platform.libc_ver()
    if libc_name != "glibc":
        return {"policy": "allocator default", "why": f"not glibc ({libc_name or platform.system()}): its "
                "allocator is left as it is"}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError as err:
        return {"policy": "allocator default", "why": f"glibc {version} could not be loaded ({err})"}
    mmap_threshold = next((t for t in MMAP_THRESHOLDS if libc.mallopt(M_MMAP_THRESHOLD, t) == 1), None)
    if mmap_threshold is None or libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) != 1:
        return {"policy": "allocator default", "why": f"glibc {version} refused mallopt"}
    return {"policy": POLICY, "allocator": f"glibc {version}", "mmap_threshold": mmap_threshold,
            "trim_threshold": NEVER_TRIM}
