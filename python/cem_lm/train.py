"""Command line: train and evaluate one model.

    python python/train.py --preset tiny --attention cem --attn-steps 2 --out runs/cem_t2
    python -m cem_lm.train --preset tiny --variant full_cem_t2 --out runs/full   (with python/ on PYTHONPATH)
    torchrun --nproc-per-node 2 python/train.py --parallel ddp --attention cem --out runs/ddp
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .checkpoint import CHECKPOINT_NAME
from .config import ATTENTIONS, DIAGS, MLPS, POSITIONS, PRECONDS, PRESETS, REUSES, STEPS, with_overrides
from .distributed import PARALLEL_MODES
from .errors import RunError
from .trainer import train_run
from .variants import VARIANTS_BY_NAME

# CLI flag -> ModelConfig / TrainConfig field; None-valued flags keep the preset's value.
MODEL_FLAGS = ("dim", "layers", "heads", "seq_len", "attention", "mlp", "diag", "attn_steps", "mlp_steps",
               "precond", "precond_rank", "step_size_init", "position", "reuse", "reuse_times")
TRAIN_FLAGS = ("steps", "batch_size", "lr", "warmup_steps", "weight_decay", "grad_clip", "eval_every",
               "eval_batches", "test_tokens", "checkpoint_every", "seed", "precision")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="sizes and schedule (default: tiny)")
    p.add_argument("--variant", choices=sorted(VARIANTS_BY_NAME), help="a named variant of the experiment grid")
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoint, results.json, loss.png)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--parallel", choices=PARALLEL_MODES, default="none",
                   help="under torchrun: ddp (replicas) or fsdp2 (sharded); one CUDA device per rank, or the "
                        "CPU with gloo; --batch-size is the global batch (default: none, one process)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt with its own config")
    p.add_argument("--overwrite", action="store_true", help="start over in an OUT that already holds a run")
    p.add_argument("--stop-at", type=positive_int, help="stop after this step, leaving a checkpoint to --resume from")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress line")

    m = p.add_argument_group("model (default: the preset's, then the variant's)")
    m.add_argument("--dim", type=int)
    m.add_argument("--layers", type=int)
    m.add_argument("--heads", type=int)
    m.add_argument("--seq-len", type=int)
    m.add_argument("--attention", choices=ATTENTIONS)
    m.add_argument("--mlp", choices=MLPS, help="llama = SwiGLU; cem_wide = CEM MLP widened to SwiGLU's params")
    m.add_argument("--diag", choices=DIAGS, help="diagonal of the CEM interaction matrix")
    m.add_argument("--attn-steps", type=int, choices=STEPS, help="CEM attention steps T")
    m.add_argument("--mlp-steps", type=int, choices=STEPS, help="CEM MLP steps T")
    m.add_argument("--precond", choices=PRECONDS, help="preconditioner of the CEM updates")
    m.add_argument("--precond-rank", type=int)
    m.add_argument("--step-size-init", type=float, help="initial step size of every CEM step (default 1)")
    m.add_argument("--position", choices=POSITIONS, help="default: rope for llama attention, alibi for cem")
    m.add_argument("--reuse", choices=REUSES, help="naive reuse: apply this sublayer (or block) again")
    m.add_argument("--reuse-times", type=int)
    m.add_argument("--tie-embeddings", action="store_true", help="head weight = embedding (default: untied)")

    t = p.add_argument_group("training (default: the preset's)")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--warmup-steps", type=int)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--grad-clip", type=float)
    t.add_argument("--eval-every", type=int)
    t.add_argument("--eval-batches", type=int)
    t.add_argument("--test-tokens", type=int, help="cap on test tokens (0: the whole test split)")
    t.add_argument("--checkpoint-every", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="auto: bf16 autocast on CUDA, else fp32")
    return p


def configs_from_args(args: argparse.Namespace):
    model_cfg, train_cfg = PRESETS[args.preset]
    overrides = dict(VARIANTS_BY_NAME[args.variant].overrides) if args.variant else {}
    overrides.update({k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None})
    if args.tie_embeddings:
        overrides["tie_embeddings"] = True
    train_overrides = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    if train_overrides.get("test_tokens") == 0:
        train_overrides["test_tokens"] = None
    return with_overrides(model_cfg, overrides), with_overrides(train_cfg, train_overrides)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        model_cfg, train_cfg = configs_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    if args.resume and not (args.out / CHECKPOINT_NAME).is_file():
        parser.error(f"--resume: no checkpoint at {args.out / CHECKPOINT_NAME}")
    existing = [name for name in (CHECKPOINT_NAME, "results.json") if (args.out / name).is_file()]
    if existing and not (args.resume or args.overwrite):
        parser.error(f"{args.out} already holds a run ({', '.join(existing)}): "
                     "--resume continues it, --overwrite starts over")
    if args.threads:
        torch.set_num_threads(args.threads)
    ignored = [f for f in (*MODEL_FLAGS, *TRAIN_FLAGS, "variant") if getattr(args, f) is not None]
    if args.resume and ignored:
        print(f"notice: --resume continues with the checkpoint's own configuration; ignoring {ignored}",
              file=sys.stderr)
    try:
        results = train_run(model_cfg, train_cfg, args.out, device=args.device, resume=args.resume,
                            stop_at=args.stop_at, plot=not args.no_plot, show_progress=not args.quiet,
                            parallel=args.parallel)
    except RunError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if int(os.environ.get("RANK", "0")) != 0:
        return 130 if results["interrupted"] else 0  # rank 0 reports for the run
    summary = {k: results[k] for k in ("finished", "step", "tokens_per_second", "params") if k in results}
    if results["finished"]:
        summary.update(test_bpb=results["test_bpb"], final_val_bpb=results["final_val_bpb"])
    print(json.dumps(summary, indent=1))
    print(f"results: {args.out / 'results.json'}", file=sys.stderr)
    if not results["finished"]:
        why = "interrupted" if results["interrupted"] else f"stopped (--stop-at {args.stop_at})"
        print(f"{why} at step {results['step']} of {results['train_config']['steps']}; "
              f"continue with: --out {args.out} --resume", file=sys.stderr)
    return 130 if results["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
