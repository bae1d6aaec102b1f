"""The comparison grid: named model variants as overrides of the preset's ModelConfig.

Each variant changes one thing against the variant named in ``compare_to``, so that the table
reads as the paper's comparisons: CEM vs Llama attention, T = 1 vs 2, the diagonal,
preconditioners, CEM MLPs, full CEM, and recursion vs naive reuse.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    overrides: dict = field(default_factory=dict)
    compare_to: str | None = None
    group: str = "attention"  # which panel of the val-curve plot


CEM_ATTN = {"attention": "cem", "diag": "shared"}
CEM_MLP = {"mlp": "cem"}
FULL = {**CEM_ATTN, **CEM_MLP}

VARIANTS = [
    Variant("llama", "Llama attention (RoPE) + SwiGLU"),
    Variant("llama_alibi", "Llama attention (ALiBi) + SwiGLU", {"position": "alibi"}, compare_to="llama"),
    Variant("cem_attn_t1", "CEM attention T=1, shared diag", CEM_ATTN, compare_to="llama_alibi"),
    Variant("cem_attn_t2", "CEM attention T=2, shared diag", {**CEM_ATTN, "attn_steps": 2}, compare_to="cem_attn_t1"),
    Variant("cem_attn_diag_none", "CEM attention T=1, no diag", {**CEM_ATTN, "diag": "none"},
            compare_to="cem_attn_t1"),
    Variant("cem_attn_diag_per_head", "CEM attention T=1, per-head diag", {**CEM_ATTN, "diag": "per_head"},
            compare_to="cem_attn_t1"),
    Variant("cem_attn_precond_diag", "CEM attention T=1, diag preconditioner", {**CEM_ATTN, "precond": "diag"},
            compare_to="cem_attn_t1"),
    Variant("cem_attn_precond_dlr", "CEM attention T=1, diag + low-rank (R=4) preconditioner",
            {**CEM_ATTN, "precond": "diag_lowrank"}, compare_to="cem_attn_t1"),
    Variant("reuse_cem_attn", "CEM attention T=1 sublayer applied twice (naive reuse)",
            {**CEM_ATTN, "reuse": "attention"}, compare_to="cem_attn_t2"),
    Variant("cem_mlp_t1", "CEM MLP T=1 (SwiGLU width)", CEM_MLP, compare_to="llama", group="mlp"),
    Variant("cem_mlp_t2", "CEM MLP T=2 (SwiGLU width)", {**CEM_MLP, "mlp_steps": 2}, compare_to="cem_mlp_t1",
            group="mlp"),
    Variant("cem_wide_mlp_t1", "CEM MLP T=1, widened to SwiGLU's params", {"mlp": "cem_wide"},
            compare_to="cem_mlp_t1", group="mlp"),
    Variant("reuse_cem_mlp", "CEM MLP T=1 sublayer applied twice (naive reuse)", {**CEM_MLP, "reuse": "mlp"},
            compare_to="cem_mlp_t2", group="mlp"),
    Variant("full_cem_t1", "CEM attention + CEM MLP, T=1", FULL, compare_to="llama_alibi", group="full"),
    Variant("full_cem_t2", "CEM attention + CEM MLP, T=2", {**FULL, "attn_steps": 2, "mlp_steps": 2},
            compare_to="full_cem_t1", group="full"),
]
VARIANTS_BY_NAME = {v.name: v for v in VARIANTS}
