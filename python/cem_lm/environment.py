"""Where and how a result was produced: machine, software, source revision, date."""

from __future__ import annotations

from pathlib import Path

import torch

from cem_ops import machine

load_average = machine.load_average


def environment(repo: Path, device: torch.device) -> dict:
    info = machine.describe(device, repo)
    info["load_average_at_start"] = info.pop("load_average")
    info["cem_ops_backends"] = info["cem_ops_build"]["kernels"]
    return info
