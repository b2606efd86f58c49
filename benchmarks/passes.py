"""Effect of the graph substitution passes (fx_passes.py beside this file) on the transformer family at the shapes the
search uses, in eager PyTorch and under torch.compile (inductor), against the same traced graph without the passes.

Two models per architecture, both built by dsnas.models.transformer_lm.build (same weights):

  family   the blocks as the family writes them (the model the search measures)
  verbose  each block's forward written the long way round, as ported attention code often is: a view chain for
           q/k/v, a reshape to the transposed shape, transpose/permute chains, contiguous() after layer_norm and
           before view. It computes the same function; it exists to show what the passes do when they fire.

For each (model, arch, batch rows x context 64) and mode (eager, compiled), baseline = fx.symbolic_trace-style
trace without passes, optimized = the same trace after fx_passes.run_passes. Reported:

  latency  median over --repeats samples per arm, sampled interleaved A B B A ... so drift hits both arms
           (one sample = the mean of enough calls to last ~20 ms); torch.no_grad, fp32
  memory   on CUDA: torch.cuda.max_memory_allocated during one forward, above what was allocated before it. On the
           CPU: the peak of tensor bytes allocated during one forward and alive at the same time, from the CPU
           allocator's events recorded by torch.profiler(profile_memory=True) (each op's own allocations minus
           frees, in time order); weights and the input are allocated before and not counted
  nodes    fx graph nodes before and after the passes, and the rewrites per pass
  compile  torch.compile(backend="inductor"), every batch size compiled statically (automatic dynamic shapes off);
           "code" says whether Inductor generated the same code for both arms (comments aside)

  ops      aten ops dispatched per forward (outermost profiler events) and aten::copy_ calls (data copies):
           counts that no noise touches, showing what the passes change at run time

Ratios are optimized / baseline: below 1.00 means the passes helped. "iqr" is the interquartile range of the
per-round latency ratios (each round times both arms back to back): the noise to read a ratio against. The family
model has nothing for the passes to rewrite, so its rows are an A/A control (in compiled mode the same compiled
graph is timed against itself): their ratios show how far from 1.00 noise alone moves a ratio on this machine.

Threads: one by default. What the passes can change is per-op overhead, not how an op's work is split between
threads; and on a machine shared with other work, every OpenMP barrier of a 2-thread forward waits for a descheduled
thread, which measured 100x slower forwards here (220 ms instead of 2 ms at batch 1). --threads N to override.

Run:  python benchmarks/passes.py [--quick] [--repeats 7] [--no-compile] [--threads 1]
      (--quick: d64 L2 only, batch 1 and 32, 5 repeats: about a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fx_passes import run_passes, trace  # noqa: E402  (beside this file)

from dsnas.models.transformer_lm import build  # noqa: E402

CONTEXT, VOCAB = 64, 256
ARCHS = {
    "d64 L2": {"d_model": 64, "layers": [{"n_heads": 2, "ffn_ratio": 4}, {"n_heads": 4, "ffn_ratio": 2}]},
    "d128 L4": {"d_model": 128, "layers": [{"n_heads": 4, "ffn_ratio": 4}, {"n_heads": 2, "ffn_ratio": 2}] * 2},
}
BATCHES = (1, 32, 256)
SAMPLE_S = 0.05


def verbose_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The family's Block.forward (fp32 path), written with the redundancies graph passes are meant to remove."""
    b, t, d = x.shape
    h = self.n_heads
    hd = d // h
    qkv = self.qkv(self.ln1(x).contiguous())  # layer_norm's output is contiguous already
    q, k, v = qkv.view(b, t, 3 * d).view(b, t, 3, h, hd).unbind(2)  # a view chain
    q = q.transpose(1, 2).reshape(b, h, t, hd)  # a reshape to the transposed shape itself
    k = k.permute(0, 2, 3, 1).transpose(-1, -2)  # a permute chain
    v = v.transpose(1, 2).transpose(1, 2).transpose(1, 2)  # transposes that cancel but for one
    att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.proj(att.transpose(1, 2).contiguous().view(b, t, d))  # contiguous().view(): reshape()
    return x + self.down(F.gelu(self.up(self.ln2(x).contiguous())))


