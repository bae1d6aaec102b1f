"""Linear warmup, then cosine decay to min_lr_ratio * lr at the last step."""

from __future__ import annotations

import math


def learning_rate(step: int, total_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * cosine)
