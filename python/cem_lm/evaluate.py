"""Mean next-byte loss over fixed windows, and bits per byte."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def next_byte_loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def mean_loss(model: nn.Module, windows: Tensor, batch_size: int, device: torch.device, precision: str) -> float:
    """Mean loss in nats per byte over (W, N + 1) windows (every window has N targets)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start : start + batch_size].to(device)
        with autocast_context(device, precision):
            loss = next_byte_loss(model, chunk[:, :-1], chunk[:, 1:])
        total += loss.item() * chunk.shape[0]
        count += chunk.shape[0]
    model.train(was_training)
    return total / count


def bits_per_byte(nats: float) -> float:
    return nats / math.log(2)
