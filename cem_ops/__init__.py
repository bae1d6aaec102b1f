"""cem_ops: fused Causal Energy Minimization (CEM) Transformer layers for PyTorch.

Ops live in the ``torch.ops.cem`` namespace; the functions here are typed wrappers:

    cem_ops.attention(x, w_q, w_k, *, diag=None, alibi_slopes=None, precond_diag=None,
                      precond_lowrank=None, step_size, scale=None)
    cem_ops.attention_cached(x, w_q, w_k, *, cache_keys, cache_context=None, cache_lengths, ...)
    cem_ops.attention_energy(x, context, w_q, w_k, *, diag=None, alibi_slopes=None, scale=None)
    cem_ops.mlp(x, w, v, *, precond_diag=None, precond_lowrank=None, step_size, activation="silu")
    cem_ops.mlp_energy(x, context, w, v, *, activation="silu")

See docs/ for the math (cem-math.md is the contract) and the explicit backward formulas.
"""

from ._extension import load_extension

_C = load_extension()

from . import nn, reference, testing  # noqa: E402
from .ops.attention import attention, attention_energy  # noqa: E402
from .ops.attention_cached import attention_cached  # noqa: E402
from .ops.backends import build_info, kernel_backends  # noqa: E402
from .ops.mlp import mlp, mlp_energy  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_cached",
    "attention_energy",
    "build_info",
    "kernel_backends",
    "mlp",
    "mlp_energy",
    "nn",
    "reference",
    "testing",
]
