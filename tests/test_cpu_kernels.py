"""The compiled CPU kernels (csrc/cpu/) against the float64 reference (cem_ops.reference).

Every test draws fresh random inputs (replayable with the seed printed on failure). A kernel is
judged by the relative error ||got - want|| / ||want|| against the reference run in float64 on
the same (rounded) inputs. Lower precisions pass when they agree with the reference run in that
dtype or are as close to float64 as a multiple of its own error (low_precision_agrees in
cem_ops.testing, where the tolerances live): the precision rule (iterates and saved state
rounded to the input dtype, docs/backward.md) costs the reference exactly as much, and
ill-conditioned sums such as d(step_size) amplify it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

import cem_ops
from cem_ops import reference
from cem_ops.ops.backends import has_compiled_kernel
from cem_ops.testing import (
    TOLERANCES,
    AttentionCase,
    MLPCase,
    assert_matches_reference,
    cpu_peak_bytes,
    low_precision_agrees,
    relative_error,
)

OPS = torch.ops.cem
LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)
FORWARD_NAMES = ("out", "iterates", "head_outputs", "diag_values", "lse")
ATTENTION_GRAD_NAMES = ("x", "w_q", "w_k", "diag", "precond_diag", "precond_lowrank", "step_size")
MLP_FORWARD_NAMES = ("out", "iterates", "neg_grads")
MLP_GRAD_NAMES = ("x", "w", "v", "precond_diag", "precond_lowrank", "step_size")
PRECOND = {"none": (False, False), "diag": (True, False), "lowrank": (False, True), "both": (True, True)}


@pytest.fixture(autouse=True)
def _compiled_cpu_kernels():
    """Without compiled CPU kernels these tests would compare the reference with itself."""
    ops = ("attention_fwd", "attention_bwd", "mlp_fwd", "mlp_bwd")
    missing = [op for op in ops if not has_compiled_kernel(op, "CPU")]
    assert not missing, f"no compiled CPU kernel for {missing}: rebuild with CEM_OPS_CUDA=0 (see README)"
    assert all(v["CPU"] == "compiled" for v in cem_ops.build_info()["kernels"].values())


@contextmanager
def env(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def one_thread():
    """The reference runs many tiny ops; on a busy 2-core machine their thread barriers cost
    more than the work, so it runs single-threaded. The kernels keep the default threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return relative_error(got, want)


def check_close(name, got, want, dtype, low_precision_ref=None):
    """got vs the float64 reference `want`; low_precision_ref is the reference in `dtype`."""
    if want is None:
        assert got is None, f"{name}: expected None"
        return 0.0
    if want.numel() == 0:
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        return 0.0
    err = rel_err(got, want)
    if low_precision_ref is None:
        assert err <= TOLERANCES[dtype], f"{name}: relative error {err:.3e} > {TOLERANCES[dtype]:.3e} ({dtype})"
    else:
        assert low_precision_agrees(got, want, low_precision_ref, dtype), (
            f"{name}: relative error {err:.3e} against float64, {rel_err(got, low_precision_ref):.3e} against the "
            f"{dtype} reference (whose own error is {rel_err(low_precision_ref, want):.3e})"
        )
    return err


# ---------------------------------------------------------------------------------- attention


def attn_case(*, precond: str = "both", rank: int = 3, **fields) -> AttentionCase:
    """This file's attention case: N = 67 crosses a 64-row tile, the widths fill no vector, and
    the preconditioner is named (none, diag, lowrank or both)."""
    use_p, use_u = PRECOND[precond]
    defaults = dict(batch=2, seq=67, dim=12, heads=3, head_dim=5, steps=2, diag="shared", alibi=True)
    return AttentionCase(**{**defaults, **fields}, precond_diag=use_p, precond_rank=rank if use_u else 0)


def attention_inputs(case: AttentionCase, dtype: torch.dtype) -> list:
    """Fresh random inputs in schema order without scale, in dtype."""
    return list(case.with_(dtype=dtype).make().args()[:-1])


def as_f64(args):
    return [None if a is None else a.double() for a in args]


