"""Timing holds freed memory (dsnas.allocator): a call must not page-fault in again what the last call freed."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Page faults per allocation of a 40 MiB block, freed each time: above glibc's largest dynamic mmap threshold
# (32 MiB), so by default each allocation is a fresh mapping that faults in every page.
_BLOCK = """
import resource, sys, torch
from dsnas.allocator import hold_freed_memory
if sys.argv[1] == "held" and hold_freed_memory()["mmap_threshold"] <= 40 << 20:
    sys.exit(print("refused"))  # this glibc holds smaller blocks only
for _ in range(10):  # the heap grows until freed blocks coalesce into one that fits the next (aligned) request
    torch.ones(10 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(10 << 20)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""

# The share of calls of a quickstart-sized model at batch 32 that page-fault at all, over dsnas's own timing after its
# warm-up.
_MODEL = """
import resource, torch
from dsnas.models import build
from dsnas.profiler.timing import time_calls
model = build({"family": "transformer_lm", "vocab_size": 256, "context": 64, "d_model": 128,
               "layers": [{"n_heads": 2, "ffn_ratio": 4}, {"n_heads": 2, "ffn_ratio": 4}]}).eval()
x = torch.randint(0, 256, (32, 64))
faults = []
def call():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
with torch.inference_mode():
    timing = time_calls(call, lambda: None, warmup_s=0.2, measure_s=0.0, max_repeats=20)
print(sum(f > 0 for f in faults[-timing.repeats:]) / timing.repeats)
"""


def _faults(script: str, *args: str) -> float:
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    if done.stdout.split()[-1] == "refused":
        pytest.skip("this glibc refused a 1 GiB mmap threshold")
    return float(done.stdout.split()[-1])


def test_a_freed_block_is_not_faulted_in_again_once_memory_is_held():
    pages = (40 << 20) // 4096
    assert _faults(_BLOCK, "default") >= 0.9 * pages  # glibc's default: every page, every time
    assert _faults(_BLOCK, "held") < 0.01 * pages


def test_dsnas_timing_runs_a_model_without_page_faults():
    # Unheld, every call of it faults: 346-1,066 pages a call on a 2-core Xeon, by the heap's history
    # (dsnas.allocator), 1,760-7,072 on a 2-core AVX2 EPYC. Held, most calls fault nothing; now and then one faults
    # 256-1,025 pages (the heap still growing to its steady size; 0-2 calls of 10 on the EPYC, also with the
    # garbage collector off), which is new memory, not what the last call freed.
    assert _faults(_MODEL) < 0.5
