"""What a call costs: useful FLOPs by the benchmarks' convention, and CPU peak memory."""

from __future__ import annotations

import torch


def cpu_peak_bytes(fn) -> int:
    """Peak bytes of CPU tensor memory allocated (and alive) while fn runs, beyond what existed
    before: every allocation through the CPU allocator is counted (cem_testing::cpu_allocation_probe)."""
    probe = torch.ops.cem_testing.cpu_allocation_probe
    probe("start")
    try:
        fn()
    finally:
        peak = probe("stop")
    return peak


def attention_flops(batch: int, seq: int, dim: int, heads: int, head_dim: int, steps: int, diag: str) -> float:
    """Useful forward FLOPs of one attention call (2 per multiply-add), causal half of the scores.

    Projections: K once (B N D HDh), per step Q and the output W_Q^T o (2 B N D HDh).
    Core per step and head: scores and P K over the N (N + 1) / 2 causal pairs, 2 * pairs * Dh each.
    Shared diagonal per step: its score term and Pbar c, 2 * pairs * D each, once for all heads;
    per-head diagonal: the same for every head.
    """
    causal_pairs = batch * seq * (seq + 1) / 2
    projections = 2 * batch * seq * dim * heads * head_dim * (1 + 2 * steps)
    core = steps * heads * causal_pairs * 2 * (2 * head_dim)
    diag_heads = {"none": 0, "shared": 1, "per_head": heads}[diag]
    diagonal = steps * diag_heads * causal_pairs * 2 * (2 * dim)
    return projections + core + diagonal


def llama_attention_flops(batch: int, seq: int, dim: int, heads: int, head_dim: int) -> float:
    """Forward FLOPs of a Llama attention layer: Q, K, V, O projections and the causal core."""
    causal_pairs = batch * seq * (seq + 1) / 2
    return 2 * batch * seq * dim * heads * head_dim * 4 + heads * causal_pairs * 2 * (2 * head_dim)
