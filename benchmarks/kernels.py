"""Speed and accuracy of dsnas's kernel engine (dsnas.kernels) against plain dense linear layers, in the same run.

Every layer type the search can choose is built the way a trial builds it.

1. CPU (always), at each --threads count. Each layer type is an EngineLinear of the search's shapes
   (search_spaces/transformer_lm.toml: d_model 64 and 128, ffn_ratio 4: qkv d->3d, proj d->d, up d->4d, down 4d->d),
   pruned 2:4 by magnitude (sparsify_layer) where sparse, its act_amax set to the inputs' max |x| where int8, then put
   into its inference form by dsnas.kernels.convert, which records the backend that runs. Baseline:
   torch.nn.functional.linear in fp32 with an fp32 weight of the same shape (a plain nn.Linear is timed too, to tell
   the cost of any module call from the engine's own). Inputs are (rows, in_features) fp32 at rows 1, 32, 256,
   under torch.inference_mode. One sample = the mean of enough calls to last --sample-ms (2 ms, cut off at 4x that
   when the machine stalls); each round takes one baseline and one candidate sample back to back, in alternating
   order (A B B A ...), so drift hits both. ratio = the median over rounds (15) of baseline / candidate
   (> 1 = faster); times = medians. Ends with each type's geometric-mean ratio over the shapes.
2. CUDA (only when torch.cuda.is_available()). bf16, fp16, fp8 (where fp8_supported), int8 (torch._int_mm and
   torchao, where int8_backend_supported) and 2:4 bf16 (semi-structured: cuSPARSELt or CUTLASS, as the engine picks)
   against plain bf16 F.linear, at the search's shapes and at large weights (1024..8192 square, 4096x11008 up and
   down) at rows 256 and 4096. Inputs are bf16. One sample = one call timed by CUDA events after writing a buffer of
   max(2 x L2, 256 MiB), so that no call finds its operands in L2; same pairing and medians as on the CPU.
3. INT8 accuracy (--accuracy; on unless --quick). The quickstart's task (charlm, context 64, batch 32, train_tokens
   480_000) trains a d128 L2 (n_heads 4, ffn_ratio 4) transformer_lm in fp32 once. Its weights are loaded into the
   same architecture with every layer int8, which dsnas.kernels.pipeline.run calibrates (kl, percentile, max) and
   trains with QAT (qat_frac 0.25) or not (qat_frac 0: post-training quantization), and pipeline.finish converts
   with int8_backend "auto"; the same weights and ranges are also converted with int8-static, the backend whose
   numerics are QAT's. Reported: validation accuracy and its change against fp32, absolute (points) and relative,
   and against fp32 trained on as long as QAT trains (QAT's extra training is no gain of quantization); the target
   is within 1%.
4. 2:4 saliency (--saliency; on unless --quick): benchmarks/saliency.py on the same task and architecture, for
   magnitude, wanda and hessian: how often two independent estimates choose the same masks, at what share of a
   trial's training, and the accuracy after sparsify + fine-tune over 3 seeds (5-7 minutes on 2 cores).

Run:  python benchmarks/kernels.py [--quick] [--accuracy | --no-accuracy] [--saliency | --no-saliency] [--threads 1,2]
      (--quick: d64 shapes, 5 rounds, no accuracy or saliency part: under a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dsnas.errors import DsnasError  # noqa: E402  (after the path: runnable without installing dsnas)
from dsnas.kernels.convert import convert, training_state  # noqa: E402
from dsnas.kernels.linear import EngineLinear  # noqa: E402
from dsnas.kernels.quant import INT8_BACKENDS, fp8_supported, int8_backend_supported  # noqa: E402
from dsnas.kernels.sparsity import magnitude_scores, sparsify_layer  # noqa: E402

SEARCH_ROWS = (1, 32, 256)
LARGE_ROWS = (256, 4096)
FFN_RATIO = 4
MIB = 2**20
SPARSE_KERNELS = ("cusparselt", "cutlass", "masked-dense")  # what convert names when it handled a 2:4 mask


@dataclass(frozen=True)
class Kind:
    """One layer type: the EngineLinear choices and the INT8 backend convert is asked for."""

    label: str
    precision: str
    sparsity: str = "dense"
    int8_backend: str = "auto"


CPU_KINDS = (Kind("nn.Linear fp32", "module"), Kind("fp32 engine", "fp32"), Kind("bf16", "bf16"), Kind("fp16", "fp16"),
             *(Kind(f"int8 {b}", "int8", int8_backend=b) for b in INT8_BACKENDS), Kind("int8 auto", "int8"),
             Kind("2:4 fp32", "fp32", "2:4"), Kind("2:4 int8 auto", "int8", "2:4"))
CUDA_KINDS = (Kind("bf16 engine", "bf16"), Kind("fp16", "fp16"), Kind("fp8", "fp8"),
              Kind("int8 int8-static", "int8", int8_backend="int8-static"),
              Kind("int8 torchao-dynamic", "int8", int8_backend="torchao-dynamic"), Kind("int8 auto", "int8"),
              Kind("2:4 bf16", "bf16", "2:4"))


def search_shapes(d_models: tuple[int, ...]) -> list[tuple[str, int, int]]:
    """(label, in_features, out_features) of the four linear layers of a block, per d_model."""
    out = []
    for d in d_models:
        r = FFN_RATIO
        out += [(f"d{d} qkv", d, 3 * d), (f"d{d} proj", d, d), (f"d{d} up", d, r * d), (f"d{d} down", r * d, d)]
    return out


# --- building layers the way a trial does ------------------------------------------------------------------------

def engine_layer(kind: Kind, in_f: int, out_f: int, device: torch.device, act_amax: float) -> EngineLinear:
    """An EngineLinear of ``kind`` in its inference form (``backend``/``reason`` set by convert)."""
    if kind.precision == "module":  # a plain nn.Linear: what any module call costs over the functional baseline
        with torch.device(device):
            plain = torch.nn.Linear(in_f, out_f)
        plain.backend, plain.reason = "torch nn.Linear", ""
        return plain
    with torch.device(device):
        layer = EngineLinear(in_f, out_f, precision=kind.precision, sparsity=kind.sparsity)
    if kind.sparsity != "dense":
        sparsify_layer(layer, magnitude_scores(layer.weight))  # the saliency does not change the speed
    if kind.precision == "int8":
        layer.act_amax.fill_(act_amax)  # what calibration would set
    with torch.no_grad():
        convert(layer, int8_backend=kind.int8_backend)
    return layer


def build_or_reason(kind: Kind, in_f: int, out_f: int, device: torch.device, inputs: dict[int, torch.Tensor]):
    """(layer, "") or (None, why it cannot run here): a refusal is a result, not a crash of the benchmark."""
    try:
        layer = engine_layer(kind, in_f, out_f, device, max(float(x.abs().max()) for x in inputs.values()))
        with torch.inference_mode():
            for x in inputs.values():  # every row count, so that a kernel's size limit shows here, not mid-timing
                layer(x)
    except DsnasError as e:  # the engine refused, and says why (fp8 or a named int8 backend this device lacks)
        return None, str(e)
    except (RuntimeError, ValueError, TypeError) as e:
        return None, f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    return layer, ""


def sparse_note(kind: Kind, layer: EngineLinear) -> str:
    """What the benchmark sees that convert did not record: a 2:4 layer whose backend names no sparse kernel."""
    if kind.sparsity == "dense" or any(k in layer.backend for k in SPARSE_KERNELS) or layer.reason:
        return ""  # dense, a sparse kernel, or convert said why the zeros run densely
    return (f"the 2:4 zeros run through the dense {layer.backend} kernel, and convert records neither a sparse "
            "backend nor why")


# --- timing ------------------------------------------------------------------------------------------------------

Timer = Callable[[], float]


def cpu_timer(fn: Callable, x: torch.Tensor, sample_s: float) -> Timer:
    """A sampler of seconds per call: each sample is the mean of enough calls to last ``sample_s``, cut off at 4x
    that, so that a stalling machine (a descheduled OpenMP thread holds every barrier) cannot stretch a run."""
    def run(calls: int) -> float:
        start = time.perf_counter()
        deadline, done = start + 4 * sample_s, 0
        while done < calls:
            fn(x)
            done += 1
            if done % 4 == 0 and time.perf_counter() > deadline:
                break
        return (time.perf_counter() - start) / done

    run(3)  # warm-up: allocator, lazy init, oneDNN primitive caches
    calls = max(1, int(sample_s / max(min(run(1) for _ in range(3)), 1e-7)))
    return lambda: run(calls)


def cuda_timer(fn: Callable, x: torch.Tensor, flush: Callable[[], object]) -> Timer:
    """A sampler of seconds of one call by CUDA events, after flushing L2 (the flush itself is not timed)."""
    for _ in range(3):  # warm-up: cuBLAS/cuSPARSELt plan selection, allocator
        fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def sample() -> float:
        flush()
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return sample


def compare(base: Timer, candidates: dict[str, Timer], rounds: int) -> tuple[float, dict[str, tuple[float, float]]]:
    """Median baseline seconds, and per candidate (median seconds, median paired ratio baseline / candidate)."""
    base_s: list[float] = []
    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in candidates}
    for r in range(rounds):
        for name, cand in candidates.items():
            if r % 2 == 0:
                b, c = base(), cand()
            else:
                c, b = cand(), base()
            base_s.append(b)
            pairs[name].append((b, c))
    med = statistics.median
    return med(base_s), {name: (med(c for _, c in p), med(b / c for b, c in p)) for name, p in pairs.items()}


# --- the speed sweeps --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sweep:
    """What one table measures: the layer types, the device and input dtype, the baseline and the sampler."""

    kinds: tuple[Kind, ...]
    device: torch.device
    dtype: torch.dtype
    baseline: str
    make_timer: Callable[[Callable, torch.Tensor], Timer]
    rounds: int


def sweep_shape(sweep: Sweep, label: str, in_f: int, out_f: int, rows: tuple[int, ...]) -> list[dict]:
    """One row per layer type (the baseline first): backend, reason, and per row count (seconds, ratio)."""
    gen = torch.Generator().manual_seed(0)
    inputs = {r: torch.randn(r, in_f, generator=gen).to(sweep.device, sweep.dtype) for r in rows}
    weight = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).to(sweep.device, sweep.dtype)
    bias = torch.zeros(out_f, device=sweep.device, dtype=sweep.dtype)
    io = f"{in_f}->{out_f}"
    result = [{"shape": label, "io": io, "kind": sweep.baseline, "backend": sweep.baseline, "reason": "", "note": "",
               "cells": {}}]
    layers = {}
    for kind in sweep.kinds:
        layer, why = build_or_reason(kind, in_f, out_f, sweep.device, inputs)
        result.append({"shape": label, "io": io, "kind": kind.label, "cells": {},
                       "backend": "unavailable" if layer is None else layer.backend,
                       "reason": why if layer is None else layer.reason,
                       "note": "" if layer is None else sparse_note(kind, layer)})
        if layer is not None:
            layers[kind.label] = layer
    with torch.inference_mode():
        for r, x in inputs.items():
            base = sweep.make_timer(lambda x: F.linear(x, weight, bias), x)
            timers = {name: sweep.make_timer(layer, x) for name, layer in layers.items()}
            base_s, cands = compare(base, timers, sweep.rounds)
            result[0]["cells"][r] = (base_s, 1.0)
            for row in result[1:]:
                if row["kind"] in cands:
                    row["cells"][r] = cands[row["kind"]]
    return result


def run_sweep(sweep: Sweep, shapes: list[tuple[str, int, int]], rows: tuple[int, ...]) -> None:
    started = time.perf_counter()
    done = []
    for label, in_f, out_f in shapes:
        done += sweep_shape(sweep, label, in_f, out_f, rows)
        if sweep.device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(done, rows)
    print_summary(done, rows, sweep.baseline)
    print(f"({time.perf_counter() - started:.0f} s)", flush=True)


def print_table(done: list[dict], rows: tuple[int, ...]) -> None:
    cells = "".join(f"{f'rows {r}: us':>15}{'ratio':>7}" for r in rows)
    head = f"{'layer':11}{'in->out':>12}  {'type':21}{'backend':24}{cells}"
    print(head + "\n" + "-" * len(head))
    for row in done:
        text = f"{row['shape']:11}{row['io']:>12}  {row['kind']:21}{row['backend'][:23]:24}"
        for r in rows:
            t, ratio = row["cells"].get(r, (None, None))
            text += f"{'-':>15}{'-':>7}" if t is None else f"{t * 1e6:15.2f}{ratio:7.2f}"
        print(text)


def print_summary(done: list[dict], rows: tuple[int, ...], baseline: str) -> None:
    """Each layer type's geometric-mean ratio over the shapes, per row count and over all; then the reasons."""
    print(f"\ngeometric mean of time({baseline}) / time(type) over the shapes (> 1 = faster than the baseline):")
    print(f"{'type':21}" + "".join(f"{f'rows {r}':>10}" for r in rows) + f"{'all':>10}  backends")
    for kind in dict.fromkeys(row["kind"] for row in done if row["kind"] != baseline):
        mine = [row for row in done if row["kind"] == kind]
        per = [[row["cells"][r][1] for row in mine if r in row["cells"]] for r in rows]
        backends = ", ".join(f"{b} x{n}" for b, n in Counter(row["backend"] for row in mine).items())
        every = [v for vs in per for v in vs]
        print(f"{kind:21}" + "".join(geomean(vs) for vs in per) + f"{geomean(every)}  {backends}")
    for key, title in (("reason", "why (each layer's reason as convert recorded it, or why it could not be built)"),
                       ("note", "seen by the benchmark, not recorded by the engine")):
        print_grouped(done, key, title)


