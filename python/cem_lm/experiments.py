"""Runs the comparison grid (variants x seeds, equal token budgets) and writes the report.

Each run lives in RUNS_DIR/<variant>/seed<k>/; a finished run is reused and an interrupted one
resumed from its checkpoint, so an interrupted grid picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch

from .checkpoint import CHECKPOINT_NAME
from .config import PRESETS, ModelConfig, TrainConfig, with_overrides
from .data import load_corpus
from .environment import environment, load_average
from .errors import RunError
from .report import rewrite_report, write_report
from .train import positive_int
from .trainer import prepare_out_dir, resolve_device, saved_configs, train_run
from .variants import VARIANTS, VARIANTS_BY_NAME

REPO_ROOT = Path(__file__).resolve().parents[2]
_corpus = None  # one copy per process


def run_configs(preset: str, variant_name: str, seed: int, train_overrides: dict) -> tuple[ModelConfig, TrainConfig]:
    model_cfg, train_cfg = PRESETS[preset]
    model_cfg = with_overrides(model_cfg, VARIANTS_BY_NAME[variant_name].overrides)
    return model_cfg, with_overrides(train_cfg, {**train_overrides, "seed": seed})


def conflicting_runs(plan, preset: str, train_overrides: dict, runs_dir: Path) -> list[str]:
    """Run directories that already hold a run with another configuration (e.g. other --steps):
    reusing or resuming them would mix budgets in one table."""
    conflicts = []
    for name, seed in plan:
        saved = saved_configs(runs_dir / name / f"seed{seed}")
        # Compared as configs, so that fields added later with defaults still match older runs.
        if saved is not None and saved != run_configs(preset, name, seed, train_overrides):
            conflicts.append(f"{name}/seed{seed}")
    return conflicts


def run_one(preset: str, variant_name: str, seed: int, train_overrides: dict, run_dir: str, device: str,
            threads: int | None, label: str, show_progress: bool, force: bool) -> dict:
    """Train one (variant, seed); top level so that worker processes can run it."""
    global _corpus
    if threads:
        torch.set_num_threads(threads)
    if _corpus is None:
        _corpus = load_corpus()
    model_cfg, train_cfg = run_configs(preset, variant_name, seed, train_overrides)
    out = Path(run_dir)
    done = out / "results.json"
    # main() has refused run directories that hold another configuration (unless --force).
    if done.is_file() and not force:
        previous = json.loads(done.read_text())
        if previous.get("finished"):
            return previous
    resume = (out / CHECKPOINT_NAME).is_file() and not force
    return train_run(model_cfg, train_cfg, out, device=device, resume=resume, corpus=_corpus, label=label,
                     show_progress=show_progress)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run the CEM vs Llama comparison grid and write a report.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..S-1 per variant (default 3)")
    p.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS], help="default: the whole grid")
    p.add_argument("--results-dir", type=Path, help="report (default: benchmarks/results/experiments-PRESET-DEVICE)")
    p.add_argument("--runs-dir", type=Path, help="per-run outputs and checkpoints (default: runs/experiments-PRESET)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--jobs", type=positive_int, default=1, help="runs at once, each in its own process (default 1)")
    p.add_argument("--threads", type=positive_int,
                   help="torch threads per run (default: 1 on CPU, torch's choice on GPU)")
    p.add_argument("--steps", type=int, help="override the preset's steps (all variants alike)")
    p.add_argument("--warmup-steps", type=int, help="override the preset's warmup steps (all variants alike)")
    p.add_argument("--lr", type=float, help="override the preset's learning rate (all variants alike)")
    p.add_argument("--force", action="store_true",
                   help="retrain runs that already have results or hold another configuration")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite table.md and plots from RESULTS_DIR/results.json without training")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except RunError as err:
        parser.error(str(err))
    if device.type == "cuda" and args.jobs > 1:
        parser.error("--jobs > 1 is for CPU runs; on a GPU, runs share one device better one at a time")
    # On CPU one thread per run by default: these models are too small to gain from a second thread, and
    # two threads on a busy machine run many times slower (every op waits for the descheduled one).
    threads = args.threads or (1 if device.type == "cpu" else None)
    results_dir = args.results_dir or REPO_ROOT / "benchmarks" / "results" / f"experiments-{args.preset}-{device.type}"
    runs_dir = args.runs_dir or REPO_ROOT / "runs" / f"experiments-{args.preset}"
    variants = [VARIANTS_BY_NAME[n] for n in args.variants] if args.variants else VARIANTS
    if args.report_only:
        if not (results_dir / "results.json").is_file():
            parser.error(f"--report-only: no results.json in {results_dir}")
        rewrite_report(results_dir, variants)
        print(f"report: {results_dir}", file=sys.stderr)
        return 0
    train_overrides = {
        k: v for k, v in (("steps", args.steps), ("warmup_steps", args.warmup_steps), ("lr", args.lr)) if v is not None
    }
    try:
        with_overrides(PRESETS[args.preset][1], train_overrides)
        prepare_out_dir(results_dir)  # fail now, not after hours of training
    except (ValueError, RunError) as err:
        parser.error(str(err))

    env = environment(REPO_ROOT, device)
    env.update(jobs=args.jobs, threads_per_run=threads or torch.get_num_threads())
    plan = [(v.name, seed) for seed in range(args.seeds) for v in variants]  # seed-major: early partial grids
    conflicts = [] if args.force else conflicting_runs(plan, args.preset, train_overrides, runs_dir)
    if conflicts:
        parser.error(
            f"{len(conflicts)} run(s) in {runs_dir} hold another configuration ({', '.join(conflicts[:3])}"
            f"{', ...' if len(conflicts) > 3 else ''}): pass --force to retrain them or choose another --runs-dir"
        )
    print(f"{len(plan)} runs ({len(variants)} variants x {args.seeds} seeds), preset {args.preset}, {device}, "
          f"jobs {args.jobs}; runs in {runs_dir}", file=sys.stderr)
    started = time.time()
    records = []

    def finished(name: str, seed: int, res: dict):
        if not res["finished"]:
            print(f"{name} seed {seed} stopped at step {res['step']}; the same command resumes the grid",
                  file=sys.stderr)
            raise SystemExit(130)
        records.append({"variant": name, "seed": seed, **res})
        elapsed = time.time() - started
        print(f"[{len(records)}/{len(plan)}] {name} seed {seed}: test bpb {res['test_bpb']:.4f}, "
              f"{res['tokens_per_second']:,.0f} tok/s, {res['train_seconds']:.0f}s train; "
              f"{elapsed / 60:.1f} min so far",
              file=sys.stderr, flush=True)

    def job(i: int, name: str, seed: int, progress: bool):
        label = f"[{i + 1}/{len(plan)}] {name} s{seed}: "
        return (args.preset, name, seed, train_overrides, str(runs_dir / name / f"seed{seed}"), str(device),
                threads, label, progress, args.force)

    if args.jobs == 1:
        for i, (name, seed) in enumerate(plan):
            finished(name, seed, run_one(*job(i, name, seed, True)))
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_one, *job(i, n, s, False)): (n, s) for i, (n, s) in enumerate(plan)}
            for future in as_completed(futures):
                finished(*futures[future], future.result())

    env.update(wall_seconds=time.time() - started, load_average_at_end=load_average())
    corpus = load_corpus()
    write_report(results_dir, args.preset, variants, records, env, corpus.manifest)
    print(f"report: {results_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