def forward_backward(forward, backward, args, option, grad_out):
    """forward(*args, option, save=True), then backward(grad_out, *args, option, *saved state)."""
    fwd = forward(*args, option, True)
    return tuple(fwd), tuple(backward(grad_out, *args, option, *fwd[1:]))


def reference_attention(args, scale, grad_out):
    with one_thread():
        return forward_backward(reference.attention_forward, reference.attention_backward, args, scale, grad_out)


def kernel_attention(args, scale, grad_out):
    return forward_backward(OPS.attention_fwd, OPS.attention_bwd, args, scale, grad_out)


def run_both(reference_fn, kernel_fn, args, option, shape, dtype):
    """((fwd, grads) of the kernels, of the float64 reference, of the reference at dtype or
    (None, None)) for one fresh upstream gradient."""
    grad_out = torch.randn(*shape, dtype=torch.float64).to(dtype)
    want = reference_fn(as_f64(args), option, grad_out.double())
    got = kernel_fn(args, option, grad_out)
    low = reference_fn(args, option, grad_out) if dtype in LOW_PRECISION else (None, None)
    return got, want, low


def check_attention(case: AttentionCase, dtype: torch.dtype = torch.float64):
    args = attention_inputs(case, dtype)
    shape = (case.batch, case.seq, case.dim)
    (got_fwd, got_grads), (want_fwd, want_grads), (low_fwd, low_grads) = run_both(
        reference_attention, kernel_attention, args, case.scale, shape, dtype
    )
    errors = {}
    for i, name in enumerate(FORWARD_NAMES):
        got = got_fwd[i]
        expected_dtype = torch.float64 if dtype == torch.float64 else (torch.float32 if name == "lse" else dtype)
        assert got.dtype == expected_dtype and got.is_contiguous(), (name, got.dtype)
        errors[name] = check_close(name, got, want_fwd[i], dtype, None if low_fwd is None else low_fwd[i])
    for i, name in enumerate(ATTENTION_GRAD_NAMES):
        got = got_grads[i]
        if got is not None:
            assert got.dtype == dtype, (name, got.dtype)
        errors["d_" + name] = check_close(name, got, want_grads[i], dtype, None if low_grads is None else low_grads[i])
    return errors


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("precond", list(PRECOND))
@pytest.mark.parametrize("alibi", [False, True], ids=["no_alibi", "alibi"])
@pytest.mark.parametrize("diag", ["none", "shared", "per_head"])
def test_attention_options_float64(diag, alibi, precond, steps):
    check_attention(attn_case(seq=67, diag=diag, alibi=alibi, precond=precond, steps=steps))


# (B, N, D, H, Dh, R): N around the 64-wide tiles, widths that fill no vector evenly.
SHAPES = [
    (2, 1, 12, 3, 5, 2),
    (1, 7, 9, 2, 11, 1),
    (2, 64, 16, 2, 8, 2),
    (1, 65, 13, 3, 7, 3),
    (1, 130, 24, 4, 6, 5),
    (3, 129, 17, 1, 19, 2),
    (1, 200, 1, 1, 1, 1),
]


@pytest.mark.parametrize("diag", ["none", "shared", "per_head"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}N{}D{}H{}Dh{}R{}".format(*s))
def test_attention_shapes_float64(shape, diag):
    b, n, d, h, e, r = shape
    check_attention(attn_case(batch=b, seq=n, dim=d, heads=h, head_dim=e, rank=r, diag=diag, steps=3))


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0])
def test_attention_explicit_scale(scale):
    check_attention(attn_case(seq=70, scale=scale, diag="per_head"))