def print_grouped(done: list[dict], key: str, title: str) -> None:
    """Each distinct text of ``key`` once, with the layer types and shapes it applies to."""
    groups: dict[str, tuple[dict, dict]] = {}
    for row in done:
        if row[key]:
            kinds, shapes = groups.setdefault(row[key], ({}, {}))
            kinds[row["kind"]] = shapes[row["shape"]] = None
    every = dict.fromkeys(row["shape"] for row in done)
    if groups:
        print(f"{title}:")
    for text, (kinds, shapes) in groups.items():
        where = "every shape" if list(shapes) == list(every) else ", ".join(shapes)
        print(f"  {' / '.join(kinds)} [{where}]: {text}")


def geomean(values: list[float]) -> str:
    """The geometric mean, formatted for a 10-wide column ("-" where nothing ran)."""
    return f"{statistics.geometric_mean(values):10.2f}" if values else f"{'-':>10}"


def cpu_sweeps(args: argparse.Namespace) -> None:
    before = torch.get_num_threads()
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            print(f"\n== 1. CPU, {threads} thread(s): engine layers against fp32 F.linear, {args.rounds} rounds of "
                  f"{args.sample_ms:g} ms samples; load average {os.getloadavg()[0]:.2f} ==", flush=True)
            sweep = Sweep(CPU_KINDS, torch.device("cpu"), torch.float32, "fp32 F.linear",
                          lambda fn, x: cpu_timer(fn, x, args.sample_ms / 1e3), args.rounds)
            run_sweep(sweep, search_shapes(args.d_models), SEARCH_ROWS)
    finally:
        torch.set_num_threads(before)


