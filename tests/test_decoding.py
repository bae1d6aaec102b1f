"""Module caches: CEMAttention, CEMBlock, LlamaAttention and LlamaBlock fed a prefill chunk and
then one token at a time (or ragged prompts row by row) reproduce the full-sequence forward; the
caches report their bytes per token and refuse what does not fit."""

from __future__ import annotations

import itertools

import pytest
import torch

from cem_ops.nn import AttentionCache, CEMAttention, CEMBlock, KVCache, LlamaAttention, LlamaBlock
from cem_ops.testing import TOLERANCES, cuda_emulation, emulation_available, low_precision_agrees, relative_error

DIAGS = ("none", "shared", "per_head")


def randomize(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Move every parameter off its init (the diagonal starts at zero) so every term counts."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
            if p.dim() == 1 and p.shape[0] <= 4:  # step sizes: keep them positive and moderate
                p.abs_().clamp_(0.2, 1.0)
    return module


def incremental(module, x: torch.Tensor, prefill: int, capacity: int | None = None, chunk: int = 4) -> torch.Tensor:
    """Prefill ``prefill`` positions (into the empty cache), a second chunk of ``chunk`` against
    them, then the rest one position at a time."""
    cache = module.new_cache(x.shape[0], capacity or x.shape[1])
    outs = [module(x[:, :prefill], cache=cache), module(x[:, prefill:prefill + chunk], cache=cache)]
    outs += [module(x[:, i:i + 1], cache=cache) for i in range(prefill + chunk, x.shape[1])]
    assert cache.lengths.tolist() == [x.shape[1]] * x.shape[0]
    return torch.cat(outs, dim=1)


def cem_attention(diag: str, steps: int, alibi: bool, precond: str, dtype, rng) -> CEMAttention:
    return randomize(CEMAttention(24, 3, steps=steps, diag=diag, alibi=alibi, precond=precond, dtype=dtype), rng)


@pytest.mark.parametrize("diag, steps, alibi, precond", [
    (d, t, a, p) for (d, a, p), t in zip(itertools.product(DIAGS, (False, True), ("none", "diag_lowrank")),
                                         itertools.cycle((1, 2, 3, 4)))
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_cem_attention_prefill_then_tokens_equals_full_forward(diag, steps, alibi, precond, dtype, rng):
    module = cem_attention(diag, steps, alibi, precond, dtype, rng)
    x = torch.randn(2, 19, 24, generator=rng, dtype=dtype)
    with torch.no_grad():
        full = module(x)
        got = incremental(module, x, prefill=7, capacity=23)
    assert relative_error(got, full) < TOLERANCES[dtype]


@pytest.mark.emulation
@pytest.mark.parametrize("diag", DIAGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cem_attention_cache_on_the_cuda_path_in_emulation(diag, dtype, rng):
    if not emulation_available():
        pytest.skip("cem_ops was built without the emulated CUDA backend (needs the CUDA headers)")
    module = cem_attention(diag, 2, True, "diag_lowrank", torch.float64, rng)
    x = torch.randn(2, 21, 24, generator=rng, dtype=torch.float64)
    with torch.no_grad():
        exact = module(x)
        module = module.to(dtype)
        with cuda_emulation():
            got = incremental(module, x.to(dtype), prefill=9)
            same_precision = module(x.to(dtype))  # the training kernels on the whole sequence
    if dtype == torch.float32:
        assert relative_error(got, exact) < TOLERANCES[dtype]
    else:
        assert low_precision_agrees(got, exact, same_precision, dtype), relative_error(got, exact)


@pytest.mark.parametrize("diag", DIAGS)
def test_cem_block_cache_and_ragged_prompts(diag, rng):
    """Row 0 prefills 4 positions and row 1 prefills 11 through row views of one cache; then both
    decode together. Each row must equal the full forward of its own sequence."""
    block = randomize(CEMBlock(24, 3, attention_kwargs=dict(steps=2, diag=diag), dtype=torch.float64), rng)
    x = torch.randn(2, 16, 24, generator=rng, dtype=torch.float64)
    prompts, decode = (4, 11), 5
    with torch.no_grad():
        cache = block.new_cache(2, 16)
        firsts = [block(x[b:b + 1, :n], cache=cache.rows(b)) for b, n in enumerate(prompts)]
        assert cache.lengths.tolist() == list(prompts)
        steps = []
        for i in range(decode):
            chunk = torch.stack([x[b, n + i] for b, n in enumerate(prompts)])[:, None]
            steps.append(block(chunk, cache=cache))
        for b, n in enumerate(prompts):
            full = block(x[b:b + 1, :n + decode])
            got = torch.cat([firsts[b]] + [s[b:b + 1] for s in steps], dim=1)
            assert relative_error(got, full) < TOLERANCES[torch.float64]


@pytest.mark.parametrize("position", ["rope", "alibi", "none"])
def test_llama_kv_cache_equals_full_forward(position, rng):
    block = LlamaBlock(24, 3, position=position, dtype=torch.float64)
    x = torch.randn(3, 17, 24, generator=rng, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(incremental(block, x, prefill=5, capacity=20), block(x)) < TOLERANCES[torch.float64]


@pytest.mark.parametrize("diag, per_token", [("none", 1), ("shared", 2), ("per_head", 2)])
def test_bytes_per_token_against_llama(diag, per_token):
    """V = K: without a diagonal CEM keeps H Dh = D numbers per token, half of Llama's 2 D; the
    diagonal's scores also need the context (D more)."""
    dim, heads = 64, 4
    for dtype in (torch.float32, torch.bfloat16):
        cem = CEMAttention(dim, heads, diag=diag, dtype=dtype).new_cache(2, 10)
        llama = LlamaAttention(dim, heads, dtype=dtype).new_cache(2, 10)
        elem = torch.tensor([], dtype=dtype).element_size()
        assert cem.bytes_per_token == per_token * dim * elem
        assert llama.bytes_per_token == 2 * dim * elem
        assert cem.nbytes == 2 * 10 * cem.bytes_per_token
        assert cem.keys.dtype == dtype and isinstance(cem, AttentionCache) and isinstance(llama, KVCache)


@pytest.mark.parametrize("module", [CEMAttention(16, 2), LlamaAttention(16, 2)], ids=["cem", "llama"])
def test_cache_refuses_what_does_not_fit(module):
    cache = module.new_cache(2, 6)
    with torch.no_grad():
        module(torch.randn(2, 4, 16), cache=cache)
        with pytest.raises(ValueError, match="exceeds the cache's capacity of 6"):
            module(torch.randn(2, 3, 16), cache=cache)
        assert cache.lengths.tolist() == [4, 4]  # a refused chunk leaves the cache as it was
        with pytest.raises(ValueError, match="batch size 3 but the cache holds 2 rows"):
            module(torch.randn(3, 1, 16), cache=cache)
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        module.new_cache(2, 0)
    with pytest.raises(IndexError, match="row 2 is out of range"):
        cache.rows(2)


def test_cem_cache_checks_its_owner_and_dtype():
    module = CEMAttention(16, 2, diag="shared")
    with torch.no_grad():
        with pytest.raises(ValueError, match="not made by this module"):
            module(torch.randn(1, 1, 16), cache=CEMAttention(16, 2, diag="none").new_cache(1, 4))
        with pytest.raises(ValueError, match="must have the cache's dtype"):
            module(torch.randn(1, 1, 16, dtype=torch.float64), cache=module.new_cache(1, 4))
        with pytest.raises(TypeError, match="AttentionCache"):
            module(torch.randn(1, 1, 16), cache=LlamaAttention(16, 2).new_cache(1, 4))


def test_reset_starts_over():
    module = CEMAttention(16, 2)
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        cache = module.new_cache(1, 5)
        first = module(x, cache=cache)
        cache.reset()
        assert torch.equal(module(x, cache=cache), first)


def test_llama_cache_checks_its_input_and_survives_stale_non_finite_slots(rng):
    module = LlamaAttention(16, 2, dtype=torch.float16)
    with torch.no_grad():
        cache = module.new_cache(2, 8)
        module(torch.full((2, 6, 16), 6e4, dtype=torch.float16), cache=cache)  # overflows: inf/nan cached
        cache.reset()  # zeroes the storage: SDPA's -inf mask still multiplies the unused slots by 0
        for b, n in enumerate((4, 2)):
            module(torch.randn(1, n, 16, generator=rng).half(), cache=cache.rows(b))
        assert torch.isfinite(module(torch.randn(2, 1, 16, generator=rng).half(), cache=cache)).all()
        with pytest.raises(ValueError, match="must have the cache's dtype"):
            module(torch.randn(2, 1, 16), cache=cache)
        with pytest.raises(ValueError, match="not made by this module"):
            module(torch.randn(2, 1, 16).half(), cache=LlamaAttention(16, 4, dtype=torch.float16).new_cache(2, 8))
        assert cache.lengths.tolist() == [5, 3]  # refused calls wrote nothing
        assert module(torch.randn(2, 0, 16).half(), cache=cache).shape == (2, 0, 16)


@pytest.mark.parametrize("module", [CEMAttention(16, 2, diag="shared"), LlamaAttention(16, 2)], ids=["cem", "llama"])
def test_decoding_under_grad_mode_keeps_no_graph(module):
    """Weights that require gradients do not tie the cache into an autograd graph."""
    cache = module.new_cache(1, 6)
    for i in range(3):
        module(torch.randn(1, 2, 16), cache=cache)
    assert cache.keys.grad_fn is None and not cache.keys.requires_grad


def test_new_cache_takes_int_like_sizes():
    import numpy as np

    cache = CEMAttention(16, 2).new_cache(np.int64(2), torch.tensor(5))
    assert (cache.batch_size, cache.capacity) == (2, 5)
