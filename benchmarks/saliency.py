"""Is the 2:4 saliency signal or noise? For magnitude, wanda and hessian: how often two independent estimates choose
the same 2:4 masks, what an estimate costs against a trial's training, and the accuracy after sparsify + fine-tune.

The quickstart's task (charlm, context 64, batch 32) trains a d128 L2 (n_heads 4, ffn_ratio 4) transformer_lm whose
8 linear layers are 2:4, in fp32 on 1 thread (a quickstart trial's cpus_per_trial), on the first 75% of the budget
(--train-tokens, default the quickstart's 480_000), as a trial trains before sparsifying.

1. Agreement. Two estimates from independent inputs (calibration batches drawn with different seeds; Hutchinson
   probes with different seeds) each give every layer a 2:4 mask (nm_mask of the method's scores). agreement = the
   share of weight positions where the two masks agree (chance: 50%); kept = the share of the weights one mask keeps
   that the other keeps too (for 2:4 the same number: a group of 4 whose masks share k kept weights agrees on 2k
   positions). magnitude needs no data; wanda uses the input norms of 1 or 8 batches (collect_input_norms); hessian
   averages diag(H) over B batches with P Hutchinson probes on each (the pipeline's estimator on one batch, called on
   each). The P rows of one batch are prefixes of one run per batch (probes 1, 2..8, 9..32, ...: one graph per
   chunk), so a row's seconds are what its estimate took, plus at most one forward-backward per extra chunk.
   share = seconds / the trial's whole training at the quickstart budget (this run's seconds per training token
   x 480_000). Target: >= 90% agreement at <= 5% of the training.
2. Accuracy. The trained weights, sparsified as dsnas.kernels.pipeline.run sparsifies (the engine's defaults with the
   method's saliency: hessian at the default hessian_samples on one batch) and fine-tuned (finetune_frac 0.25 at
   lr_scale 0.3), seeds 0, 1, 2 (calibration batches, probes, fine-tuning data). Baseline: the dense model fine-tuned
   the same way. Median and spread (min..max) over the seeds.

Run:  python benchmarks/saliency.py [--quick] [--train-tokens N]
      (5-7 minutes on 2 cores; --quick: 120_000 tokens, up to 32 probes on 4 batches, 1.5-2.5 minutes: a model
      trained too little for the accuracy table to tell the methods apart)
      benchmarks/kernels.py runs it as its part 4 (--saliency, on unless --quick).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dsnas.kernels import pipeline, sparsity  # noqa: E402  (after the path: runnable without installing dsnas)
from dsnas.kernels.linear import engine_layers  # noqa: E402
from dsnas.spec import EngineSpec  # noqa: E402

QUICKSTART_TOKENS = 480_000  # studies/quickstart.toml's train_tokens: the training a share is taken of
ARCH = {"family": "transformer_lm", "vocab_size": 256, "context": 64, "d_model": 128,
        "layers": [{"n_heads": 4, "ffn_ratio": 4, "sparsity": "2:4"}] * 2}
CPU = torch.device("cpu")
SEEDS = (0, 1, 2)
TARGET, BUDGET = 0.90, 0.05  # the bar: this agreement within this share of a trial's training


@dataclass(frozen=True)
class Settings:
    train_tokens: int
    probes: tuple[int, ...]  # Hutchinson probes per batch, each row a prefix of the longest
    batches: tuple[int, ...]  # calibration batches averaged over
    threads: int = 1


def settings(quick: bool, train_tokens: int | None = None, threads: int = 1) -> Settings:
    if quick:
        return Settings(train_tokens or 120_000, (1, 8, 32), (1, 4), threads)
    return Settings(train_tokens or QUICKSTART_TOKENS, (1, 8, 32, 64), (1, 8), threads)


def trained(task, cfg: Settings) -> tuple[torch.nn.Module, float]:
    """The model trained as a trial trains before sparsifying, and the seconds the quickstart's whole training takes."""
    from dsnas.models import build

    torch.manual_seed(0)
    model = build(ARCH)
    fraction = pipeline.main_fraction(model, EngineSpec())
    started = time.perf_counter()
    stats = task.train(model, CPU, seed=0, checkpoint=lambda: None, fraction=fraction)
    seconds = time.perf_counter() - started
    return model, seconds / stats["train_tokens"] * QUICKSTART_TOKENS


