"""One training run: AdamW, warmup + cosine LR, grad clipping, periodic val loss, checkpoints
with exact resume, final test bits per byte, and a results JSON (plus a loss plot). Under torchrun
the same run spreads over the ranks with DDP or FSDP2 (distributed.py); rank 0 writes and reports."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .checkpoint import CHECKPOINT_NAME, load_checkpoint, restore_rng, rng_state, save_checkpoint
from .config import ModelConfig, TrainConfig, config_from_dict
from .data import Corpus, eval_windows, load_corpus, manifest_summary, sample_batch
from .distributed import World, full_state, join_world, leave_world, load_full_state, wrap_model
from .evaluate import autocast_context, bits_per_byte, mean_loss, next_byte_loss
from .errors import RunError
from .interrupt import StopOnInterrupt
from .model import LanguageModel, parameter_counts
from .optim import make_optimizer
from .plots import plot_run
from .progress import Progress
from .schedule import learning_rate


RUN_CONFIG_NAME = "config.json"


def saved_configs(out_dir: Path) -> tuple[ModelConfig, TrainConfig] | None:
    """The configuration of the run in out_dir (from config.json, else results.json), or None."""
    for name in (RUN_CONFIG_NAME, "results.json"):
        path = Path(out_dir) / name
        if path.is_file():
            data = json.loads(path.read_text())
            return config_from_dict(ModelConfig, data["model_config"]), config_from_dict(TrainConfig, data["train_config"])
    return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise RunError(f"--device {name!r} is not a device torch knows ({error})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name!r} was asked for, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RunError(f"--device {name!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise RunError(f"--device {name!r}: only cpu and cuda devices are supported")
    return device


def prepare_out_dir(out_dir: Path) -> None:
    """Create the run directory and make sure it takes files, before any training time is spent."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise RunError(f"cannot write to {out_dir}: {error.strerror or error}") from error


def check_data_fits(corpus: Corpus, seq_len: int, test_tokens: int | None) -> None:
    """Every split must hold at least one window of seq_len + 1 bytes, and the test a whole window."""
    for split, stream in corpus.tokens.items():
        if stream.numel() < seq_len + 2:
            raise RunError(f"seq_len {seq_len} is longer than the {split} split ({stream.numel():,} bytes)")
    if test_tokens is not None and test_tokens < seq_len:
        raise RunError(f"--test-tokens {test_tokens} is less than one window of seq_len {seq_len}")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    return precision


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_history() -> dict:
    return {"train_step": [], "train_bpb": [], "val_step": [], "val_bpb": [], "lr": []}


def train_run(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: Path,
    *,
    device: str = "auto",
    resume: bool = False,
    stop_at: int | None = None,
    corpus: Corpus | None = None,
    label: str = "",
    show_progress: bool = True,
    plot: bool = True,
    parallel: str = "none",
) -> dict:
    """Train (or resume) in out_dir; returns the results dict also written to results.json.

    stop_at ends the session after that step with a checkpoint (a resumed run continues to
    train_cfg.steps as if never stopped); the results then carry "finished": False and no test score.
    parallel: "ddp" or "fsdp2" under torchrun (batch_size is then the global batch), else "none".
    """
    dev = resolve_device(device)  # before the run directory exists: a bad device leaves nothing behind
    world = join_world(parallel, dev)
    try:
        return _train_run(model_cfg, train_cfg, Path(out_dir), world.device(dev), world, resume=resume,
                          stop_at=stop_at, corpus=corpus, label=label, show_progress=show_progress, plot=plot)
    finally:
        leave_world(world)


def _restore(model, optimizer, checkpoint: dict, world: World) -> None:
    optim_state = checkpoint["optimizer"]
    if all(isinstance(key, int) for key in optim_state.get("state", {})) and optim_state.get("state"):
        # Written before checkpoints held named (world-size free) state: one process only.
        if world.distributed:
            raise RunError("this checkpoint predates distributed resume: resume it with --parallel none")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(optim_state)
        return
    load_full_state(model, optimizer, checkpoint["model"], optim_state)


