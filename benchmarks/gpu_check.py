"""One prepared check of every GPU path of dsnas on one NVIDIA GPU (written for an H200: its sections are estimated
at 7 minutes at most, and took 2 there on 2026-12-04).

Sections, each timed, each a list of checks (a measured value against a bound that says why), skipped with the
reason when the --budget-s would overrun:
  doctor    what `dsnas doctor` finds: CUDA, NVML, the energy counter, GPM, power, clocks, CUPTI, torch.compile
  limits    bf16 GEMM and a device copy against the datasheet's peaks; GPM SM / tensor / DRAM utilization, energy
            and power in NVML's steady window; CUDA-event against wall-clock medians; five dsnas measurements' CV
  engine    every engine layer type inside a transformer_lm (logits against fp32, the backend that ran, latency
            against bf16), torchao's INT8 path per row count, and each layer type alone at 1024^2..8192^2 against
            bf16 F.linear with L2 flushed
  training  fp16 with loss scaling and one forced overflow (per-layer fp32 fallback), bf16
  search    the shipped GPU study, studies/engine_gpu.toml, at 6 trials and a tiny training budget (local executor,
            SQLite, successive halving), the knee exported and `dsnas verify`'d
  gain      each of its candidates with an engine choice against its fp32 dense twin, both trained here from the
            same seed: throughput ratio (>= 1.4x on an H200) and accuracy side by side
  profile   `dsnas profile BUNDLE --kernels --cuda-graphs`, and its kernel table against the device time of a call
  compile   an engine model under torch.compile against eager: output and latency
The report is DIR/gpu_check.md and DIR/gpu_check.json, written after every section. Ray is not needed.

--dry-run runs the same code on the CPU at tiny sizes, where CUDA is not needed (the `limits` section is
skipped), so that CI checks the check. Exit status 1 when a check failed or a section raised.

Run:  python benchmarks/gpu_check.py --out DIR [--budget-s 480] [--dry-run]
On the GPU machine (no network): `bash benchmarks/gpu_wheels.sh` here, then there
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
      PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_check.py --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_STUDY = ROOT / "studies" / "engine_gpu.toml"
sys.path.insert(0, str(ROOT))
import gpu_limits as gl  # noqa: E402  (beside this file)
import torch  # noqa: E402
from gpu_report import Report, Section  # noqa: E402

# Seconds each section takes on an H200 (measured; gain's is a guess, it has not run there yet), and on 2 CPU cores
# in a dry run.
ESTIMATE_S = {"doctor": (10, 5), "limits": (50, 0), "engine": (60, 40), "training": (10, 10), "search": (150, 120),
              "gain": (60, 30), "profile": (25, 20), "compile": (60, 90)}


class Run:
    """What the sections share: the device, the dry-run switch, the output folder, the exported bundle."""

    def __init__(self, out: Path, dry: bool) -> None:
        self.out, self.dry = out, dry
        self.device = gl.device_of(dry)
        self.bundle: Path | None = None

    # --- doctor ------------------------------------------------------------------------------------------------

    def doctor(self, sec: Section) -> None:
        from dsnas.profiler.capabilities import Capabilities, probe
        from dsnas.profiler.device import fingerprint, fingerprint_id
        from dsnas.profiler.steadiness import host_speed_row

        # The host's steadiness too: an eager model at small batches is bound by the host's launches (H200: eager
        # batch-32 CV 19%), so the host's slow spells reach its timings.
        caps = Capabilities((*probe(self.device.type), host_speed_row()))
        sec.table("dsnas doctor", ["capability", "available", "detail"],
                  [[c.name, "yes" if c.available else "no", c.detail] for c in caps])
        wanted = ("torch.compile", "CPU") if self.dry else \
            ("CUDA", "NVML", "energy counter", "GPM", "power", "utilization", "clocks", "process utilization",
             "clock slowdowns", "CUPTI activities", "torch.compile")
        for name in wanted:
            sec.fact(f"doctor: {name}", caps[name].available, caps[name].detail[:160])
        fp = fingerprint(self.device)
        sec.note(f"fingerprint {fingerprint_id(fp)}: " + ", ".join(f"{k}={v}" for k, v in fp.items()))

    # --- search, export, verify ----------------------------------------------------------------------------------

    def search(self, sec: Section) -> None:
        from dsnas.cli import main
        from dsnas.spec import load_study
        from dsnas.study import open_study

        folder = self.out / "search"
        folder.mkdir(parents=True, exist_ok=True)
        study = folder / "gpu_check.toml"
        study.write_text(self._study_text(folder))
        spec = load_study(study)
        code, text = _cli(main, ["search", str(study)])
        (folder / "search.log").write_text(text)
        sec.check("dsnas search exit status", code, 0, 0)
        stored = open_study(spec, create=False)
        self._engine_offer(sec, stored.user_attrs.get("dsnas_engine_offer") or {})
        trials = stored.trials
        states = [t.state.name for t in trials]
        rows = [[t.number, t.state.name, t.user_attrs.get("arch_short", ""), t.user_attrs.get("accuracy"),
                 t.user_attrs.get("throughput_tok_s"), t.user_attrs.get("latency_ms"),
                 (t.user_attrs.get("profile") or {}).get("backend", ""), t.user_attrs.get("fallbacks"),
                 (t.user_attrs.get("fail_reason") or "")[:300]] for t in trials]
        sec.table("trials", ["trial", "state", "architecture", "accuracy", "tokens/s", "latency ms", "backend",
                             "fallbacks", "fail reason"], rows)
        sec.check("trials completed", states.count("COMPLETE"), 2, None, why="the knee needs a front")
        sec.check("trials failed", states.count("FAIL"), 0, 0, why="every failure is in the table with its reason")
        sec.fact("ray was not imported", "ray" not in sys.modules, "local executor")
        bundle = folder / "knee"
        code, text = _cli(main, ["export", str(study), "--pick", "knee", "--out", str(bundle)])
        sec.check("dsnas export --pick knee exit status", code, 0, 0, why=text.strip().splitlines()[-1][:200])
        if code != 0:
            return
        self.bundle = bundle
        self._verify(sec, bundle)

    def _engine_offer(self, sec: Section, offer: dict[str, Any]) -> None:
        """The engine probe that settled the GPU space's precision = "auto": its table, and on a GPU bf16 offered
        (a bf16 tensor-core GEMM is many times an fp32 one at widths 256-1024 on any GPU dsnas targets)."""
        from dsnas.profiler.engine_probe import EngineProbe

        probe = EngineProbe.from_dict(offer["probe"]) if offer.get("probe") else None
        offered = set(offer.get("precision", ())) | set(offer.get("sparsity", ()))  # after the 8-bit dominance rule
        sec.table("engine probe (precision = \"auto\")", ["choice", "offered", "speed vs baseline", "kernel", "why"],
                  [[c, c in offered, v.speedup, v.kernel, (v.why + probe.dominance_note(v))[:300]]
                   for c, v in (probe.verdicts.items() if probe else ())])
        sec.fact("engine offer", bool(offer), f"precision {offer.get('precision')}, sparsity {offer.get('sparsity')}")
        if not self.dry:
            sec.fact("bf16 offered on the GPU", "bf16" in offer.get("precision", ()),
                     probe.verdicts["bf16"].why if probe and "bf16" in probe.verdicts else "no probe")

    def _verify(self, sec: Section, bundle: Path) -> None:
        """`dsnas verify` of the bundle here, each row a check. On a shared 2-core CPU (the dry run) its timings
        drift with the neighbours' load, so there the speed rows are shown, not judged."""
        from dsnas.export import verify_bundle

        report = verify_bundle(bundle, device=self.device.type)
        (bundle.parent / "verify.log").write_text(report.table())
        for row in report.checks:
            speed = row.figure.startswith(("latency", "throughput"))
            ok = None if (speed and self.dry) or not row.compared else not row.failed
            why = "not judged in a dry run: CPU timings on a shared machine" if speed and self.dry else row.verdict
            sec.fact(f"verify {row.figure}", ok, f"{row.recorded} -> {row.now} ({row.drift})", why)

    def _study_text(self, folder: Path) -> str:
        """The shipped GPU study (studies/engine_gpu.toml: its space, task shape and batch sizes) at a budget the
        check can afford; in a dry run, the GPU space's keys at what a CPU runs in seconds, and batch 32."""
        from dsnas.spec import read_study

        shipped = read_study(SHIPPED_STUDY)
        space, largest = shipped.space.file, max(shipped.hardware.batch_sizes)
        context, batch = shipped.task.params["context"], shipped.task.params["batch_size"]
        if self.dry:
            space, largest = folder / "space_cpu.toml", 32
            space.write_text('family = "transformer_lm"\n[choices]\nn_layers = [1, 2]\nd_model = [32, 64]\n'
                             'grad_checkpoint = [0, 1]\n[per_layer]\nn_heads = [2, 4]\nffn_ratio = [2, 4]\n'
                             'precision = "auto"\nsparsity = ["dense", "2:4", "auto"]\n')
        n, tokens, val = (3, 4096, 1024) if self.dry else (6, 65_536, 8192)
        return f"""[study]
name = "gpu_check"
seed = 0
[objectives]
accuracy = "maximize"
throughput = "maximize"
[budget]
n_trials = {n}
[space]
file = "{space}"
[task]
name = "charlm"
corpus_bytes = 400_000
context = {context}
batch_size = {batch}
train_tokens = {tokens}
val_tokens = {val}
[hardware]
device = "{self.device.type}"
batch_sizes = [1, {largest}]
warmup_s = 0.05
measure_s = 0.2
steady_s = 0.3
[executor]
kind = "local"
[fidelity]
kind = "successive_halving"
"""

    # --- gain: the engine's candidates against the same architectures in fp32 ------------------------------------

    def gain(self, sec: Section) -> None:
        """What the engine buys on this device (issue: +40% throughput at equal accuracy): each completed candidate
        of the search that took an engine choice, and its twin with every layer fp32 dense, both trained here from
        the same seed with the same budget (dsnas.worker, as a trial) and measured. The median throughput ratio is
        judged on a GPU (>= 1.4x); the accuracies are shown beside it, since a ratio only counts at equal accuracy."""
        import json
        import statistics

        from dsnas.spec import load_study
        from dsnas.study import open_study
        from dsnas.trial import TrialRequest
        from dsnas.worker import run_trial

        spec = load_study(self.out / "search" / "gpu_check.toml")
        trials = [t for t in open_study(spec, create=False).trials
                  if t.state.name == "COMPLETE" and "reused_from" not in t.user_attrs]
        engine = [t for t in trials if any(layer.get("precision", "fp32") != "fp32"
                                           or layer.get("sparsity", "dense") != "dense"
                                           for layer in t.user_attrs["arch"]["layers"])]  # else its own twin
        if self.dry and len(engine) > 1:  # the same code for each candidate: one shows it runs, at half the time
            sec.fact("engine candidates compared", None, f"1 of {len(engine)}", "a dry run compares the first only")
            engine = engine[:1]
        rows, ratios = [], []
        for t in engine:
            arch = t.user_attrs["arch"]
            twin = {**arch, "layers": [{**layer, "precision": "fp32", "sparsity": "dense"} for layer in arch["layers"]]}
            got = {}
            try:  # one pair that fails (a TrialError, no throughput) is a row with its reason, not the section's end
                for name, candidate in (("engine", arch), ("fp32", twin)):
                    request = TrialRequest(trial=t.number, arch=json.loads(json.dumps(candidate)), task=spec.task,
                                           hardware=spec.hardware, seed=spec.seed + t.number, engine=spec.engine)
                    got[name] = run_trial(request).metrics
                ratio = got["engine"]["throughput_tok_s"] / got["fp32"]["throughput_tok_s"]
            except Exception as err:
                failed = "fp32" if "engine" in got else "engine"
                sec.fact(f"trial {t.number}: {failed} twin", False, f"{type(err).__name__}: {err}"[:300])
                rows.append([t.number, t.user_attrs.get("arch_short", ""), None, None, None, None, "failed"])
                continue
            ratios.append(ratio)
            rows.append([t.number, t.user_attrs.get("arch_short", ""), got["fp32"]["accuracy"],
                         got["engine"]["accuracy"], got["fp32"]["throughput_tok_s"], got["engine"]["throughput_tok_s"],
                         round(ratio, 3)])
        sec.table("each engine candidate against its fp32 dense twin (same seed and budget)",
                  ["trial", "architecture", "fp32 accuracy", "engine accuracy", "fp32 tokens/s", "engine tokens/s",
                   "ratio"], rows)
        if not ratios:
            sec.fact("engine candidates", None, "none: every completed trial was fp32 dense",
                     "the probe offered nothing that pays here, or the sampler drew none")
            return
        median = statistics.median(ratios)
        if self.dry:
            sec.fact("median throughput ratio, engine / fp32", None, f"{median:.2f}x",
                     "not judged in a dry run: CPU timings at tiny widths on a shared machine")
        else:
            sec.check("median throughput ratio, engine / fp32", median, 1.4, None, unit="x",
                      why="the engine's target on an H200: >= 1.4x at equal accuracy (bf16/fp8/2:4 against fp32)")
        gaps = [r[3] - r[2] for r in rows if r[-1] != "failed"]
        sec.fact("accuracy, engine - fp32 (median)", None, f"{statistics.median(gaps):+.4f}",
                 "the same seed and budget; a tiny training budget, so a few thousandths are noise")

    # --- profile ---------------------------------------------------------------------------------------------

    def profile(self, sec: Section) -> None:
        from dsnas.cli import main
        from dsnas.profile import load_target
        from dsnas.profiler import measure
        from dsnas.tasks import make_task

        if self.bundle is None and (self.out / "search" / "knee").is_dir():  # a rerun of --only profile
            self.bundle = self.out / "search" / "knee"
        if self.bundle is None:
            raise RuntimeError("no bundle: the search section did not export one")
        args = ["profile", str(self.bundle), "--device", self.device.type, "--kernels", "--measure-s", "0.2"]
        args += [] if self.dry else ["--cuda-graphs"]
        code, text = _cli(main, args)
        sec.check("dsnas profile exit status", code, 0, 0)
        sec.note("dsnas " + " ".join(args[:1] + ["BUNDLE"] + args[2:]) + ":\n" + text)
        model, task_spec, hardware, _ = load_target(str(self.bundle), None, self.device)
        hardware = replace(hardware, kernels=True, cuda_graphs=not self.dry, measure_s=0.2)
        _, prof = measure(model, make_task(task_spec), self.device, hardware)
        for bs, kernels in prof["kernels"].items():
            batch = prof["batches"][bs]
            call_ms = batch.get("device_median_ms") or batch["median_ms"]
            ratio = kernels.get("total_us", float("nan")) / 1e3 / call_ms
            if self.dry:  # a CPU's operator times carry the profiler's own overhead: up to 1.3x at 0.1 ms calls
                sec.fact(f"batch {bs}: operator time of one call / its measured time", None, f"{ratio:.3g}",
                         "not judged in a dry run: CPU operator times include the profiler's overhead")
            else:
                sec.check(f"batch {bs}: kernel time of one call / its measured device time", ratio, 1e-3, 1.15,
                          why="above 1: a GEMM counted twice (operator and kernel); below it: launch gaps, idle "
                          "device")
            if batch.get("graph_latency_ms"):
                sec.check(f"batch {bs}: CUDA-graph replay / eager device time", batch["graph_latency_ms"] / call_ms,
                          0, 1.1, why="a replay skips the host's launches: as fast or faster (much, where eager "
                          "is launch-bound)")

    # --- compile ------------------------------------------------------------------------------------------------

    def compile(self, sec: Section) -> None:
        dev = self.device
        precision = "fp32" if self.dry else "bf16"
        arch = gl.model_arch(64 if self.dry else 1024, 2, 4 if self.dry else 16, precision)
        torch.manual_seed(0)
        model = gl.convert_model(gl.build(arch).to(dev))
        x = torch.randint(0, 256, (8 if self.dry else 32, 64), device=dev)
        start = time.perf_counter()
        compiled = torch.compile(model)
        with torch.inference_mode():
            got, want = compiled(x).float(), model(x).float()
        compile_s = time.perf_counter() - start
        err = float((got - want).norm() / want.norm())
        sec.check(f"{precision} model: compiled logits vs eager, relative L2", err, 0, 1e-2 if not self.dry else 1e-4,
                  why="the same arithmetic, fused differently")
        eager_ms, compiled_ms = gl.model_ms(model, x), gl.model_ms(compiled, x)
        sec.check("compile time", compile_s, 0, 300, unit="s")
        sec.note(f"latency eager {eager_ms:.3f} ms, compiled {compiled_ms:.3f} ms: {eager_ms / compiled_ms:.2f}x")