def hessian_prefixes(model, task, batch, probes: tuple[int, ...], seed: int) -> dict[int, tuple[list, float]]:
    """Per probe count P: (diag(H) estimate from P probes on ``batch``, cumulative seconds)."""
    params = [layer.weight for layer in engine_layers(model).values()]
    sums, done, seconds, out = [torch.zeros_like(p) for p in params], 0, 0.0, {}
    for p in probes:
        started = time.perf_counter()
        diag = pipeline._hessian_diag(model, task, [batch], params, p - done, seed * 1000 + p)
        seconds += time.perf_counter() - started
        sums = [s + d * (p - done) for s, d in zip(sums, diag, strict=True)]
        done = p
        out[p] = ([s / p for s in sums], seconds)
    return out


def estimates(model, task, cfg: Settings, seed: int) -> dict:
    """One independent estimate per method and setting: {(method, setting): (masks, seconds)}."""
    layers = engine_layers(model)
    weights = [layer.weight.detach() for layer in layers.values()]
    batches = task.batches(max(cfg.batches), CPU, seed=seed)
    runs = [hessian_prefixes(model, task, b, cfg.probes, seed * 100 + i) for i, b in enumerate(batches)]
    out = {("magnitude", "-"): ([sparsity.nm_mask(sparsity.magnitude_scores(w)) for w in weights], 0.0)}
    for nb in cfg.batches:
        started = time.perf_counter()
        norms = sparsity.collect_input_norms(model, layers, [x for x, _ in batches[:nb]])
        masks = [sparsity.nm_mask(sparsity.wanda_scores(w, n)) for w, n in zip(weights, norms.values(), strict=True)]
        out[("wanda", f"{nb} batch(es)")] = (masks, time.perf_counter() - started)
    for nb in cfg.batches:
        for p in cfg.probes:
            diags = [sum(run[p][0][i] for run in runs[:nb]) / nb for i in range(len(weights))]
            masks = [sparsity.nm_mask(sparsity.hessian_scores(w, d)) for w, d in zip(weights, diags, strict=True)]
            out[("hessian", f"{p} probes x {nb} batch(es)")] = (masks, sum(run[p][1] for run in runs[:nb]))
    return out


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(share of positions where the masks agree, share of a's kept weights that b keeps too)."""
    same = sum(int((x == y).sum()) for x, y in zip(a, b, strict=True))
    kept = sum(int((x & y).sum()) for x, y in zip(a, b, strict=True))
    return same / sum(x.numel() for x in a), kept / sum(int(x.sum()) for x in a)


def agreement_table(model, task, cfg: Settings, train_s: float) -> None:
    first, second = estimates(model, task, cfg, seed=1), estimates(model, task, cfg, seed=2)
    head = f"{'method':11}{'setting':26}{'agreement':>10}{'kept':>8}{'seconds':>9}{'share':>8}  {'target':>6}"
    print(head + "\n" + "-" * len(head))
    for key, (masks, seconds) in first.items():
        seconds = (seconds + second[key][1]) / 2
        agree, kept = agreement(masks, second[key][0])
        ok = "yes" if agree >= TARGET and seconds <= BUDGET * train_s else "no"
        print(f"{key[0]:11}{key[1]:26}{agree:10.1%}{kept:8.1%}{seconds:9.2f}{seconds / train_s:8.1%}  {ok:>6}",
              flush=True)
    print(f"agreement: of positions, chance 50%; kept: of the kept weights; seconds: the mean of the two estimates; "
          f"share: of the quickstart's whole training ({train_s:.1f} s here); target: >= {TARGET:.0%} within "
          f"{BUDGET:.0%}")


def finetuned(state: dict, task, saliency: str | None, seed: int) -> tuple[float, float]:
    """(accuracy after sparsifying, after fine-tuning) of the trained weights; saliency None: the dense baseline."""
    from dsnas.models import build

    engine = EngineSpec() if saliency is None else EngineSpec(saliency=saliency)
    arch = ARCH if saliency is not None else ARCH | {"layers": [{"n_heads": 4, "ffn_ratio": 4}] * 2}
    model = build(arch)
    model.load_state_dict(state if saliency else {k: v for k, v in state.items() if not k.endswith(".mask")})
    if saliency is None:  # fine-tuned as pipeline.run fine-tunes (seed + 1), without sparsifying
        before = task.evaluate(model, CPU)["accuracy"]
        task.train(model, CPU, seed=seed + 1, checkpoint=lambda: None, fraction=engine.finetune_frac,
                   lr_scale=engine.lr_scale)
        return before, task.evaluate(model, CPU)["accuracy"]
    metrics, _ = pipeline.run(model, task, CPU, engine, seed=seed, checkpoint=lambda: None)
    return metrics["accuracy_sparsified"], metrics["accuracy_finetuned"]


def accuracy_table(model, task) -> None:
    state = model.state_dict()  # the masks still all ones: nothing sparsified yet
    head = f"{'saliency':11}{'sparse':>8}{'spread':>15}{'fine-tuned':>12}{'spread':>15}{'vs dense':>10}  per seed"
    print(head + "\n" + "-" * len(head))
    dense = None
    for saliency in (None, "magnitude", "wanda", "hessian"):
        runs = [finetuned(state, task, saliency, seed) for seed in SEEDS]
        sparse, tuned = [r[0] for r in runs], [r[1] for r in runs]
        med = statistics.median(tuned)
        dense = med if saliency is None else dense
        print(f"{saliency or 'dense':11}{statistics.median(sparse):8.4f}{spread(sparse):>15}{med:12.4f}"
              f"{spread(tuned):>15}{(med - dense) * 100:+10.2f}  {' '.join(f'{t:.4f}' for t in tuned)}", flush=True)
    print(f"median over seeds {SEEDS}; sparse: after 2:4, before fine-tuning (dense: not sparsified); spread: "
          f"min..max; vs dense: the fine-tuned median against the dense model's, in points; hessian: "
          f"{EngineSpec().hessian_samples} probes (hessian_samples) on one batch")


def spread(values: list[float]) -> str:
    return f"{min(values):.4f}..{max(values):.4f}"


def run_study(cfg: Settings) -> None:
    """Both tables (benchmarks/kernels.py's part 4)."""
    from dsnas.tasks.charlm import CharLMConfig, CharLMTask

    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    try:
        task = CharLMTask(CharLMConfig(context=64, batch_size=32, train_tokens=cfg.train_tokens), str(ROOT / "studies"))
        model, train_s = trained(task, cfg)
        print(f"d128 L2 2:4, trained on {pipeline.main_fraction(model, EngineSpec()):.0%} of {cfg.train_tokens} tokens "
              f"({cfg.threads} thread(s)): accuracy {task.evaluate(model, CPU)['accuracy']:.4f}; the quickstart's "
              f"whole training ({QUICKSTART_TOKENS} tokens) takes {train_s:.1f} s here; engine default: saliency = "
              f"{EngineSpec().saliency!r}, hessian_samples = {EngineSpec().hessian_samples}", flush=True)
        print("\n-- agreement of two independent estimates --")
        agreement_table(model, task, cfg, train_s)
        print("\n-- accuracy after sparsify + fine-tune --")
        accuracy_table(model, task)
    finally:
        torch.set_num_threads(before)
    print(f"({time.perf_counter() - started:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="120_000 tokens, up to 32 probes on 4 batches")
    parser.add_argument("--train-tokens", type=int, default=None, help="training budget (default 480000)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a quickstart trial)")
    args = parser.parse_args()
    from kernels import header  # beside this file: the machine, torch and the load, as part 1-3 print them

    print(header(), flush=True)
    run_study(settings(args.quick, args.train_tokens, args.threads))


if __name__ == "__main__":
    main()
