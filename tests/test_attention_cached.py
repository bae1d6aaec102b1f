"""cem::attention_cached (chunked prefill and decoding against a cache) against the float64
reference of the whole sequence, on the CPU kernel, the CUDA path in emulation and a GPU.

Each check draws a fresh sequence per batch row, caches the first n_b positions of row b (lengths
differ per row) and runs the next C positions as the chunk: the result must equal rows
n_b..n_b+C-1 of the full-sequence op. Cache slots at and past a row's length hold NaN, so a
kernel that reads one fails. Low precision is judged by cem_ops.testing's policy.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

import cem_ops
from cem_ops import reference
from cem_ops.testing import (
    TOLERANCES,
    AttentionCase,
    cuda_emulation,
    emulation_available,
    low_precision_agrees,
    relative_error,
)

DIAGS = ("none", "shared", "per_head")
PRECONDS = {"none": (False, 0), "diag": (True, 0), "lowrank": (False, 3), "both": (True, 3)}
OPTIONS = list(itertools.product(DIAGS, (False, True), PRECONDS))  # 24 points, T and C cycle over them


def backend_context(name: str):
    if name == "emulated":
        if not emulation_available():
            pytest.skip("cem_ops was built without the emulated CUDA backend (needs the CUDA headers)")
        return cuda_emulation()
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none is visible)")
    return contextlib.nullcontext()


BACKENDS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("emulated", marks=pytest.mark.emulation, id="emulated"),
    pytest.param("cuda", marks=pytest.mark.cuda, id="cuda"),
]


def split(inputs, lengths: list[int], chunk: int, dtype: torch.dtype):
    """(op kwargs, the chunk x) in ``dtype`` for rows whose first lengths[b] positions are cached."""
    x = inputs.x
    batch, _, dim = x.shape
    heads, head_dim, _ = inputs.w_q.shape
    capacity = max(lengths) + chunk + 3
    keys = torch.einsum("bnd,hed->bnhe", x, inputs.w_k)
    cache_keys = torch.full((batch, capacity, heads, head_dim), float("nan"), dtype=x.dtype, device=x.device)
    cache_context = torch.full((batch, capacity, dim), float("nan"), dtype=x.dtype, device=x.device)
    for b, n in enumerate(lengths):
        cache_keys[b, :n], cache_context[b, :n] = keys[b, :n], x[b, :n]
    x_chunk = torch.stack([x[b, n:n + chunk] for b, n in enumerate(lengths)])

    def cast(t):
        return None if t is None else t.to(dtype)

    kwargs = dict(
        cache_keys=cache_keys.to(dtype), cache_context=cache_context.to(dtype) if inputs.diag is not None else None,
        cache_lengths=torch.tensor(lengths), diag=cast(inputs.diag), alibi_slopes=cast(inputs.alibi_slopes),
        precond_diag=cast(inputs.precond_diag), precond_lowrank=cast(inputs.precond_lowrank),
        step_size=inputs.step_size.to(dtype), scale=inputs.scale,
    )
    return x_chunk.to(dtype), kwargs


def chunk_rows(full, lengths: list[int], chunk: int):
    return torch.stack([full[b, n:n + chunk] for b, n in enumerate(lengths)])


def check_against_full(backend: str, case: AttentionCase, lengths: list[int], chunk: int, rng, record_error):
    context = backend_context(backend)  # skips before any tensor moves to a missing device
    inputs64 = case.with_(batch=len(lengths), seq=max(lengths) + chunk, dtype=torch.float64, device="cpu").make(rng)
    exact = chunk_rows(reference.attention(*inputs64.args()), lengths, chunk)
    device = "cuda" if backend == "cuda" else "cpu"
    inputs = inputs64.to(torch.float64)
    x_chunk, kwargs = split(inputs, lengths, chunk, case.dtype)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) and k != "cache_lengths" else v for k, v in kwargs.items()}
    with context:
        out, keys = cem_ops.attention_cached(x_chunk.to(device), inputs.w_q.to(case.dtype).to(device),
                                             inputs.w_k.to(case.dtype).to(device), **kwargs)
    assert out.dtype == case.dtype and out.shape == x_chunk.shape
    want_keys = torch.einsum("bcd,hed->bche", chunk_rows(inputs64.x, lengths, chunk), inputs64.w_k)
    error = record_error(f"attention_cached {case.dtype}", relative_error(out.cpu(), exact))
    if case.dtype in (torch.float64, torch.float32):
        assert error < TOLERANCES[case.dtype], error
        assert relative_error(keys.cpu(), want_keys) < TOLERANCES[case.dtype]
    else:
        rounded = inputs64.to(case.dtype)
        same_precision = chunk_rows(reference.attention(*rounded.args()), lengths, chunk)
        assert low_precision_agrees(out.cpu(), exact, same_precision, case.dtype), error
        assert relative_error(keys.cpu(), want_keys) < TOLERANCES[case.dtype]


def option_case(index: int, dtype: torch.dtype) -> tuple[AttentionCase, int]:
    diag, alibi, precond = OPTIONS[index]
    use_p, rank = PRECONDS[precond]
    steps = 1 + index % 4
    chunk = (1, 3, 7)[index % 3]
    return AttentionCase(dim=20, heads=3, head_dim=7, steps=steps, diag=diag, alibi=alibi, precond_diag=use_p,
                         precond_rank=rank, dtype=dtype), chunk


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("index", range(len(OPTIONS)),
                         ids=[f"{d}-alibi{int(a)}-{p}" for d, a, p in OPTIONS])
def test_chunk_equals_rows_of_the_full_sequence(backend, dtype, index, rng, record_error):
    if backend != "cpu" and dtype == torch.float64 and index % 6:
        pytest.skip("float64 runs the reference on the CUDA path: a few points suffice")
    case, chunk = option_case(index, dtype)
    lengths = [int(n) for n in torch.randint(0, 19, (3,), generator=rng)]
    lengths[index % 3] = 0  # an empty cache: the chunk is the whole context
    check_against_full(backend, case, lengths, chunk, rng, record_error)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 9, 20])
@pytest.mark.parametrize("diag", DIAGS)
def test_long_contexts_span_many_partitions_and_tiles(backend, chunk, diag, rng, record_error):
    """Contexts of a few hundred keys over 4 x 8 (batch, head) pairs: on a 108-SM device (the
    emulated one) chunks of 9 and 20 rows get 2 and 3 row blocks and partitions of two 32-key
    tiles, so the online softmax rescales within a partition and the combine merges several."""
    case = AttentionCase(dim=24, heads=8, head_dim=8, steps=2, diag=diag, alibi=True, precond_diag=True,
                         precond_rank=2, dtype=torch.float32)
    check_against_full(backend, case, [301, 77, 0, 150], chunk, rng, record_error)


def small_args(diag: bool = False, capacity: int = 9, lengths=(2, 4), chunk: int = 2, **changes):
    x = torch.randn(2, chunk, 8)
    kwargs = dict(cache_keys=torch.randn(2, capacity, 2, 4), cache_context=torch.randn(2, capacity, 8) if diag else None,
                  cache_lengths=torch.tensor(lengths), diag=torch.randn(8) if diag else None,
                  step_size=torch.ones(2))
    kwargs.update(changes)
    return (x, torch.randn(2, 4, 8), torch.randn(2, 4, 8)), kwargs


@pytest.mark.parametrize("changes, error, match", [
    (dict(cache_keys=torch.randn(2, 9, 3, 4)), ValueError, "cache_keys must have shape"),
    (dict(cache_keys=torch.randn(2, 9, 2, 4, dtype=torch.float64)), TypeError, "cache_keys must have the dtype"),
    (dict(cache_context=torch.randn(2, 9, 8)), ValueError, "cache_context must be None without a diagonal"),
    (dict(cache_lengths=torch.tensor([2, 8])), ValueError, r"cache_lengths\[1\] = 8 is out of range"),
    (dict(cache_lengths=torch.tensor([-1, 0])), ValueError, r"cache_lengths\[0\] = -1 is out of range"),
    (dict(cache_lengths=torch.tensor([2, 4], dtype=torch.int32)), TypeError, "cache_lengths must be int64"),
    (dict(cache_lengths=torch.tensor([2, 4, 1])), ValueError, r"cache_lengths must have shape \(B,\)"),
    (dict(cache_keys=torch.randn(2, 1, 2, 4)), ValueError, "does not fit a cache of capacity 1"),
])
def test_bad_input_names_the_argument(changes, error, match):
    args, kwargs = small_args(**changes)
    with pytest.raises(error, match=match):
        cem_ops.attention_cached(*args, **kwargs)


def test_a_diagonal_needs_the_cached_context():
    args, kwargs = small_args(diag=True, cache_context=None)
    with pytest.raises(ValueError, match="cache_context .* is needed with a diagonal"):
        cem_ops.attention_cached(*args, **kwargs)
    args, kwargs = small_args(diag=True, cache_context=torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match="cache_context must have shape"):
        cem_ops.attention_cached(*args, **kwargs)


def test_backward_is_refused_with_a_reason():
    args, kwargs = small_args()
    x = args[0].requires_grad_()
    out, _ = cem_ops.attention_cached(x, *args[1:], **kwargs)
    with pytest.raises(NotImplementedError, match="no backward pass"):
        out.sum().backward()


def test_fake_implementation_and_schema():
    args, kwargs = small_args(diag=True)
    op_args = (*args, kwargs["cache_keys"], kwargs["cache_context"], kwargs["cache_lengths"], kwargs["diag"], None,
               None, None, kwargs["step_size"], None)
    torch.library.opcheck(torch.ops.cem.attention_cached.default, op_args,
                          test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        x = torch.empty(2, 2, 8)
        with pytest.raises(ValueError, match="cache_keys must have shape"):
            torch.ops.cem.attention_cached(x, torch.empty(2, 4, 8), torch.empty(2, 4, 8), torch.empty(2, 9, 3, 4), None,
                                           torch.zeros(2, dtype=torch.int64), None, None, None, None, torch.ones(1))


def test_compiles_without_graph_breaks():
    args, kwargs = small_args(diag=True)
    eager = cem_ops.attention_cached(*args, **kwargs)
    compiled = torch.compile(lambda *a: cem_ops.attention_cached(*a, **kwargs), fullgraph=True)(*args)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want)


@pytest.mark.cuda
def test_out_of_range_device_lengths_give_nan_rows():
    """Lengths on the GPU are not read by the host (no sync): a bad one poisons its row."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none is visible)")
    args, kwargs = small_args()
    args = tuple(a.cuda() for a in args)
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    kwargs["cache_lengths"] = torch.tensor([2, 8], device="cuda")
    out, _ = cem_ops.attention_cached(*args, **kwargs)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_narrowed_view_of_a_larger_cache_is_read_in_place(backend, rng):
    """Modules pass their storage narrowed to the positions in use: rows a stride apart."""
    context = backend_context(backend)
    device = "cuda" if backend == "cuda" else "cpu"
    args, kwargs = small_args(diag=True, capacity=9, lengths=(3, 5))
    storage = {name: torch.randn(2, 40, *kwargs[name].shape[2:], generator=rng) for name in ("cache_keys", "cache_context")}
    for name, t in storage.items():
        t[:, :9] = kwargs[name]
    narrowed = {name: t[:, :9] for name, t in storage.items()}
    move = lambda d: {k: v.to(device) if isinstance(v, torch.Tensor) and k != "cache_lengths" else v for k, v in d.items()}
    with context:
        want = cem_ops.attention_cached(*(a.to(device) for a in args), **move(kwargs))
        got = cem_ops.attention_cached(*(a.to(device) for a in args), **move(kwargs | narrowed))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_lengths_on_another_device_are_refused():
    """A meta lengths tensor sends the call to the fake implementation: it must refuse too."""
    args, kwargs = small_args()
    with pytest.raises(ValueError, match="cache_lengths must be on the device of x"):
        cem_ops.attention_cached(*args, **(kwargs | dict(cache_lengths=torch.tensor([2, 4], device="meta"))))