def _train_run(model_cfg, train_cfg, out_dir: Path, dev: torch.device, world: World, *, resume, stop_at, corpus,
               label, show_progress, plot) -> dict:
    # Rank 0 checks the run directory; every rank stops with its verdict.
    problem = None
    if world.is_main:
        try:
            prepare_out_dir(out_dir)
        except RunError as error:
            problem = str(error)
    problem = world.from_main(problem)
    if problem:
        raise RunError(problem)
    ckpt_path = out_dir / CHECKPOINT_NAME
    checkpoint = load_checkpoint(ckpt_path) if resume else None
    if checkpoint is not None:
        # The run's own configuration wins: a resumed run must be the same run.
        model_cfg = config_from_dict(ModelConfig, checkpoint["model_config"])
        train_cfg = config_from_dict(TrainConfig, checkpoint["train_config"])

    precision = resolve_precision(train_cfg.precision, dev)
    world.check_batch(train_cfg.batch_size)
    corpus = corpus if corpus is not None else load_corpus()
    check_data_fits(corpus, model_cfg.seq_len, train_cfg.test_tokens)
    if world.is_main:  # which run lives here, readable without the checkpoint (the grid runner checks it)
        (out_dir / RUN_CONFIG_NAME).write_text(
            json.dumps({"model_config": asdict(model_cfg), "train_config": asdict(train_cfg)}, indent=1)
        )
    torch.manual_seed(train_cfg.seed)  # the same on every rank: identical initial weights
    random.seed(train_cfg.seed)
    sampler = torch.Generator().manual_seed(train_cfg.seed)  # the same global batches on every rank
    core = LanguageModel(model_cfg).to(dev)
    params = parameter_counts(core)  # before FSDP2 turns the parameters into shards
    model = wrap_model(core, world, precision)
    optimizer = make_optimizer(model, train_cfg.lr, train_cfg.weight_decay, train_cfg.betas)
    val_windows = eval_windows(corpus.tokens["val"], model_cfg.seq_len, train_cfg.eval_batches * train_cfg.batch_size)

    step, history, train_seconds = 0, empty_history(), 0.0
    if checkpoint is not None:
        _restore(model, optimizer, checkpoint, world)
        restore_rng(checkpoint["rng"], sampler)
        step, history, train_seconds = checkpoint["step"], checkpoint["history"], checkpoint["train_seconds"]

    def checkpoint_now():
        model_state, optim_state = full_state(model, optimizer)  # every rank takes part
        if world.is_main:
            save_checkpoint(
                ckpt_path, model=model_state, optimizer=optim_state, step=step, history=history,
                train_seconds=train_seconds, rng=rng_state(sampler),
                model_config=asdict(model_cfg), train_config=asdict(train_cfg),
            )
        world.barrier()

    last = train_cfg.steps if stop_at is None else min(stop_at, train_cfg.steps)
    tokens_per_step = train_cfg.batch_size * model_cfg.seq_len
    progress = Progress(train_cfg.steps, label, enabled=show_progress and world.is_main)
    model.train()
    interrupted = False
    with StopOnInterrupt(announce=world.is_main) as interrupt:
        while step < last:
            lr = learning_rate(step, train_cfg.steps, train_cfg.lr, train_cfg.warmup_steps, train_cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = sample_batch(corpus.tokens["train"], train_cfg.batch_size, model_cfg.seq_len, sampler)
            inputs, targets = world.local_rows(inputs), world.local_rows(targets)
            _sync(dev)
            started = time.perf_counter()
            with autocast_context(dev, precision):
                loss = next_byte_loss(model, inputs.to(dev), targets.to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP and FSDP2 average the gradients over the ranks here
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            optimizer.step()
            loss_value = world.mean(loss.item())  # the whole batch's loss; also synchronizes
            train_seconds += time.perf_counter() - started
            step += 1
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at step {step} ({label or out_dir})")
            history["train_step"].append(step)
            history["train_bpb"].append(bits_per_byte(loss_value))
            history["lr"].append(lr)
            if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
                val = mean_loss(model, val_windows, train_cfg.batch_size, dev, precision)
                history["val_step"].append(step)
                history["val_bpb"].append(bits_per_byte(val))
            if step % train_cfg.checkpoint_every == 0 or step == last:
                checkpoint_now()
            val_text = f"{history['val_bpb'][-1]:.3f}" if history["val_bpb"] else "-"
            progress.update(step, bpb=f"{bits_per_byte(loss_value):.3f}", val=val_text, lr=f"{lr:.2e}",
                            tok_s=f"{step * tokens_per_step / max(train_seconds, 1e-9):,.0f}")
            interrupted = world.any(interrupt.requested)
            if interrupted:
                checkpoint_now()
                break
    progress.close()

    finished = step >= train_cfg.steps
    results = {
        "finished": finished,
        "interrupted": interrupted and not finished,
        "step": step,
        "model_config": asdict(model_cfg),
        "position": model_cfg.resolved_position,
        "train_config": asdict(train_cfg),
        "device": str(dev),
        "parallel": world.parallel,
        "world_size": world.size,
        "precision": precision,
        "torch_threads": torch.get_num_threads(),
        "params": params,
        "tokens_trained": step * tokens_per_step,
        "train_seconds": train_seconds,
        "tokens_per_second": step * tokens_per_step / max(train_seconds, 1e-9),
        "data": manifest_summary(corpus.manifest),
        "history": history,
    }
    if finished:
        test_windows = eval_windows(
            corpus.tokens["test"], model_cfg.seq_len,
            None if train_cfg.test_tokens is None else train_cfg.test_tokens // model_cfg.seq_len,
        )
        test = mean_loss(model, test_windows, train_cfg.batch_size, dev, precision)
        results.update(test_bpb=bits_per_byte(test), test_tokens=test_windows.shape[0] * model_cfg.seq_len)
        results["final_val_bpb"] = history["val_bpb"][-1]
    if world.is_main:
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
        if plot:
            plot_run(history, out_dir / "loss.png", label.strip(" :") or out_dir.name)
    return results
