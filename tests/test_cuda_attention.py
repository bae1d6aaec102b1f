"""CUDA kernels of cem::attention_fwd / cem::attention_bwd against the float64 reference.

Every check draws fresh random inputs on the device (cem_ops.testing; the seed is printed on
failure) and holds output and every gradient to the policy every backend shares
(cem_ops.testing.assert_matches_reference): the float64 reference on the same rounded inputs,
with float32 gradients allowed the error the conditioning forces and bfloat16/float16 gradients
compared with the reference run at the same precision.

Which (dtype, head dim) pairs run a compiled kernel comes from cem_ops._C (the build's switches);
the others run the reference on CUDA and must match it just the same.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import cem_ops
from cem_ops import reference
from cem_ops.ops.backends import cuda_attention_kernels, kernel_backends
from cem_ops.testing import TOLERANCES, AttentionCase, assert_matches_reference, output_and_gradients, relative_error

pytestmark = pytest.mark.cuda

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DIAGS = ("none", "shared", "per_head")
# preconditioner parts -> (diagonal p on, rank of U)
PRECONDS = {"none": (False, 0), "diag": (True, 0), "lowrank": (False, 3), "both": (True, 3)}


def require_cuda_kernels() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none is visible)")
    if kernel_backends()["attention_fwd"]["CUDA"] != "compiled":
        pytest.skip("cem_ops._C was built without the CUDA kernels (rebuild with CEM_OPS_CUDA=1)")


def runs_kernel(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether this build has a compiled kernel for (dtype, head_dim) (else the reference runs)."""
    return any(head_dim <= bucket for bucket in cuda_attention_kernels().get(DTYPE_NAMES.get(dtype), ()))


def cuda_case(dtype: torch.dtype, seq: int, head_dim: int, *, diag: str = "none", alibi: bool = False,
              precond: str = "none", steps: int = 1, batch: int = 2, heads: int = 2, dim: int = 48,
              rank: int = 3) -> AttentionCase:
    use_diag, use_rank = PRECONDS[precond]
    return AttentionCase(batch=batch, seq=seq, dim=dim, heads=heads, head_dim=head_dim, steps=steps, diag=diag,
                         alibi=alibi, precond_diag=use_diag, precond_rank=rank if use_rank else 0, dtype=dtype,
                         device="cuda")


def case_id(case: AttentionCase) -> str:
    precond = {v: k for k, v in PRECONDS.items()}.get((case.precond_diag, min(case.precond_rank, 3)), "?")
    return (f"{DTYPE_NAMES[case.dtype]}-N{case.seq}-Dh{case.head_dim}-{case.diag}-alibi{int(case.alibi)}-{precond}"
            f"-T{case.steps}-B{case.batch}-H{case.heads}-D{case.dim}")


def poison_allocator() -> None:
    """Fill cached allocator blocks with NaN so that any output element a kernel fails to write
    shows up as NaN instead of a lucky leftover value."""
    blocks = [torch.full((1 << n,), float("nan"), device="cuda") for n in range(10, 25, 2)]
    del blocks


def check_case(case: AttentionCase, rng: torch.Generator, record_error) -> None:
    require_cuda_kernels()
    inputs = case.make(rng)
    poison_allocator()
    kernel = "kernel" if runs_kernel(case.dtype, case.head_dim) else "reference fallback"
    assert_matches_reference("attention", torch.ops.cem.attention, inputs, rng, record_error,
                             context=f"{case_id(case)} ({kernel})")


def with_gradients(inputs, grad_out: torch.Tensor):
    """The op's output and the gradients of sum(out * grad_out), by input name."""
    out, grads = output_and_gradients(torch.ops.cem.attention, inputs, inputs.x.dtype, grad_out)
    return out.detach(), dict(zip(inputs.differentiable_names(), grads))


# The option grid: every dtype x head dim x diagonal mode x sequence length, with the remaining
# options (T, ALiBi, preconditioner parts) rotated so each value meets every dtype and diag mode.
SEQS = (1, 7, 67, 130, 1025)
HEAD_DIMS = (64, 128, 59)


