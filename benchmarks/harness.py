"""One setup factory for the speed and memory benchmarks and the demo: configurations, the
implementations compared side by side, FLOP and byte counts, and the machine's identity.

Implementations of one CEM attention call (cem-math.md section 2):
  reference  cem_ops.reference.attention: dense PyTorch, O(N^2) memory, autograd backward
  stock      the composition of stock PyTorch a user would write: SDPA per step (for a
             diagonal, SDPA on augmented heads [q, lambda*x] . [k, c] of width Dh + D), eager
  stock_compiled  the same function through torch.compile (default mode, static shapes, compiled
             afresh for every configuration); the report compares ours with the faster of the two
  ours       cem_ops.attention: the compiled kernels of the device (or the reference fallback)
  llama      a Llama attention layer at the same B, N, D, H (untied Q, K, V, O, RoPE, SDPA
             causal): the cost yardstick, independent of T and the diagonal

FLOP convention (useful FLOPs, 2 per multiply-add, causal half of the scores, diagonal terms
included; see cem_ops.testing.attention_flops): forward as counted there; forward+backward is
3x forward (every product is differentiated with respect to both operands; recomputation is
not useful work and is not counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import cem_ops
from cem_ops import machine
from cem_ops.nn import LlamaAttention
from cem_ops.testing import AttentionCase, attention_flops, cpu_peak_bytes, llama_attention_flops

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IMPLEMENTATIONS = ("reference", "stock", "stock_compiled", "llama", "ours")
MODES = ("forward", "forward_backward")
BACKWARD_FLOP_FACTOR = 3.0


@dataclass(frozen=True)
class Config:
    batch: int
    seq: int
    dim: int
    heads: int
    head_dim: int
    steps: int
    diag: str
    alibi: bool
    dtype: torch.dtype
    device: str

    @property
    def label(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"B{self.batch}-N{self.seq}-D{self.dim}-H{self.heads}-Dh{self.head_dim}-T{self.steps}-"
                f"{self.diag}-{'alibi' if self.alibi else 'noalibi'}-{dtype}")

    def case(self) -> AttentionCase:
        return AttentionCase(batch=self.batch, seq=self.seq, dim=self.dim, heads=self.heads, head_dim=self.head_dim,
                             steps=self.steps, diag=self.diag, alibi=self.alibi, precond_diag=False,
                             precond_rank=0, dtype=self.dtype, device=self.device)

    def flops(self, impl: str, mode: str) -> float:
        if impl == "llama":
            fwd = llama_attention_flops(self.batch, self.seq, self.dim, self.heads, self.head_dim)
        else:
            fwd = attention_flops(self.batch, self.seq, self.dim, self.heads, self.head_dim, self.steps, self.diag)
        return fwd * (BACKWARD_FLOP_FACTOR if mode == "forward_backward" else 1.0)

    def min_bytes(self, mode: str) -> float:
        """Fewest bytes a fused call moves: x and the weights read, the output written (twice
        as much again for the backward: dY read, dx written, weights' gradients written)."""
        size = torch.empty(0, dtype=self.dtype).element_size()
        tokens = self.batch * self.seq * self.dim
        weights = 2 * self.heads * self.head_dim * self.dim + self.dim
        fwd = size * (2 * tokens + weights)
        return fwd * (2 if mode == "forward_backward" else 1)

    def reference_bytes(self) -> float:
        """Rough size of the dense reference's score tensors (to skip sizes that cannot fit)."""
        return 4.0 * self.batch * self.heads * self.seq * self.seq * 4 * self.steps


def cuda_grid(quick: bool = False) -> list[Config]:
    """bf16, ALiBi, B * N = 32k tokens; quick: the target model (D 1024, H 8, Dh 128) at 2k and 8k."""
    grid = []
    seqs = (2048, 8192) if quick else (1024, 2048, 4096, 8192, 16384)
    models = ((1024, 8, 128),) if quick else ((768, 12, 64), (1024, 8, 128), (2048, 16, 128))
    for seq in seqs:
        for dim, heads, head_dim in models:
            for steps in (1, 2):
                for diag in ("none", "shared"):
                    grid.append(Config(max(1, 32768 // seq), seq, dim, heads, head_dim, steps, diag, True,
                                       torch.bfloat16, "cuda"))
    return grid


def cpu_grid(quick: bool = False) -> list[Config]:
    """float32, B = 1, D = 256, H = 4; quick: N = 512 only."""
    seqs = (512,) if quick else (512, 2048, 8192)
    return [Config(1, seq, 256, 4, 64, steps, diag, True, torch.float32, "cpu")
            for seq in seqs for steps in (1, 2) for diag in ("none", "shared")]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _stock_core(q, k, context, x, diag, bias, scale):
    """G for one step from stock SDPA; a diagonal rides along as extra head width."""
    attend = torch.nn.functional.scaled_dot_product_attention
    if diag is None:
        o = attend(q, k, k, attn_mask=bias, is_causal=bias is None, scale=scale)
        return o, None
    batch, heads, n, head_dim = q.shape
    lam = diag if diag.dim() == 2 else diag.expand(heads, -1)
    q_aug = torch.cat([q, lam[None, :, None, :] * x[:, None]], -1)
    k_aug = torch.cat([k, context[:, None].expand(batch, heads, n, -1)], -1)
    o_aug = attend(q_aug, k_aug, k_aug, attn_mask=bias, is_causal=bias is None, scale=scale)
    return o_aug[..., :head_dim], (lam[None, :, None, :] * o_aug[..., head_dim:]).sum(1)


def stock_attention(x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale):
    """CEM attention from stock PyTorch ops (no preconditioner: the benchmark grid has none)."""
    n = x.shape[1]
    beta = w_q.shape[1] ** -0.5 if scale is None else scale
    keys = torch.einsum("bnd,hed->bhne", x, w_k)
    bias = None
    if alibi_slopes is not None:
        pos = torch.arange(n, device=x.device)
        distance = (pos[:, None] - pos[None, :]).to(x.dtype)
        bias = (-alibi_slopes[:, None, None] * distance).masked_fill(distance < 0, float("-inf"))
    delta = torch.zeros_like(x, dtype=torch.float32)
    x_t = x
    for t in range(step_size.shape[0]):
        q = torch.einsum("bnd,hed->bhne", x_t, w_q)
        o, diag_value = _stock_core(q, keys, x, x_t, diag, bias, beta)
        g = torch.einsum("bhne,hed->bnd", o, w_q)
        if diag_value is not None:
            g = g + diag_value
        delta = delta + step_size[t] * g.float()
        x_t = (x.float() + delta).to(x.dtype)
    return delta.to(x.dtype)


def make_call(impl: str, config: Config, mode: str, generator: torch.Generator) -> Callable[[], None]:
    """A closure running one call (and its backward in forward_backward mode), synchronized."""
    grad = mode == "forward_backward"
    if impl == "llama":
        torch.manual_seed(generator.initial_seed())
        layer = LlamaAttention(config.dim, config.heads, config.head_dim, position="rope",
                               device=config.device, dtype=config.dtype)
        x = torch.randn(config.batch, config.seq, config.dim, generator=generator).to(config.device, config.dtype)
        x.requires_grad_(grad)

        def fn():
            return layer(x)

        args_requiring_grad = [x, *layer.parameters()]
    else:
        inputs = config.case().make(generator, requires_grad=grad)
        if impl == "reference":
            fn_impl = cem_ops.reference.attention
        elif impl == "stock":
            fn_impl = stock_attention
        elif impl == "stock_compiled":
            # A fresh compile per configuration: dynamo's per-function cache would otherwise
            # hit its recompile limit across the grid and quietly run the eager code.
            torch._dynamo.reset()
            fn_impl = torch.compile(stock_attention, dynamic=False)
        else:
            fn_impl = torch.ops.cem.attention

        def fn():
            return fn_impl(*inputs.args())

        args_requiring_grad = inputs.differentiable()

    grad_out = torch.randn(config.batch, config.seq, config.dim, generator=generator).to(config.device, config.dtype)

    def run():
        if grad:
            out = fn()
            torch.autograd.grad(out, args_requiring_grad, grad_out)
        else:
            with torch.no_grad():
                fn()
        synchronize(config.device)

    return run


def peak_bytes(run: Callable[[], None], device: str) -> int:
    """Peak memory of one call beyond what was allocated before it: the CUDA caching allocator's
    statistics, or on CPU every allocation through the CPU allocator (cem_ops.testing)."""
    if device != "cuda":
        return cpu_peak_bytes(run)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    return torch.cuda.max_memory_allocated() - base


def machine_identity(device: str) -> dict[str, object]:
    return machine.describe(device, ROOT)
