"""Reference implementations: plain PyTorch, any device, the oracle for tests and benchmarks
and the fallback for devices without compiled kernels."""

from .attention import (
    AttentionForward,
    attention,
    attention_energy,
    attention_forward,
    attention_neg_grad,
    attention_step_at,
)
from .attention_cached import attention_cached
from .attention_backward import AttentionGrads, attention_backward
from .mlp import ACTIVATIONS, MLPForward, mlp, mlp_energy, mlp_forward, mlp_neg_grad
from .mlp_backward import MLPGrads, mlp_backward

__all__ = [
    "attention_step_at",
    "ACTIVATIONS",
    "AttentionForward",
    "AttentionGrads",
    "MLPForward",
    "MLPGrads",
    "attention",
    "attention_backward",
    "attention_cached",
    "attention_energy",
    "attention_forward",
    "attention_neg_grad",
    "mlp",
    "mlp_backward",
    "mlp_energy",
    "mlp_forward",
    "mlp_neg_grad",
]