def _grid() -> list[AttentionCase]:
    cases = []
    for index, (dtype, head_dim, diag, seq) in enumerate(itertools.product(DTYPES.values(), HEAD_DIMS, DIAGS, SEQS)):
        cases.append(cuda_case(dtype, seq, head_dim, diag=diag, alibi=index % 2 == 1,
                               precond=list(PRECONDS)[index % 4], steps=1 + (index // 2) % 4,
                               batch=1 if seq > 500 else 2))
    return cases


@pytest.mark.parametrize("case", _grid(), ids=case_id)
def test_matches_reference(case, rng, record_error) -> None:
    check_case(case, rng, record_error)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("precond", PRECONDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_steps_and_preconditioner(dtype, precond, steps, rng, record_error) -> None:
    check_case(cuda_case(dtype, 67, 64, diag="shared", alibi=True, precond=precond, steps=steps), rng, record_error)


@pytest.mark.parametrize("diag", DIAGS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("panel_rows", ["64", "128"])
def test_multiple_diagonal_panels(monkeypatch, panel_rows, dtype, diag, rng, record_error) -> None:
    """The D-wide diagonal terms run one row panel at a time; force several panels."""
    monkeypatch.setenv("CEM_OPS_PANEL_ROWS", panel_rows)
    case = cuda_case(dtype, 257, 64, diag=diag, alibi=True, precond="both", steps=2, heads=3, dim=40)
    check_case(case, rng, record_error)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("head_dim", [16, 80, 100])
def test_padded_head_dims(dtype, head_dim, rng, record_error) -> None:
    """Head dims below a bucket run zero-padded (vector loads on or off by alignment)."""
    case = cuda_case(dtype, 130, head_dim, diag="shared", alibi=True, precond="diag", steps=2)
    check_case(case, rng, record_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wide_model(dtype, rng, record_error) -> None:
    """D = 4096 with 32 heads of 128: the epilogue and the D-wide products at full width."""
    case = cuda_case(dtype, 67, 128, diag="shared", alibi=True, precond="both", steps=2, batch=1, heads=32,
                     dim=4096, rank=8)
    check_case(case, rng, record_error)


def test_float64_and_large_head_dim_fall_back_to_reference(rng, record_error) -> None:
    require_cuda_kernels()
    # float64 runs the reference on CUDA silently (gradcheck needs it) ...
    inputs = cuda_case(torch.float64, 33, 64, diag="shared", steps=2).make(rng)
    torch.testing.assert_close(torch.ops.cem.attention(*inputs.args()), reference.attention(*inputs.args()))
    # ... and a head dim above the compiled buckets does too.
    largest = max((max(b) for b in cuda_attention_kernels().values()), default=0)
    check_case(cuda_case(torch.float32, 20, largest + 16, diag="per_head", steps=2), rng, record_error)


def test_bad_input_names_the_argument(rng) -> None:
    require_cuda_kernels()
    inputs = cuda_case(torch.float32, 9, 64, diag="shared").make(rng)
    inputs.diag = inputs.diag[:-1]
    with pytest.raises(ValueError, match="diag must have shape"):
        cem_ops.attention(inputs.x, inputs.w_q, inputs.w_k, diag=inputs.diag, step_size=inputs.step_size)
    inputs.diag = None
    inputs.w_k = inputs.w_k.to(torch.bfloat16)
    with pytest.raises(TypeError, match="w_k must have the dtype of x"):
        cem_ops.attention(inputs.x, inputs.w_q, inputs.w_k, step_size=inputs.step_size)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("diag", DIAGS)
def test_saved_state_matches_reference(dtype, diag, rng) -> None:
    """attention_fwd's saved state (iterates, head outputs, diag values, lse) itself."""
    require_cuda_kernels()
    case = cuda_case(dtype, 130, 64, diag=diag, alibi=True, precond="both", steps=3)
    low = case.make(rng)
    got = torch.ops.cem.attention_fwd(*low.args(), True)
    want = reference.attention_forward(*low.to(torch.float64).args())
    for name, a, b in zip(want._fields, got, want):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if b.numel():
            # lse is O(log N): compare it absolutely.
            err = (a.double() - b).abs().max().item() if name == "lse" else relative_error(a, b)
            assert err < TOLERANCES[dtype] * (10 if name == "lse" else 1), f"{case_id(case)}: {name} err {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inference_without_saved_state(dtype, rng) -> None:
    require_cuda_kernels()
    low = cuda_case(dtype, 67, 64, diag="shared", alibi=True, precond="both", steps=3).make(rng)
    with torch.no_grad():
        out = torch.ops.cem.attention(*low.args())
        ref = reference.attention(*low.to(torch.float64).args())
    assert relative_error(out, ref) < TOLERANCES[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("diag", ["none", "shared"])
def test_opcheck(dtype, diag, rng) -> None:
    require_cuda_kernels()
    inputs = cuda_case(dtype, 19, 64, diag=diag, alibi=True, precond="both", steps=2).make(rng, requires_grad=True)
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    detached = inputs.to(dtype).args()
    torch.library.opcheck(torch.ops.cem.attention_fwd.default, (*inputs.args(), True), **tol)
    # Without saved state there is no backward: check it as an inference op.
    torch.library.opcheck(torch.ops.cem.attention_fwd.default, (*detached[:-1], 0.3, False), **tol)

    state = torch.ops.cem.attention_fwd(*detached, True)
    grad_out = torch.randn_like(state[0])
    torch.library.opcheck(torch.ops.cem.attention_bwd.default, (grad_out, *detached, *state[1:]), **tol)


def test_runs_on_the_current_stream(rng) -> None:
    """Inputs produced late on a side stream must be seen by the kernels launched on it; a kernel
    on the default stream would read them before they exist."""
    require_cuda_kernels()
    low = cuda_case(torch.float32, 130, 64, diag="shared", alibi=True, precond="both", steps=2).make(rng)
    grad = torch.randn(low.x.shape, generator=rng).cuda()
    ref_out, ref_grads = with_gradients(low, grad)
    torch.cuda.synchronize()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the side stream busy so that ordering matters
        late = low.to(torch.float64).to(torch.float32)  # produced on the side stream
        out, grads = with_gradients(late, grad)
    side.synchronize()
    # Not bitwise: cuBLAS may pick other algorithms per stream. Stale inputs would be far off.
    assert relative_error(out, ref_out) < 1e-5, "output differs on a side stream"
    for name, g in ref_grads.items():
        assert relative_error(grads[name], g) < 1e-5, f"grad {name} differs on a side stream"


def test_cuda_graph_capture(rng) -> None:
    """Capture forward and backward in a CUDA graph: launching on any stream other than the
    capturing one fails during capture."""
    require_cuda_kernels()
    low = cuda_case(torch.float32, 67, 64, diag="shared", alibi=True, precond="both", steps=2).make(rng)
    grad = torch.randn(low.x.shape, generator=rng).cuda()
    eager_out, eager_grads = with_gradients(low, grad)

    static = low.to(torch.float32, requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (allocator, handles)
        torch.ops.cem.attention(*static.args()).backward(grad)
    torch.cuda.current_stream().wait_stream(side)
    for t in static.differentiable():
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.cem.attention(*static.args())
        out.backward(grad)
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(out, eager_out) < 1e-6
    for name, t in zip(static.differentiable_names(), static.differentiable()):
        assert relative_error(t.grad, eager_grads[name]) < 1e-6, name


def test_option_grid_covers_every_value() -> None:
    """Guards against a silently shrunken parametrization."""
    grid = _grid()
    assert {c.steps for c in grid} == {1, 2, 3, 4}
    assert {(c.precond_diag, c.precond_rank) for c in grid} == set(PRECONDS.values())
    assert {c.alibi for c in grid} == {False, True}
    for dtype, diag in itertools.product(DTYPES.values(), DIAGS):
        sub = [c for c in grid if c.dtype == dtype and c.diag == diag]
        assert {c.alibi for c in sub} == {False, True}
        assert {(c.precond_diag, c.precond_rank) for c in sub} == set(PRECONDS.values())
