"""AdamW with weight decay on projection matrices only."""

from __future__ import annotations

import torch
from torch import nn

# Decaying these would pull them toward a different model, not a simpler one: gains of norms,
# the CEM diagonal (learned from zero), preconditioner, step sizes and the byte embedding.
NO_DECAY_MARKERS = ("norm", "diag", "preconditioner", "step_size", "embed")


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or any(m in name for m in NO_DECAY_MARKERS) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)