def make_model(arch_name: str, verbose: bool, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build({"family": "transformer_lm", "vocab_size": VOCAB, "context": CONTEXT, **ARCHS[arch_name]})
    if verbose:
        for block in model.blocks:
            block.forward = types.MethodType(verbose_forward, block)
    return model.eval().to(device)


def arms(model: torch.nn.Module, example: torch.Tensor) -> tuple:
    """(baseline, optimized, counts): both traced the same way; only the optimized one ran the passes."""
    base, opt = trace(model, example.device), trace(model, example.device)  # two graphs, one set of weights
    counts = run_passes(opt, example_inputs=(example,))
    return base, opt, counts


def sample(fn, x: torch.Tensor, calls: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    sync(device)
    return (time.perf_counter() - start) / calls


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def latency(base, opt, x: torch.Tensor, repeats: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Seconds per call of each arm, one sample per round, sampled A B B A A B ... (each arm first in half)."""
    for fn in (base, opt):  # warm-up: caches, allocator, lazy init
        fn(x)
    once = min(sample(fn, x, 1, device) for fn in (base, opt))
    calls = max(1, int(SAMPLE_S / max(once, 1e-6)))
    times: dict[int, list[float]] = {0: [], 1: []}
    for r in range(repeats):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for arm in order:
            times[arm].append(sample((base, opt)[arm], x, calls, device))
    return times[0], times[1]


def profile_call(fn, x: torch.Tensor, device: torch.device) -> dict:
    """One call under torch.profiler: peak tensor bytes (see the module docstring), aten ops dispatched (outermost
    events) and data copies (aten::copy_ anywhere: what contiguous(), a copying reshape and .to end in)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=device.type == "cpu") as prof:
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        fn(x)
        sync(device)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        live = peak = 0
        for event in events:
            live += event.self_cpu_memory_usage
            peak = max(peak, live)
    ops = sum(e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))
              for e in events)  # outermost aten ops: eager dispatches and a compiled graph's extern kernels
    return {"peak": peak, "ops": ops, "copies": sum(e.name == "aten::copy_" for e in events)}


