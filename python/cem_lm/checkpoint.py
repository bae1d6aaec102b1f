"""Checkpoints hold everything a resumed run needs to continue exactly as if never stopped."""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from .errors import RunError

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state(sampler: torch.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "sampler": sampler.get_state(),
    }


def restore_rng(state: dict, sampler: torch.Generator):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    sampler.set_state(state["sampler"])


def save_checkpoint(path: Path, **state):
    """Write to a temporary file, then rename, so an interrupted save leaves the old checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("model", "optimizer", "step", "history", "train_seconds", "rng", "model_config", "train_config")


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise RunError(f"no checkpoint to resume from at {path}")
    try:
        # Our own file; it holds Python RNG state and config dicts, not only tensors.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, not a torch file, unpicklable: all the same to the user
        raise RunError(f"{path} is not a readable checkpoint ({type(error).__name__}: {error})") from error
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise RunError(f"{path} is not a cem_lm checkpoint (missing {missing})")
    return state
