"""python/generate.py: sample bytes of text from a trained checkpoint (see --help)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .config import ModelConfig, config_from_dict
from .errors import RunError
from .model import LanguageModel
from .sampling import GenerationStats, Sampling, generate


def load_model(path: Path, device: torch.device) -> LanguageModel:
    """The model of a checkpoint file, or of a run directory's checkpoint."""
    path = path / CHECKPOINT_NAME if path.is_dir() else path
    if not path.is_file():
        raise RunError(f"no checkpoint at {path} (give a run directory of train.py or its {CHECKPOINT_NAME})")
    checkpoint = load_checkpoint(path)
    model = LanguageModel(config_from_dict(ModelConfig, checkpoint["model_config"]))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise RunError(f"{path}: the weights do not fit the checkpoint's model config ({error})") from error
    return model.to(device).eval()


def resolve_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: no CUDA device is visible")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be auto, cpu or cuda[:N], got {name}")
    return device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("checkpoint", type=Path, help="a run directory (from train.py --out) or its checkpoint.pt")
    p.add_argument("--prompt", default="", help="text to continue (UTF-8 bytes; default: a newline)")
    p.add_argument("--new-tokens", type=int, default=200, help="bytes to generate per sample (default 200)")
    p.add_argument("--samples", type=int, default=1, help="rows generated side by side (default 1)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely byte")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely bytes only")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence for every byte (slow)")
    p.add_argument("--quiet", action="store_true", help="no progress line and no timing")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.new_tokens < 0 or args.samples < 1:
        parser.error("--new-tokens must be >= 0 and --samples >= 1")
    if args.greedy and (args.temperature != 1.0 or args.top_k is not None):
        parser.error("--greedy takes the most likely byte: it excludes --temperature and --top-k")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be in [0, 2**63), got {args.seed}")
    try:
        sampling = Sampling(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k)
    except ValueError as error:
        parser.error(str(error))
    device = resolve_device(parser, args.device)
    try:
        model = load_model(args.checkpoint, device)
    except RunError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    prompt_bytes = (args.prompt or "\n").encode("utf-8")
    prompt = torch.tensor(list(prompt_bytes), dtype=torch.int64, device=device).expand(args.samples, -1)
    show = not args.quiet and sys.stderr.isatty()

    def on_token(i: int, token: torch.Tensor) -> None:
        if show:
            sys.stderr.write(f"\rgenerating: {i + 1}/{args.new_tokens} bytes")
            sys.stderr.flush()

    stats = GenerationStats()
    tokens = generate(model, prompt, args.new_tokens, sampling, use_cache=not args.no_cache,
                      generator=torch.Generator().manual_seed(args.seed), on_token=on_token, stats=stats)
    if show:
        sys.stderr.write("\n")
    for row, sample in enumerate(tokens.tolist()):
        if args.samples > 1:
            print(f"--- sample {row + 1}")
        print(bytes(sample).decode("utf-8", errors="replace"))
    if not args.quiet:
        print(f"{stats.rows} x {stats.new_tokens} bytes: prefill of {stats.prompt_tokens} in "
              f"{stats.prefill_seconds * 1e3:.1f} ms, decoding {stats.tokens_per_second:.1f} tokens/s "
              f"({'recomputing' if args.no_cache else 'cached'}, {device})", file=sys.stderr)
    return 0