def cuda_sweeps(args: argparse.Namespace) -> None:
    print("\n== 2. CUDA ==")
    if not torch.cuda.is_available():
        print(f"skipped: torch.cuda.is_available() is False (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda})")
        return
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    l2 = int(getattr(props, "L2_cache_size", 0))
    buffer = torch.empty(max(2 * l2, 256 * MIB) // 4, dtype=torch.float32, device=device)
    print(f"{props.name}, compute capability {props.major}.{props.minor}, L2 {l2 / MIB:.0f} MiB, flush buffer "
          f"{buffer.numel() * 4 / MIB:.0f} MiB written before every timed call; cuSPARSELt available: "
          f"{torch.backends.cusparselt.is_available()}; fp8: {fp8_supported(device)[1]}")
    for backend in ("int8-static", "torchao-dynamic"):
        print(f"int8 {backend}: {int8_backend_supported(backend, device, 4096, 4096)[1]}")
    sweep = Sweep(CUDA_KINDS, device, torch.bfloat16, "bf16 F.linear",
                  lambda fn, x: cuda_timer(fn, x, buffer.zero_), args.cuda_rounds)
    print(f"\n-- the search's shapes, {args.cuda_rounds} rounds --", flush=True)
    run_sweep(sweep, search_shapes(args.d_models), SEARCH_ROWS)
    large = [(f"{s}^2", s, s) for s in args.cuda_square] + [("up 4096", 4096, 11008), ("down 4096", 11008, 4096)]
    print(f"\n-- large weights, {args.cuda_rounds} rounds --", flush=True)
    run_sweep(sweep, large, LARGE_ROWS)


# --- INT8 accuracy -----------------------------------------------------------------------------------------------

ACC_ARCH = {"family": "transformer_lm", "vocab_size": 256, "context": 64, "d_model": 128,
            "layers": [{"n_heads": 4, "ffn_ratio": 4}, {"n_heads": 4, "ffn_ratio": 4}]}


def int8_model(state: dict) -> torch.nn.Module:
    """The accuracy architecture with every layer int8, holding ``state`` (a trained model's weights)."""
    from dsnas.models import build

    arch = copy.deepcopy(ACC_ARCH)
    for layer in arch["layers"]:
        layer["precision"] = "int8"
    model = build(arch)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Only the calibrated ranges may be missing: anything else would be a model that did not get the weights.
    if unexpected or any(not key.endswith(".act_amax") for key in missing):
        raise RuntimeError(f"the weights do not fit the int8 model: missing {missing}, unexpected {unexpected}")
    return model


def accuracy_row(task, state: dict, base: float, ref: float, calibrator: str, qat: bool) -> str:
    """One int8 variant of the trained weights: (fake-quant, after QAT, converted) accuracies against fp32 and
    against ``ref``, the fp32 model trained on as long as QAT trains (QAT rows) or fp32 itself (PTQ rows)."""
    from dsnas.kernels import pipeline
    from dsnas.spec import EngineSpec

    device = torch.device("cpu")
    model = int8_model(state)
    engine = EngineSpec(calibrator=calibrator) if qat else EngineSpec(calibrator=calibrator, qat_frac=0.0)
    metrics, info = pipeline.run(model, task, device, engine, seed=0, checkpoint=lambda: None)
    pipeline.finish(model, engine, info)  # convert, as the worker does after the training steps
    acc = task.evaluate(model, device)["accuracy"]
    static = int8_model(training_state(model))  # the same weights and ranges, converted by int8-static
    convert(static, int8_backend="int8-static")
    acc_static = task.evaluate(static, device)["accuracy"]
    ref_abs, ref_rel = (acc - ref) * 100, (acc - ref) / ref * 100
    ok = "yes" if ref_abs >= -1 and ref_rel >= -1 else ("abs" if ref_abs >= -1 else "no")  # a gain is no miss
    backends = ", ".join(f"{b} x{n}" for b, n in Counter(row["backend"] for row in info["layers"].values()).items())
    after_qat = f"{metrics['accuracy_qat']:10.4f}" if qat else f"{'-':>10}"
    return (f"{calibrator:11}{'yes' if qat else 'no':>5}{metrics['accuracy_calibrated']:11.4f}{after_qat}{acc:10.4f}"
            f"{(acc - base) * 100:+9.2f}{(acc - base) / base * 100:+8.2f}{ref:9.4f}{ref_abs:+9.2f}{ref_rel:+8.2f}"
            f"{ok:>5}{acc_static:12.4f}{(acc_static - ref) * 100:+9.2f}  {backends}")


def accuracy_study(args: argparse.Namespace) -> None:
    from dsnas.models import build
    from dsnas.tasks.charlm import CharLMConfig, CharLMTask

    before = torch.get_num_threads()
    torch.set_num_threads(args.accuracy_threads)
    print(f"\n== 3. INT8 accuracy: d128 L2 (n_heads 4, ffn_ratio 4), charlm context 64, batch 32, train_tokens "
          f"{args.train_tokens}, {args.accuracy_threads} thread(s) ==", flush=True)
    started = time.perf_counter()
    try:
        task = CharLMTask(CharLMConfig(context=64, batch_size=32, train_tokens=args.train_tokens),
                          str(ROOT / "studies"))
        torch.manual_seed(0)
        fp32 = build(ACC_ARCH)
        task.train(fp32, torch.device("cpu"), seed=0, checkpoint=lambda: None)
        base = task.evaluate(fp32, torch.device("cpu"))["accuracy"]
        print(f"fp32: validation accuracy {base:.4f} (trained in {time.perf_counter() - started:.0f} s)")
        longer = fp32_trained_on(task, fp32)
        print(f"fp32 trained on as long as QAT trains (the reference of the QAT rows): {longer:.4f}")
        head = (f"{'calibrator':11}{'QAT':>5}{'fake-quant':>11}{'after QAT':>10}{'int8 auto':>10}{'vs fp32':>9}"
                f"{'%':>8}{'ref':>9}{'vs ref':>9}{'%':>8}{'<=1%':>5}{'int8-static':>12}{'vs ref':>9}  backends (auto)")
        print(head + "\n" + "-" * len(head), flush=True)
        for calibrator in args.calibrators:
            for qat in (False, True):
                row = accuracy_row(task, fp32.state_dict(), base, longer if qat else base, calibrator, qat)
                print(row, flush=True)
    finally:
        torch.set_num_threads(before)
    print("fake-quant: calibrated, before QAT; int8 auto / int8-static: converted (what ships); vs: change in points "
          "and %; ref: fp32 (PTQ rows) or fp32 trained on as long as QAT (QAT rows); <=1%: 'yes' = at most 1 point and "
          f"1% below ref, 'abs' = at most 1 point below ({time.perf_counter() - started:.0f} s)")


def fp32_trained_on(task, fp32: torch.nn.Module) -> float:
    """Accuracy of the fp32 model trained on exactly as pipeline.run's QAT trains (same share of the budget, learning
    rate scale and seed), without quantization: QAT's extra training is not counted as quantization's gain."""
    from dsnas.spec import EngineSpec

    engine, model = EngineSpec(), copy.deepcopy(fp32)
    task.train(model, torch.device("cpu"), seed=2, checkpoint=lambda: None, fraction=engine.qat_frac,
               lr_scale=engine.lr_scale)  # seed 2: pipeline.run trains QAT with seed + 2, and the rows use seed 0
    return task.evaluate(model, torch.device("cpu"))["accuracy"]


# --- main --------------------------------------------------------------------------------------------------------

def header() -> str:
    import torchao

    from dsnas.profiler.capabilities import cpu_model

    usable = len(os.sched_getaffinity(0))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    text = (f"machine: {cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores "
            f"({usable} usable); GPU: {gpu}; {platform.system()} {platform.release()}; "
            f"load average {os.getloadavg()[0]:.2f}\n"
            f"python {platform.python_version()}, torch {torch.__version__}, torchao {torchao.__version__}, "
            f"{torch.get_num_threads()} torch threads by default, quantized engine {torch.backends.quantized.engine}")
    if os.getloadavg()[0] > usable - 0.5:
        text += (f"\nnote: the load average exceeds what {usable} cores leave free: other processes compete, and "
                 "multi-threaded CPU timings stall at OpenMP barriers; the 1-thread sweep is the steadier one")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_threads = ",".join(str(t) for t in sorted({1, torch.get_num_threads()}))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d64 shapes, 5 rounds, no accuracy part")
    parser.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=None,
                        help="run part 3 (default: on, off with --quick)")
    parser.add_argument("--threads", default=default_threads,
                        help=f"comma-separated CPU thread counts to sweep (default {default_threads})")
    parser.add_argument("--saliency", action=argparse.BooleanOptionalAction, default=None,
                        help="run part 4, benchmarks/saliency.py (default: on, off with --quick)")
    parser.add_argument("--accuracy-threads", type=int, default=1,
                        help="threads for parts 3 and 4 (default 1: a quickstart trial's cpus_per_trial, and "
                             "steady when the machine is shared)")
    parser.add_argument("--rounds", type=int, default=None, help="paired samples per CPU cell (default 15; --quick 5)")
    parser.add_argument("--sample-ms", type=float, default=None,
                        help="CPU sample length (default 2: short samples mostly fit between preemptions)")
    parser.add_argument("--train-tokens", type=int, default=None, help="parts 3 and 4 (default 480000; --quick "
                        "120000)")
    args = parser.parse_args(argv)
    args.threads = thread_counts(args.threads)
    args.accuracy = not args.quick if args.accuracy is None else args.accuracy
    args.saliency = not args.quick if args.saliency is None else args.saliency
    args.rounds = args.rounds or (5 if args.quick else 15)
    args.sample_ms = args.sample_ms or 2.0
    args.d_models = (64,) if args.quick else (64, 128)
    args.cuda_rounds = 10 if args.quick else 30
    args.cuda_square = (1024, 4096) if args.quick else (1024, 2048, 4096, 8192)
    args.train_tokens = args.train_tokens or (120_000 if args.quick else 480_000)
    args.calibrators = ("kl", "percentile", "max")
    return args


def thread_counts(text: str) -> list[int]:
    """--threads as thread counts, each a positive integer: "1,x" ended in a ValueError traceback, and "0" in
    torch's RuntimeError after the header."""
    counts = [t.strip() for t in text.split(",")]
    if not all(t.isdigit() and int(t) > 0 for t in counts):
        raise SystemExit(f"--threads {text}: each thread count must be a positive integer. Fix: e.g. --threads 1,2")
    return [int(t) for t in counts]


def main() -> None:
    args = parse_args()
    print(header(), flush=True)
    started = time.perf_counter()
    cpu_sweeps(args)
    cuda_sweeps(args)
    if args.accuracy:
        accuracy_study(args)
    if args.saliency:
        from saliency import run_study, settings  # beside this file; runnable on its own too

        print("\n== 4. 2:4 saliency: agreement of independent estimates, accuracy after sparsify + fine-tune ==")
        run_study(settings(args.quick, args.train_tokens, args.accuracy_threads))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