def _cli(main: Any, args: list[str]) -> tuple[int, str]:
    """Run a `dsnas` command in this process: (exit status, what it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    sys.stdout.write(out.getvalue())
    return code, out.getvalue()


def meta(dry: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"date": datetime.date.today().isoformat(), "host": platform.node(),
                            "torch": torch.__version__, "python": platform.python_version(), "dry_run": dry}
    try:
        info["dsnas commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                              capture_output=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["dsnas commit"] = "unknown"
    if torch.cuda.is_available() and not dry:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1))
        try:
            from dsnas.profiler.capabilities import nvml_facts

            facts = nvml_facts(torch.device("cuda", 0))
            info["driver"] = facts.get("gpu_driver", "unknown")
        except Exception as err:  # no NVML: the report says so instead of a driver version
            info["driver"] = f"unknown ({err})"
    else:
        from dsnas.profiler.capabilities import cpu_model

        info["cpu"] = cpu_model()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--budget-s", type=float, default=480,  # the estimates below add up to 425 s
                        help="skip a section that would overrun this")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, at tiny sizes: what needs no CUDA")
    parser.add_argument("--only", help="comma-separated sections to run (default: all)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda}); "
              "use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    run = Run(Path(args.out), args.dry_run)
    report = Report(Path(args.out), meta(args.dry_run))
    sections = {"doctor": run.doctor, "limits": lambda s: gl.limits(s, run.dry),
                "engine": lambda s: (gl.engine_in_model(s, run.dry), gl.launch_costs(s, run.dry),
                               gl.engine_layers_alone(s, run.dry)),
                "training": lambda s: gl.training(s, run.dry), "search": run.search, "gain": run.gain,
                "profile": run.profile, "compile": run.compile}
    only = set(args.only.split(",")) if args.only else set(sections)
    if only - set(sections):  # a misspelt section ran nothing and passed, after the machine's start
        print(f"gpu_check: --only names no section {', '.join(sorted(only - set(sections)))}; the sections are "
              f"{', '.join(sections)}", file=sys.stderr)
        return 2
    if args.only:
        kept = [name for name in report.keep_earlier() if name not in only]
        if kept:
            print(f"gpu_check: keeping the earlier sections {', '.join(kept)} of {report.out / 'gpu_check.json'}")
    for name, fn in sections.items():
        if name not in only:
            continue
        needs = "needs CUDA: the physical limits of a GPU (dry run on the CPU)" if name == "limits" and run.dry else ""
        report.run(name, fn, estimate_s=ESTIMATE_S[name][1 if run.dry else 0], budget_s=args.budget_s, needs=needs)
    print(f"\n{report.out / 'gpu_check.md'}: " + ", ".join(f"{s.name} {s.status}" for s in report.sections))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
