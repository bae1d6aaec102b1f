"""Random points of the attention and MLP option space. Inputs are never zeros or constants:
every call draws fresh values (seed the generator to replay one)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import torch
from torch import Tensor


def _random(generator, dtype, device, shape, std=1.0, low=None) -> Tensor:
    """Normal(0, std) draws; with ``low``, positive draws low + |Normal(0, std)| (step sizes,
    preconditioner diagonals, slopes: well-conditioned but never constant)."""
    t = torch.randn(*shape, generator=generator, dtype=torch.float64) * std
    if low is not None:
        t = t.abs() + low
    return t.to(dtype).to(device)


class OpInputs:
    """The tensors of one op call (a dataclass in schema order); ``DIFFERENTIABLE`` names the
    ones with gradients, in schema order."""

    DIFFERENTIABLE: ClassVar[tuple[str, ...]] = ()

    def differentiable_names(self) -> list[str]:
        return [name for name in self.DIFFERENTIABLE if getattr(self, name) is not None]

    def differentiable(self) -> list[Tensor]:
        return [getattr(self, name) for name in self.differentiable_names()]

    def requires_grad_(self):
        for t in self.differentiable():
            t.requires_grad_(True)
        return self

    def to(self, dtype: torch.dtype, requires_grad: bool = False):
        """A detached copy in ``dtype`` (with gradients enabled where asked)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        copy = replace(self, **{k: v.detach().to(dtype, copy=True) for k, v in values.items() if isinstance(v, Tensor)})
        return copy.requires_grad_() if requires_grad else copy


@dataclass(frozen=True)
class AttentionCase:
    """One point of the attention option space; ``make`` draws its tensors."""

    batch: int = 2
    seq: int = 13
    dim: int = 16
    heads: int = 2
    head_dim: int = 8
    steps: int = 2
    diag: str = "shared"  # "none" | "shared" | "per_head"
    alibi: bool = True
    precond_diag: bool = True
    precond_rank: int = 3  # 0: no low-rank part
    scale: float | None = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def with_(self, **changes) -> "AttentionCase":
        return replace(self, **changes)

    def make(self, generator: torch.Generator | None = None, requires_grad: bool = False) -> "AttentionInputs":
        def draw(*shape, std=1.0, low=None):
            return _random(generator, self.dtype, self.device, shape, std, low)

        d, h = self.dim, self.heads
        inputs = AttentionInputs(
            x=draw(self.batch, self.seq, d),
            w_q=draw(h, self.head_dim, d, std=d**-0.5),
            w_k=draw(h, self.head_dim, d, std=d**-0.5),
            diag={"none": None, "shared": draw(d, std=0.3), "per_head": draw(h, d, std=0.3)}[self.diag],
            alibi_slopes=draw(h, std=0.2, low=0.05) if self.alibi else None,
            precond_diag=draw(d, std=0.5, low=0.5) if self.precond_diag else None,
            precond_lowrank=draw(d, self.precond_rank, std=0.3 * d**-0.5) if self.precond_rank else None,
            step_size=draw(self.steps, std=0.4, low=0.2),
            scale=self.scale,
        )
        return inputs.requires_grad_() if requires_grad else inputs


@dataclass
class AttentionInputs(OpInputs):
    DIFFERENTIABLE: ClassVar[tuple[str, ...]] = ("x", "w_q", "w_k", "diag", "precond_diag", "precond_lowrank",
                                                 "step_size")  # alibi_slopes are constants
    x: Tensor
    w_q: Tensor
    w_k: Tensor
    diag: Tensor | None
    alibi_slopes: Tensor | None
    precond_diag: Tensor | None
    precond_lowrank: Tensor | None
    step_size: Tensor
    scale: float | None

    def args(self) -> tuple:
        """Positional arguments in schema order (torch.ops.cem.attention)."""
        return (
            self.x, self.w_q, self.w_k, self.diag, self.alibi_slopes,
            self.precond_diag, self.precond_lowrank, self.step_size, self.scale,
        )


@dataclass(frozen=True)
class MLPCase:
    batch: int = 2
    seq: int = 7
    dim: int = 12
    hidden: int = 20
    steps: int = 2
    precond_diag: bool = True
    precond_rank: int = 2
    activation: str = "silu"
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def with_(self, **changes) -> "MLPCase":
        return replace(self, **changes)

    def make(self, generator: torch.Generator | None = None, requires_grad: bool = False) -> "MLPInputs":
        def draw(*shape, std=1.0, low=None):
            return _random(generator, self.dtype, self.device, shape, std, low)

        d, m = self.dim, self.hidden
        inputs = MLPInputs(
            x=draw(self.batch, self.seq, d),
            w=draw(m, d, std=d**-0.5),
            v=draw(m, d, std=m**-0.5),
            precond_diag=draw(d, std=0.5, low=0.5) if self.precond_diag else None,
            precond_lowrank=draw(d, self.precond_rank, std=0.3 * d**-0.5) if self.precond_rank else None,
            step_size=draw(self.steps, std=0.4, low=0.2),
            activation=self.activation,
        )
        return inputs.requires_grad_() if requires_grad else inputs


@dataclass
class MLPInputs(OpInputs):
    DIFFERENTIABLE: ClassVar[tuple[str, ...]] = ("x", "w", "v", "precond_diag", "precond_lowrank", "step_size")
    x: Tensor
    w: Tensor
    v: Tensor
    precond_diag: Tensor | None
    precond_lowrank: Tensor | None
    step_size: Tensor
    activation: str = field(default="silu")

    def args(self) -> tuple:
        """Positional arguments in schema order (torch.ops.cem.mlp)."""
        return (self.x, self.w, self.v, self.precond_diag, self.precond_lowrank, self.step_size, self.activation)

