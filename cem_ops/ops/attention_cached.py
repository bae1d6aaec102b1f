"""cem::attention_cached: the rows of a chunk of new positions against a cache of earlier ones
(chunked prefill and one-token decoding; docs/decoding.md). Inference only: the op has no
backward pass, and says so when one is asked of it."""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference.attention_cached import attention_cached as _reference
from .backends import check_devices_in_fake, register_autocast, register_reference_fallback


def attention_cached(
    x: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    *,
    cache_keys: Tensor,
    cache_context: Tensor | None = None,
    cache_lengths: Tensor,
    diag: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    precond_diag: Tensor | None = None,
    precond_lowrank: Tensor | None = None,
    step_size: Tensor,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """CEM attention for the chunk x of C new positions of each batch row, given the cache.

    Row b's chunk holds positions [n_b, n_b + C) where n_b = cache_lengths[b]; its context is the
    cached positions [0, n_b) and the chunk up to each row. The result equals rows n_b..n_b+C-1 of
    ``cem_ops.attention`` over the whole sequence.

    Args:
        x: (B, C, D) the chunk's layer inputs (its initial iterates and its context).
        w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale: as in
            :func:`cem_ops.attention`; ALiBi distances are taken between absolute positions.
        cache_keys: (B, capacity, H, Dh) keys k_j = W_K c_j of the cached positions; entries at
            and past each row's length are never read.
        cache_context: (B, capacity, D) the cached layer inputs c_j; required with a diagonal, None
            without one.
        cache_lengths: (B,) int64 cached positions per row, 0 <= n_b <= capacity - C; on the CPU
            or on x's device. On a GPU, out-of-range lengths give NaN rows instead of an error.

    Returns:
        (Delta (B, C, D), keys (B, C, H, Dh)) in x's dtype: the chunk's update and its keys, to be
        written at positions [n_b, n_b + C) of cache_keys (and x into cache_context).
    """
    return torch.ops.cem.attention_cached.default(
        x, w_q, w_k, cache_keys, cache_context, cache_lengths, diag, alibi_slopes, precond_diag, precond_lowrank,
        step_size, scale,
    )


def _check_shapes(x, w_q, cache_keys, cache_context, cache_lengths, diag):
    """The kernels' shape checks, for the fake implementation (values cannot be read there)."""
    op = "cem::attention_cached"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be a 3-D tensor (B, C, D), got shape {tuple(x.shape)}")
    batch, chunk, dim = x.shape
    if w_q.dim() != 3 or w_q.shape[2] != dim:
        raise ValueError(f"{op}: w_q must have shape (H, Dh, D) with D = {dim}, got {tuple(w_q.shape)}")
    heads, head_dim, _ = w_q.shape
    if cache_keys.dim() != 4 or (cache_keys.shape[0], cache_keys.shape[2], cache_keys.shape[3]) != (batch, heads, head_dim):
        raise ValueError(f"{op}: cache_keys must have shape (B, capacity, H, Dh) = ({batch}, capacity, {heads}, "
                         f"{head_dim}), got {tuple(cache_keys.shape)}")
    capacity = cache_keys.shape[1]
    if (diag is None) != (cache_context is None):
        raise ValueError(f"{op}: cache_context must be given exactly when a diagonal is (diag is "
                         f"{'None' if diag is None else 'given'})")
    if cache_context is not None and tuple(cache_context.shape) != (batch, capacity, dim):
        raise ValueError(f"{op}: cache_context must have shape (B, capacity, D) = ({batch}, {capacity}, {dim}), "
                         f"got {tuple(cache_context.shape)}")
    if cache_lengths.dtype != torch.int64:
        raise TypeError(f"{op}: cache_lengths must be int64, got {cache_lengths.dtype}")
    if tuple(cache_lengths.shape) != (batch,):
        raise ValueError(f"{op}: cache_lengths must have shape (B,) = ({batch},), got {tuple(cache_lengths.shape)}")
    if chunk > capacity:
        raise ValueError(f"{op}: the chunk of {chunk} positions does not fit a cache of capacity {capacity}")
    return heads, head_dim


@torch.library.register_fake("cem::attention_cached")
def _attention_cached_fake(x, w_q, w_k, cache_keys, cache_context, cache_lengths, diag, alibi_slopes, precond_diag,
                           precond_lowrank, step_size, scale=None):
    check_devices_in_fake(
        "attention_cached", x, w_q=w_q, w_k=w_k, cache_keys=cache_keys, cache_context=cache_context, diag=diag,
        alibi_slopes=alibi_slopes, precond_diag=precond_diag, precond_lowrank=precond_lowrank, step_size=step_size,
    )
    if cache_lengths.device != x.device and cache_lengths.device.type != "cpu":
        raise ValueError(f"cem::attention_cached: cache_lengths must be on the device of x ({x.device}) or on the "
                         f"CPU, got {cache_lengths.device}")
    heads, head_dim = _check_shapes(x, w_q, cache_keys, cache_context, cache_lengths, diag)
    batch, chunk, _ = x.shape
    return x.new_empty(x.shape), x.new_empty(batch, chunk, heads, head_dim)


def _refuse_backward(ctx, *grads):
    raise NotImplementedError(
        "cem::attention_cached has no backward pass: it serves inference (prefill and decoding against a cache). "
        "Train with cem_ops.attention over whole sequences, or run generation under torch.no_grad()"
    )


torch.library.register_autograd("cem::attention_cached", _refuse_backward, setup_context=lambda ctx, inputs, output: None)
register_reference_fallback("attention_cached", _reference)
register_autocast("attention_cached")
