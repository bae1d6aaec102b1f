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

from .config import PRESETS, ModelConfig, TrainConfig, config_from_dict, with_overrides
from .data import load_corpus
from .environment import environment, load_average
from .report import rewrite_report, write_report
from .trainer import resolve_device, train_run
from .variants import VARIANTS, VARIANTS_BY_NAME

REPO_ROOT = Path(__file__).resolve().parents[2]
_corpus = None  # one copy per process


def run_one(preset: str, variant_name: str, seed: int, train_overrides: dict, run_dir: str, device: str,
            threads: int | None, label: str, show_progress: bool, force: bool) -> dict:
    """Train one (variant, seed); top level so that worker processes can run it."""
    global _corpus
    if threads:
        torch.set_num_threads(threads)
    if _corpus is None:
        _corpus = load_corpus()
    model_cfg, train_cfg = PRESETS[preset]
    model_cfg = with_overrides(model_cfg, VARIANTS_BY_NAME[variant_name].overrides)
    train_cfg = with_overrides(train_cfg, {**train_overrides, "seed": seed})
    out = Path(run_dir)
    done = out / "results.json"
    if done.is_file() and not force:
        previous = json.loads(done.read_text())
        # Compared as configs, so that fields added later with defaults still match older runs.
        same = (config_from_dict(ModelConfig, previous["model_config"]) == model_cfg
                and config_from_dict(TrainConfig, previous["train_config"]) == train_cfg)
        if previous.get("finished") and same:
            return previous
    resume = (out / "checkpoint.pt").is_file() and not force
    return train_run(model_cfg, train_cfg, out, device=device, resume=resume, corpus=_corpus, label=label,
                     show_progress=show_progress)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run the CEM vs Llama comparison grid and write a report.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 per variant (default 3)")
    p.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS], help="default: the whole grid")
    p.add_argument("--results-dir", type=Path, help="report (default: benchmarks/results/experiments-PRESET-DEVICE)")
    p.add_argument("--runs-dir", type=Path, help="per-run outputs and checkpoints (default: runs/experiments-PRESET)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: 1 on CPU, torch's choice on GPU)")
    p.add_argument("--steps", type=int, help="override the preset's steps (all variants alike)")
    p.add_argument("--lr", type=float, help="override the preset's learning rate (all variants alike)")
    p.add_argument("--force", action="store_true", help="retrain runs that already have results")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite table.md and plots from RESULTS_DIR/results.json without training")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be >= 1")
    device = resolve_device(args.device)
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
    train_overrides = {k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v is not None}

    env = environment(REPO_ROOT, device)
    env.update(jobs=args.jobs, threads_per_run=threads or torch.get_num_threads())
    plan = [(v.name, seed) for seed in range(args.seeds) for v in variants]  # seed-major: early partial grids
    print(f"{len(plan)} runs ({len(variants)} variants x {args.seeds} seeds), preset {args.preset}, {device}, "
          f"jobs {args.jobs}; runs in {runs_dir}", file=sys.stderr)
    started = time.time()
    records = []

    def finished(name: str, seed: int, res: dict):
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