@pytest.mark.parametrize("seq", [7, 130])
@pytest.mark.parametrize("diag", ["none", "shared", "per_head"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_attention_low_precision(dtype, diag, seq):
    errors = check_attention(attn_case(seq=seq, dim=24, heads=3, head_dim=8, diag=diag, steps=3), dtype)
    # The forward output and the saved state meet the plain bound, without the fairness margin.
    for name in ("out", "iterates", "head_outputs", "diag_values", "lse"):
        assert errors[name] <= TOLERANCES[dtype], (name, errors[name])


def test_attention_wide_model_float32_keeps_long_sums_accurate(rng, record_error):
    """D = 4096 with 32 heads of 128 and a shared diagonal: the diagonal value term sums over
    32 heads, so the second step's scores reach several hundred and the D-long score sums must
    lose no more to rounding than the reference's matmuls do. One running float32 sum per score
    left the lse 3.5-9x further from float64 than the float32 reference; chunked sums, 0.6-1.4x."""
    case = AttentionCase(batch=1, seq=67, dim=4096, heads=32, head_dim=128, steps=2, diag="shared", alibi=True,
                         precond_diag=True, precond_rank=8)
    inputs = case.make(rng)
    lse = OPS.attention_fwd(*inputs.args(), True)[4].double()
    own_lse = reference.attention_forward(*inputs.args()).lse.double()
    exact_lse = reference.attention_forward(*inputs.to(torch.float64).args()).lse
    err, own = (lse - exact_lse).abs().max().item(), (own_lse - exact_lse).abs().max().item()
    assert err < 3 * own, f"lse error {err:.2e} against float64; the float32 reference's own: {own:.2e}"
    assert_matches_reference("attention", OPS.attention, inputs, rng, record_error)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("diag", ["none", "shared", "per_head"])
def test_attention_instruction_sets(isa, diag):
    if isa != "generic" and not _cpu_has(isa):
        pytest.skip(f"this CPU has no {isa} (+ FMA)")
    with env(CEM_OPS_CPU_ISA=isa):
        check_attention(attn_case(seq=130, diag=diag), torch.float64)
        check_attention(attn_case(seq=130, diag=diag), torch.float32)
        # 12-row micro-kernels (AVX-512) and their 1..11-row tails: heights around the blocking.
        check_attention(attn_case(seq=37, diag=diag, dim=40, head_dim=29), torch.float32)


def _cpu_has(isa: str) -> bool:
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    return {"avx2": {"avx2", "fma"}, "avx512": {"avx512f", "fma"}}[isa] <= flags


def test_attention_unknown_instruction_set_is_an_error():
    args = attention_inputs(attn_case(seq=5), torch.float32)
    with env(CEM_OPS_CPU_ISA="sse9"), pytest.raises(RuntimeError, match="CEM_OPS_CPU_ISA"):
        OPS.attention_fwd(*args, None, True)


@pytest.mark.parametrize("diag", ["shared", "per_head"])
def test_attention_strips_off_gives_the_same_bits(diag):
    """Pass 2 reads pass 1's strips or recomputes: both must give identical results."""
    case = attn_case(batch=2, seq=150, diag=diag, steps=2)
    args = attention_inputs(case, torch.float32)
    grad_out = torch.randn(case.batch, case.seq, case.dim)
    with_strips = kernel_attention(args, None, grad_out)
    with env(CEM_OPS_CPU_STRIP_MB=0):
        without = kernel_attention(args, None, grad_out)
    for got, want in zip(without[0] + without[1], with_strips[0] + with_strips[1]):
        if want is not None:
            assert torch.equal(got, want)
    with env(CEM_OPS_CPU_STRIP_MB=0):
        check_attention(case, torch.float64)


def test_attention_thread_count_does_not_change_results():
    """Key-side sums are per chunk of work and added up after; any split must agree."""
    case = attn_case(batch=3, seq=200, diag="shared", steps=2)
    args = attention_inputs(case, torch.float64)
    grad_out = torch.randn(case.batch, case.seq, case.dim, dtype=torch.float64)
    threads = torch.get_num_threads()
    results = {}
    for n in sorted({1, 2, 3, threads}):
        torch.set_num_threads(n)
        try:
            results[n] = kernel_attention(args, None, grad_out)
        finally:
            torch.set_num_threads(threads)
    first = results[1]
    for fwd, grads in results.values():
        for got, want in zip(fwd + grads, first[0] + first[1]):
            if want is not None and want.numel():
                assert rel_err(got, want) < 1e-13


def test_attention_noncontiguous_inputs():
    case = attn_case(batch=2, seq=70, dim=12, heads=3, head_dim=5, diag="per_head", steps=2)
    args = attention_inputs(case, torch.float32)
    x, w_q, w_k, diag, slopes, p, u, eta = args
    strided = [
        x.transpose(0, 1).contiguous().transpose(0, 1),  # (B, N, D) with batch stride D
        w_q.permute(2, 0, 1).contiguous().permute(1, 2, 0),
        torch.stack([w_k, w_k], -1)[..., 1],
        diag.t().contiguous().t(),
        torch.stack([slopes, slopes], 1)[:, 0],
        torch.stack([p, p], 1)[:, 0],
        u.t().contiguous().t(),
        torch.stack([eta, eta], 1)[:, 1],
    ]
    assert not any(t.is_contiguous() for t in (strided[0], strided[1], strided[2], strided[3], strided[6]))
    grad_out = torch.randn(case.batch, case.seq, case.dim)
    dense = kernel_attention(args, None, grad_out)
    got = kernel_attention(strided, None, grad_out.transpose(0, 1).contiguous().transpose(0, 1))
    for a, b in zip(got[0] + got[1], dense[0] + dense[1]):
        if b is not None:
            assert torch.equal(a, b)
    want_fwd, want_grads = reference_attention(as_f64(args), None, grad_out.double())
    assert rel_err(got[0][0], want_fwd[0]) < 1e-5
    assert rel_err(got[1][0], want_grads[0]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("diag", ["none", "shared", "per_head"])
def test_attention_public_op_autograd(diag, dtype):
    """cem_ops.attention -> attention_fwd/attention_bwd on CPU, against autograd through the reference."""
    case = attn_case(batch=2, seq=75, diag=diag, steps=3)
    args = attention_inputs(case, dtype)
    names = ["x", "w_q", "w_k", "diag", "alibi_slopes", "precond_diag", "precond_lowrank", "step_size"]
    leaves = [None if a is None else a.clone().requires_grad_(name != "alibi_slopes") for a, name in zip(args, names)]
    ref_leaves = [None if a is None else a.detach().double().requires_grad_(a.requires_grad) for a in leaves]
    kwargs = dict(zip(names[3:], leaves[3:]))
    out = cem_ops.attention(*leaves[:3], **kwargs)
    out.backward(grad_out := torch.randn(out.shape, dtype=torch.float64).to(dtype))
    with one_thread():
        want = reference.attention(*ref_leaves)
        want.backward(grad_out.double())
    assert rel_err(out, want) <= TOLERANCES[dtype]
    for name, leaf, ref_leaf in zip(names, leaves, ref_leaves):
        if leaf is not None and leaf.requires_grad:
            assert rel_err(leaf.grad, ref_leaf.grad) <= 2 * TOLERANCES[dtype], name


def test_attention_inference_keeps_no_state():
    case = attn_case(seq=40)
    args = attention_inputs(case, torch.float32)
    fwd = OPS.attention_fwd(*args, None, False)
    assert all(t.numel() == 0 for t in fwd[1:])
    want = reference.attention_forward(*as_f64(args), None, False)
    assert rel_err(fwd[0], want.out) < 1e-5
    with torch.no_grad():
        assert rel_err(cem_ops.attention(*args[:3], diag=args[3], step_size=args[7]), reference.attention(
            *as_f64(args[:3]), diag=args[3].double(), step_size=args[7].double())) < 1e-5


@pytest.mark.parametrize("batch,seq", [(0, 5), (2, 0), (0, 0)])
def test_attention_empty(batch, seq):
    case = attn_case(batch=max(batch, 1), seq=max(seq, 1), steps=3)
    args = attention_inputs(case, torch.float32)
    args[0] = args[0][:batch, :seq]
    fwd = OPS.attention_fwd(*args, None, True)
    want = reference.attention_forward(*args, None, True)
    for got, ref in zip(fwd, want):
        assert got.shape == ref.shape and got.dtype == ref.dtype
    grads = OPS.attention_bwd(torch.zeros_like(args[0]), *args, None, *fwd[1:])
    assert grads[0].shape == args[0].shape
    for g, a in zip(grads[1:], [args[1], args[2], args[3], args[5], args[6], args[7]]):
        assert g.shape == a.shape and not g.any()


def test_attention_bad_input_is_a_clear_error():
    args = attention_inputs(attn_case(seq=9), torch.float32)
    bad_wq = list(args)
    bad_wq[1] = args[1][:, :, :-1]
    with pytest.raises(ValueError, match="w_q must have shape"):
        OPS.attention_fwd(*bad_wq, None, True)
    mixed = list(args)
    mixed[3] = args[3].double()
    with pytest.raises(TypeError, match="diag must have the dtype of x"):
        OPS.attention_fwd(*mixed, None, True)
    fwd = OPS.attention_fwd(*args, None, False)  # no saved state
    with pytest.raises(ValueError, match="iterates must have shape"):
        OPS.attention_bwd(torch.zeros_like(args[0]), *args, None, *fwd[1:])


def test_attention_opcheck():
    case = attn_case(batch=2, seq=67, diag="shared", steps=2)
    args = attention_inputs(case, torch.float32)
    torch.library.opcheck(OPS.attention_fwd.default, (*args, None, True))
    trainable = [None if a is None else a.clone().requires_grad_(i != 4) for i, a in enumerate(args)]
    torch.library.opcheck(OPS.attention_fwd.default, (*trainable, 0.4, True))
    fwd = OPS.attention_fwd(*args, None, True)
    torch.library.opcheck(OPS.attention_bwd.default, (torch.randn_like(args[0]), *args, None, *fwd[1:]))
    per_head = attention_inputs(attn_case(diag="per_head", alibi=False, precond="none"), torch.float64)
    torch.library.opcheck(OPS.attention_fwd.default, (*per_head, None, True))


# ------------------------------------------------------------------------------------- memory


def test_attention_memory_is_linear_in_seq():
    """Forward + backward scratch grows like N, never N^2; the same probe sees the dense
    reference grow like N^2, so the check can fail."""
    b, d, h, e = 1, 64, 2, 32
    torch.manual_seed(0)
    w_q, w_k = torch.randn(h, e, d) / d**0.5, torch.randn(h, e, d) / d**0.5
    diag, eta = 0.5 * torch.randn(d), torch.tensor([0.5, 0.4])

    def run(n, fwd, bwd):
        x = torch.randn(b, n, d)
        grad_out = torch.randn(b, n, d)
        args = (x, w_q, w_k, diag, None, None, None, eta, None)

        def both():
            state = fwd(*args, True)
            bwd(grad_out, *args, *state[1:])

        return cpu_peak_bytes(both)

    kernel = {n: run(n, OPS.attention_fwd, OPS.attention_bwd) for n in (512, 1024, 2048)}
    assert kernel[512] > 0
    assert kernel[2048] / kernel[1024] < 2.2 and kernel[1024] / kernel[512] < 2.2, kernel
    # All of it is O(N) state: at most ~60 floats per token and unit of width, far below
    # even one N x N score matrix (2048^2 floats = 16 MiB) per head.
    per_token = kernel[2048] / (2048 * (d + h * e) * 4)
    assert per_token < 60, per_token
    assert kernel[2048] < 2048 * 2048 * 4 * h
    ref = {n: run(n, reference.attention_forward, reference.attention_backward) for n in (512, 1024)}
    assert ref[1024] / ref[512] > 3.0, ref


# ------------------------------------------------------------------------------------------ mlp


def mlp_case(*, precond: str = "both", rank: int = 3, **fields) -> MLPCase:
    use_p, use_u = PRECOND[precond]
    defaults = dict(batch=2, seq=67, dim=12, hidden=19, steps=2, activation="silu")
    return MLPCase(**{**defaults, **fields}, precond_diag=use_p, precond_rank=rank if use_u else 0)


def mlp_inputs(case: MLPCase, dtype: torch.dtype) -> list:
    """Fresh random inputs in schema order without the activation, in dtype."""
    return list(case.with_(dtype=dtype).make().args()[:-1])


def reference_mlp(args, activation, grad_out):
    with one_thread():
        return forward_backward(reference.mlp_forward, reference.mlp_backward, args, activation, grad_out)


def kernel_mlp(args, activation, grad_out):
    return forward_backward(OPS.mlp_fwd, OPS.mlp_bwd, args, activation, grad_out)


def check_mlp(case: MLPCase, dtype: torch.dtype = torch.float64):
    args = mlp_inputs(case, dtype)
    shape = (case.batch, case.seq, case.dim)
    (got_fwd, got_grads), (want_fwd, want_grads), (low_fwd, low_grads) = run_both(
        reference_mlp, kernel_mlp, args, case.activation, shape, dtype
    )
    for i, name in enumerate(MLP_FORWARD_NAMES):
        assert got_fwd[i].dtype == dtype
        check_close(name, got_fwd[i], want_fwd[i], dtype, None if low_fwd is None else low_fwd[i])
    for i, name in enumerate(MLP_GRAD_NAMES):
        check_close(name, got_grads[i], want_grads[i], dtype, None if low_grads is None else low_grads[i])


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("precond", list(PRECOND))
@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
def test_mlp_options_float64(activation, precond, steps):
    check_mlp(mlp_case(activation=activation, precond=precond, steps=steps))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (3, 7, 9, 31, 2), (2, 130, 17, 5, 4)], ids=str)
def test_mlp_shapes_float64(shape):
    b, n, d, m, r = shape
    check_mlp(mlp_case(batch=b, seq=n, dim=d, hidden=m, rank=r, steps=3))


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_mlp_low_precision(dtype, activation):
    check_mlp(mlp_case(seq=70, dim=24, hidden=40, activation=activation, steps=3), dtype)


def test_mlp_public_op_autograd_and_noncontiguous():
    case = mlp_case(seq=33, steps=3, activation="gelu")
    args = mlp_inputs(case, torch.float32)
    x, w, v, p, u, eta = args
    x_strided = x.transpose(0, 1).contiguous().transpose(0, 1)
    w_strided = w.t().contiguous().t()
    assert not x_strided.is_contiguous() and not w_strided.is_contiguous()
    leaves = [t.clone().requires_grad_() for t in (x_strided, w_strided, v, p, u, eta)]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    out = cem_ops.mlp(*leaves[:3], precond_diag=leaves[3], precond_lowrank=leaves[4], step_size=leaves[5],
                      activation="gelu")
    out.backward(grad_out := torch.randn(out.shape))
    with one_thread():
        want = reference.mlp(*ref_leaves, activation="gelu")
        want.backward(grad_out.double())
    assert rel_err(out, want) < 1e-5
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        assert rel_err(leaf.grad, ref_leaf.grad) < 2e-5


@pytest.mark.parametrize("batch,seq", [(0, 5), (2, 0)])
def test_mlp_empty(batch, seq):
    args = mlp_inputs(mlp_case(batch=max(batch, 1), seq=max(seq, 1), steps=2), torch.float32)
    args[0] = args[0][:batch, :seq]
    fwd = OPS.mlp_fwd(*args, "relu", True)
    want = reference.mlp_forward(*args, "relu", True)
    for got, ref in zip(fwd, want):
        assert got.shape == ref.shape
    grads = OPS.mlp_bwd(torch.zeros_like(args[0]), *args, "relu", *fwd[1:])
    assert grads[0].shape == args[0].shape
    assert all(not g.any() for g in grads[1:])


def test_mlp_bad_input_is_a_clear_error():
    args = mlp_inputs(mlp_case(seq=5), torch.float32)
    with pytest.raises(ValueError, match="activation must be one of"):
        OPS.mlp_fwd(*args, "tanh", True)
    fwd = OPS.mlp_fwd(*args, "silu", False)
    with pytest.raises(ValueError, match="iterates must have shape"):
        OPS.mlp_bwd(torch.zeros_like(args[0]), *args, "silu", *fwd[1:])


def test_mlp_opcheck():
    args = mlp_inputs(mlp_case(seq=20), torch.float32)
    torch.library.opcheck(OPS.mlp_fwd.default, (*args, "silu", True))
    trainable = [a.clone().requires_grad_() for a in args]
    torch.library.opcheck(OPS.mlp_fwd.default, (*trainable, "relu", True))
    fwd = OPS.mlp_fwd(*args, "gelu", True)
    torch.library.opcheck(OPS.mlp_bwd.default, (torch.randn_like(args[0]), *args, "gelu", *fwd[1:]))
