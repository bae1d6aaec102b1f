"""Model and training configurations, and the named presets (tiny: CPU minutes; small: GPU)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

ATTENTIONS = ("llama", "cem")
MLPS = ("llama", "cem", "cem_wide")
DIAGS = ("none", "shared", "per_head")
STEPS = (1, 2, 4)
PRECONDS = ("none", "diag", "diag_lowrank")
POSITIONS = ("rope", "alibi", "none")
REUSES = ("none", "attention", "mlp", "block")
VOCAB_SIZE = 256  # byte-level


@dataclass(frozen=True)
class ModelConfig:
    """The design space. ``position=None`` means the paper's choice: RoPE for Llama
    attention, ALiBi for CEM attention (RoPE would make its interaction matrix position-dependent).

    ``mlp="cem"`` keeps the SwiGLU hidden width (2/3 of its weights); ``"cem_wide"`` widens the
    hidden layer by 3/2 so that the CEM MLP has as many weights as SwiGLU.
    ``reuse`` applies a sublayer (or the whole block) ``reuse_times`` times with the same weights:
    the naive-reuse control, where keys and values move too, unlike CEM recursion (``*_steps``).
    """

    dim: int = 64
    layers: int = 2
    heads: int = 4
    seq_len: int = 128
    attention: str = "llama"
    mlp: str = "llama"
    diag: str = "shared"
    attn_steps: int = 1
    mlp_steps: int = 1
    precond: str = "none"
    precond_rank: int = 4
    step_size_init: float = 1.0  # initial eta of every CEM step: with 1, T = 2 starts near twice T = 1's update
    position: str | None = None
    reuse: str = "none"
    reuse_times: int = 2
    tie_embeddings: bool = False
    norm_eps: float = 1e-6

    def __post_init__(self):
        choices = {
            "attention": ATTENTIONS, "mlp": MLPS, "diag": DIAGS, "attn_steps": STEPS,
            "mlp_steps": STEPS, "precond": PRECONDS, "reuse": REUSES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS} or None, got {self.position!r}")
        if self.attention == "cem" and self.position == "rope":
            raise ValueError("CEM attention supports position 'alibi' or 'none', not 'rope'")
        _require_at_least(self, 1, "dim", "layers", "heads", "seq_len", "precond_rank", "reuse_times")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if not math.isfinite(self.step_size_init):
            raise ValueError(f"step_size_init must be finite, got {self.step_size_init}")

    @property
    def resolved_position(self) -> str:
        if self.position is not None:
            return self.position
        return "rope" if self.attention == "llama" else "alibi"

    @property
    def swiglu_hidden(self) -> int:
        """8D/3 rounded up to a multiple of 8, as in cem_ops.nn.LlamaBlock."""
        return 8 * ((8 * self.dim // 3 + 7) // 8)

    @property
    def mlp_hidden(self) -> int:
        return self.swiglu_hidden * 3 // 2 if self.mlp == "cem_wide" else self.swiglu_hidden


@dataclass(frozen=True)
class TrainConfig:
    """Optimization and evaluation settings; every run sees steps * batch_size * seq_len tokens."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-2
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    test_tokens: int | None = 131072  # None: every non-overlapping test window
    checkpoint_every: int = 100
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere

    def __post_init__(self):
        _require_at_least(self, 1, "steps", "batch_size", "eval_every", "eval_batches", "checkpoint_every")
        _require_at_least(self, 0, "warmup_steps")
        if self.test_tokens is not None and self.test_tokens < 1:
            raise ValueError(f"test_tokens must be >= 1 or None (the whole test split), got {self.test_tokens}")
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite positive number, got {value}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        if not 0 < self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in (0, 1], got {self.min_lr_ratio}")


def _require_at_least(config, low: int, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    # Under two minutes per run on two CPU cores (eval included) for every grid variant. lr 1e-2: in a
    # one-seed sweep over {3e-3, 1e-2, 2e-2} it was best for CEM attention, CEM MLP and full CEM, and
    # 0.04 bpb behind 2e-2 for Llama; one learning rate for all keeps the comparison simple.
    "tiny": (
        ModelConfig(dim=64, layers=2, heads=4, seq_len=128),
        TrainConfig(steps=300, batch_size=16, lr=1e-2, warmup_steps=30, eval_every=30, eval_batches=8,
                    test_tokens=131072, checkpoint_every=100),
    ),
    # About 19M parameters for the Llama baseline (12 D^2 L + embeddings); a GPU run of minutes.
    "small": (
        ModelConfig(dim=512, layers=6, heads=8, seq_len=512),
        TrainConfig(steps=4000, batch_size=32, lr=1.5e-3, warmup_steps=200, eval_every=250, eval_batches=16,
                    test_tokens=None, checkpoint_every=500),
    ),
}


def with_overrides(config, overrides: dict):
    """A copy of a frozen config with the given fields replaced (unknown names are an error)."""
    known = {f.name for f in fields(config)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown {type(config).__name__} fields: {sorted(unknown)}")
    return replace(config, **overrides)


def config_from_dict(cls, data: dict):
    """Inverse of dataclasses.asdict for these flat configs (JSON turns tuples into lists)."""
    data = dict(data)
    if cls is TrainConfig and "betas" in data:
        data["betas"] = tuple(data["betas"])
    return cls(**data)


__all__ = [
    "ATTENTIONS", "DIAGS", "MLPS", "POSITIONS", "PRECONDS", "PRESETS", "REUSES", "STEPS", "VOCAB_SIZE",
    "ModelConfig", "TrainConfig", "config_from_dict", "with_overrides",
]
