"""Activation checkpointing of a CEMBlock (torch.utils.checkpoint, both flavours, and the
composable checkpoint FSDP2 uses) recomputes the same forward, so it must give the same
gradients as the plain block: on the CPU kernels and on the CUDA path (in emulation on the CPU)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.distributed._composable import checkpoint as composable_checkpoint
from torch.utils.checkpoint import checkpoint

import cem_ops
from cem_ops.nn import CEMBlock
from cem_ops.testing import cuda_emulation, relative_error

needs_emulation = pytest.mark.skipif(not cem_ops.build_info().get("cuda_emulation"),
                                     reason="the emulated CUDA backend (cem_ops._C_emulated) was not built")


def random_block(rng: torch.Generator, diag: str) -> CEMBlock:
    block = CEMBlock(24, 3, 40, attention_kwargs={"steps": 2, "diag": diag, "precond": "diag_lowrank"})
    with torch.no_grad():
        for parameter in block.parameters():  # nothing at its zero or identity init
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=rng))
        block.attention.step_size.copy_(0.5 + torch.rand(2, generator=rng))
    return block


def gradients(block: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, run) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    (run(block, x) * dy).sum().backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters() if p.grad is not None}
    grads["x"] = x.grad
    return grads


FLAVOURS = {
    "non_reentrant": lambda block, x: checkpoint(block, x, use_reentrant=False),
    "reentrant": lambda block, x: checkpoint(block, x, use_reentrant=True),
}


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda_emulated", marks=needs_emulation)])
@pytest.mark.parametrize("flavour", [*FLAVOURS, "fsdp2_composable"])
@pytest.mark.parametrize("diag", ["none", "shared", "per_head"])
def test_checkpointed_block_gives_the_same_gradients(backend, flavour, diag, rng):
    block = random_block(rng, diag)
    x = torch.randn(2, 37, 24, generator=rng)  # 37 rows: not a multiple of any tile
    dy = torch.randn(2, 37, 24, generator=rng)
    if flavour == "fsdp2_composable":
        checkpointed = composable_checkpoint(copy.deepcopy(block))
        run = lambda module, inputs: module(inputs)  # noqa: E731
    else:
        checkpointed, run = block, FLAVOURS[flavour]

    context = cuda_emulation if backend == "cuda_emulated" else contextlib.nullcontext
    with context() as emulated:
        expected = gradients(block, x, dy, lambda module, inputs: module(inputs))
        block.zero_grad(set_to_none=True)
        got = gradients(checkpointed, x, dy, run)
        if emulated is not None:
            assert emulated.stats()["launches"] > 0, "the CUDA kernels did not run"

    assert set(got) == set(expected)
    for name in expected:
        assert expected[name].abs().max() > 0, f"{name}: a zero gradient proves nothing"
        assert relative_error(got[name], expected[name]) < 1e-6, name