def measure(model_name: str, arch_name: str, batches, modes, repeats: int, device: torch.device) -> tuple:
    model = make_model(arch_name, model_name == "verbose", device)
    example = torch.randint(0, VOCAB, (2, CONTEXT), device=device)
    base, opt, counts = arms(model, example)
    meta = opt.meta["dsnas.passes"]
    rewrites = sum(counts.values())
    rows = []
    for mode in modes:
        fns = (base, opt)
        if mode == "compiled":
            # No rewrite: the two graphs are the same code, so the compiled one is timed against itself (an A/A
            # control: its ratio is the noise floor) instead of compiling it twice.
            compiled = torch.compile(base)
            fns = (compiled, torch.compile(opt) if rewrites else compiled)
        for batch in batches:
            start = time.perf_counter()
            row = {"model": model_name, "arch": arch_name, "batch": batch, "mode": mode, "rewrites": rewrites,
                   "nodes": f"{meta['nodes_before']}->{meta['nodes_after']}"}
            x = torch.randint(0, VOCAB, (batch, CONTEXT), device=device)
            row.update(measure_shape(fns, x, mode, repeats, device))
            rows.append(row)
            print(f"  {model_name:8s}{arch_name:9s}b{batch:<4d}{mode:9s}{row['t_opt'] / row['t_base']:6.3f}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    return rows, counts


def first_calls(fns: tuple, x: torch.Tensor, mode: str) -> tuple:
    """Both arms' outputs, and whether Inductor generated the same code for both (compiled mode: the first call at a
    new batch size compiles; the code is compared without its comments, which name the fx nodes)."""
    if mode == "eager" or fns[0] is fns[1]:
        return fns[0](x), fns[1](x), "-"
    (want, code_base), (got, code_opt) = run_and_get_code(fns[0], x), run_and_get_code(fns[1], x)
    return want, got, "same" if kernels(code_base) == kernels(code_opt) else "differs"


def kernels(sources: list[str]) -> list[str]:
    return [line for src in sources for line in src.splitlines() if not line.strip().startswith("#")]


def measure_shape(fns: tuple, x: torch.Tensor, mode: str, repeats: int, device: torch.device) -> dict:
    want, got, code = first_calls(fns, x, mode)
    s_base, s_opt = latency(*fns, x, repeats, device)
    paired = sorted(o / b for o, b in zip(s_opt, s_base))  # each round's ratio: drift within a round cancels
    iqr = paired[(3 * len(paired)) // 4] - paired[len(paired) // 4]
    p_base, p_opt = profile_call(fns[0], x, device), profile_call(fns[1], x, device)
    return {"same": torch.equal(want, got), "code": code, "t_base": statistics.median(s_base),
            "t_opt": statistics.median(s_opt), "iqr": iqr, "m_base": p_base["peak"], "m_opt": p_opt["peak"],
            "ops": f"{p_base['ops']}->{p_opt['ops']}", "copies": f"{p_base['copies']}->{p_opt['copies']}"}


COLUMNS = (("model", "7s"), ("arch", "7s"), ("batch", "5d"), ("mode", "8s"), ("nodes", "6s"), ("rw", "2d"),
           ("aten ops", "8s"), ("copies", "7s"), ("equal", "5s"), ("code", "7s"), ("base ms", "8.3f"),
           ("opt ms", "8.3f"), ("ratio", "5.2f"), ("iqr", "4.2f"), ("base MiB", "8.2f"), ("opt MiB", "7.2f"),
           ("ratio", "5.2f"))


def print_table(rows: list[dict]) -> None:
    print(" ".join(f"{name:>{fmt.rstrip('sdf').split('.')[0]}}" for name, fmt in COLUMNS))
    for r in rows:
        values = (r["model"], r["arch"], r["batch"], r["mode"], r["nodes"], r["rewrites"], r["ops"], r["copies"],
                  str(r["same"]), r["code"], r["t_base"] * 1e3, r["t_opt"] * 1e3, r["t_opt"] / r["t_base"], r["iqr"],
                  r["m_base"] / 2**20, r["m_opt"] / 2**20, r["m_opt"] / r["m_base"] if r["m_base"] else float("nan"))
        print(" ".join(f"{v:>{fmt}}" for v, (_, fmt) in zip(values, COLUMNS)))


def print_summary(rows: list[dict], modes: tuple[str, ...]) -> None:
    """Per mode: the verbose model's median ratios, read against the family's (A/A: identical graphs)."""
    for mode in modes:
        for model_name in ("family", "verbose"):
            picked = [r for r in rows if r["mode"] == mode and r["model"] == model_name]
            ratios = sorted(r["t_opt"] / r["t_base"] for r in picked)
            mem = statistics.median(r["m_opt"] / r["m_base"] for r in picked if r["m_base"])
            label = "A/A control" if model_name == "family" else "passes fire"
            print(f"{mode:8s} {model_name:8s} ({label}): latency ratio median {statistics.median(ratios):.3f} "
                  f"(min {ratios[0]:.3f}, max {ratios[-1]:.3f}), peak memory ratio median {mem:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d64 L2 only, batch 1 and 32, 5 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="samples per arm (default 7, --quick 5)")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see the docstring)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU here (torch {torch.__version__}); use --device cpu")
    torch.set_num_threads(args.threads)
    archs = ["d64 L2"] if args.quick else list(ARCHS)
    batches = (1, 32) if args.quick else BATCHES
    repeats = args.repeats or (5 if args.quick else 7)
    modes = ("eager",) if args.no_compile else ("eager", "compiled")
    torch._dynamo.config.automatic_dynamic_shapes = False  # every batch size compiled for itself, as deployed
    torch._dynamo.config.cache_size_limit = 64
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"machine: {platform.processor() or platform.machine()}, {platform.system()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device} (GPU: {gpu}), "
          f"load average {os.getloadavg()[0]:.2f} (other work on the machine skews absolute times more than ratios)")
    start = time.perf_counter()
    rows = []
    with torch.no_grad():
        for model_name in ("family", "verbose"):
            for arch_name in archs:
                got, counts = measure(model_name, arch_name, batches, modes, repeats, device)
                rows += got
                print(f"  rewrites {model_name} {arch_name}: {counts}")
    print()
    print_table(rows)
    print()
    print_summary(rows, modes)
    print(f"total {time.perf_counter() - start:.0f} s, load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
