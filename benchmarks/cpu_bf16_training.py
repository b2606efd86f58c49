"""Does bf16 training pay on this CPU? A training step (forward, backward, AdamW) of a 2-layer transformer_lm with
bf16 engine layers against the same model in fp32, at batch 32 x 64 tokens, widths 128-512, FFN ratio 4. On a CPU
without native bf16 arithmetic (AVX2 only) bf16 is many times slower; with AVX512-BF16 or AMX it is not, and dsnas
trains bf16 layers in bf16 (docs/engine.md). Medians of 8 steps after 3 warm-up steps.

Run:  python benchmarks/cpu_bf16_training.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def arch(precision: str, d_model: int) -> dict:
    return {"family": "transformer_lm", "d_model": d_model, "vocab_size": 256, "context": 64,
            "layers": [{"n_heads": 4, "ffn_ratio": 4, "precision": precision, "sparsity": "dense"}] * 2}


def step_seconds(precision: str, d_model: int) -> float:
    import torch
    import torch.nn.functional as F

    from dsnas.models import build

    torch.manual_seed(0)
    model = build(arch(precision, d_model))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x, y = torch.randint(0, 256, (32, 64)), torch.randint(0, 256, (32, 64))

    def step() -> None:
        loss = F.cross_entropy(model(x).reshape(-1, 256).float(), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    samples = []
    for _ in range(8):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    import argparse

    from dsnas.profiler.capabilities import cpu_features, cpu_model

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help, not a whole run

    print(f"machine: {cpu_model()} ({', '.join(cpu_features())})")
    for d in (128, 256, 512):
        fp32, bf16 = step_seconds("fp32", d), step_seconds("bf16", d)
        print(f"d {d}: training step fp32 {fp32 * 1e3:.1f} ms, bf16 {bf16 * 1e3:.1f} ms: bf16 takes "
              f"{bf16 / fp32:.2f}x the fp32 time", flush=True)


if __name__ == "__main__":
    main()
