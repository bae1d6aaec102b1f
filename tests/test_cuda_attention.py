"""CUDA kernels of cem::attention_fwd / cem::attention_bwd against the float64 reference.

Every check draws fresh random inputs (never zeros; the seed is in the failure message), rounds
them to the dtype under test, and compares the kernels with the reference evaluated in float64 on
exactly those rounded inputs: ||out - ref|| / ||ref|| below 1e-4 for float32 and 1e-2 for
bfloat16/float16, or, where the reference is itself less accurate in that dtype, within 2x (output)
or 3x (gradients) the reference's own low-precision error. All gradients are checked.

Which (dtype, head dim) pairs run a compiled kernel comes from cem_ops._C (the build's switches);
the others run the reference on CUDA and must match it just the same.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
import torch

import cem_ops
from cem_ops import reference
from cem_ops.ops.backends import cuda_attention_kernels, kernel_backends
from cem_ops.testing import TOLERANCES

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is visible)"),
]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DIFFERENTIABLE = ("x", "w_q", "w_k", "diag", "precond_diag", "precond_lowrank", "step_size")


def _require_compiled_kernels() -> None:
    if kernel_backends()["attention_fwd"]["CUDA"] != "compiled":
        pytest.skip("cem_ops._C was built without the CUDA kernels (rebuild with CEM_OPS_CUDA=1)")


def runs_kernel(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether this build has a compiled kernel for (dtype, head_dim) (else the reference runs)."""
    name = {v: k for k, v in DTYPES.items()}.get(dtype)
    return any(head_dim <= bucket for bucket in cuda_attention_kernels().get(name, ()))


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    seq: int
    head_dim: int
    diag: str = "none"  # "none" | "shared" | "per_head"
    alibi: bool = False
    precond: str = "none"  # "none" | "diag" | "lowrank" | "both"
    steps: int = 1
    batch: int = 2
    heads: int = 2
    dim: int = 48
    rank: int = 3

    def __str__(self) -> str:
        dtype = {v: k for k, v in DTYPES.items()}[self.dtype]
        return (
            f"{dtype}-N{self.seq}-Dh{self.head_dim}-{self.diag}-alibi{int(self.alibi)}-{self.precond}-T{self.steps}"
            f"-B{self.batch}-H{self.heads}-D{self.dim}"
        )


def make_inputs(case: Case, seed: int) -> dict[str, torch.Tensor | None]:
    """float64 CPU inputs with O(1) scores: q, k ~ N(0, 1) per component before the 1/sqrt(Dh) scale."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    b, n, d, h, e = case.batch, case.seq, case.dim, case.heads, case.head_dim
    inputs: dict[str, torch.Tensor | None] = {
        "x": randn(b, n, d),
        "w_q": randn(h, e, d, std=d**-0.5),
        "w_k": randn(h, e, d, std=d**-0.5),
        "diag": None,
        "alibi_slopes": None,
        "precond_diag": None,
        "precond_lowrank": None,
        "step_size": 0.3 + 0.4 * torch.rand(case.steps, generator=gen, dtype=torch.float64),
    }
    if case.diag == "shared":
        inputs["diag"] = randn(d, std=0.5)
    elif case.diag == "per_head":
        inputs["diag"] = randn(h, d, std=0.5)
    if case.alibi:
        inputs["alibi_slopes"] = 2.0 ** (-8.0 * torch.arange(1, h + 1, dtype=torch.float64) / h)
    if case.precond in ("diag", "both"):
        inputs["precond_diag"] = 0.5 + torch.rand(d, generator=gen, dtype=torch.float64)
    if case.precond in ("lowrank", "both"):
        inputs["precond_lowrank"] = randn(d, case.rank, std=0.3 * d**-0.5)
    return inputs


def cast(inputs, dtype, device):
    return {k: None if v is None else v.to(device=device, dtype=dtype) for k, v in inputs.items()}


def forward_backward(fn, inputs, grad_out):
    """out and the gradients of sum(out * grad_out) for every differentiable input that is given."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_(k in DIFFERENTIABLE) for k, v in inputs.items()}
    out = fn(**leaves)
    out.backward(grad_out)
    grads = {k: leaves[k].grad for k in DIFFERENTIABLE if leaves[k] is not None}
    return out.detach(), grads


def cem_attention(x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size):
    return cem_ops.attention(
        x, w_q, w_k, diag=diag, alibi_slopes=alibi_slopes, precond_diag=precond_diag,
        precond_lowrank=precond_lowrank, step_size=step_size,
    )


def reference_attention(x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size):
    return reference.attention(x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size)


def explicit_reference(inputs, grad_out):
    """The reference forward and its explicit blocked backward, run in the inputs' dtype."""
    args = [inputs[k] for k in ("x", "w_q", "w_k", "diag", "alibi_slopes", "precond_diag", "precond_lowrank", "step_size")]
    fwd = reference.attention_forward(*args, None)
    grads = reference.attention_backward(grad_out, *args, None, *fwd[1:])._asdict()
    return fwd.out, {k: v for k, v in grads.items() if v is not None}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten or overflowed output?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def poison_allocator(device: torch.device) -> None:
    """Fill cached allocator blocks with NaN so that any output element a kernel fails to write
    shows up as NaN instead of a lucky leftover value."""
    blocks = [torch.full((1 << n,), float("nan"), device=device) for n in range(10, 25, 2)]
    del blocks


def check_case(case: Case, seed: int | None = None) -> None:
    _require_compiled_kernels()
    seed = random.randrange(2**31) if seed is None else seed
    device = torch.device("cuda")
    inputs = make_inputs(case, seed)
    grad = torch.randn(case.batch, case.seq, case.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))

    low = cast(inputs, case.dtype, device)  # what the kernels see
    grad_low = grad.to(device=device, dtype=case.dtype)
    exact = cast(low, torch.float64, device)  # the same rounded values, evaluated in float64

    poison_allocator(device)
    out, grads = forward_backward(cem_attention, low, grad_low)
    ref_out, ref_grads = forward_backward(reference_attention, exact, grad_low.double())
    results = {"out": (out, ref_out), **{k: (grads[k], ref_grads[k]) for k in ref_grads}}
    own_error = {name: 0.0 for name in results}
    if case.dtype != torch.float32:
        # The reference's own error in this dtype, by autograd and by the explicit backward of
        # docs/backward.md (which, like the kernels, rebuilds G from the head outputs saved in the
        # input dtype: the step-size gradient is a cancelling sum and feels that rounding).
        for low_out, low_grads in (forward_backward(reference_attention, low, grad_low), explicit_reference(low, grad_low)):
            for name, (_, ref) in results.items():
                own = low_out if name == "out" else low_grads[name]
                own_error[name] = max(own_error[name], rel_err(own, ref))

    failures = []
    for name, (value, ref) in results.items():
        err = rel_err(value, ref)
        bound = max(TOLERANCES[case.dtype], (2.0 if name == "out" else 3.0) * own_error[name])
        if not err < bound:
            failures.append(f"{name}: rel err {err:.3e} >= {bound:.1e} (reference's own: {own_error[name]:.1e})")
    kernel = "kernel" if runs_kernel(case.dtype, case.head_dim) else "reference fallback"
    assert not failures, f"{case} ({kernel}, seed {seed}): " + "; ".join(failures)


# The option grid: every dtype x head dim x diagonal mode x sequence length, with the remaining
# options (T, ALiBi, preconditioner parts) rotated so each value meets every dtype and diag mode.
SEQS = (1, 7, 67, 130, 1025)
HEAD_DIMS = (64, 128, 59)
DIAGS = ("none", "shared", "per_head")
PRECONDS = ("none", "diag", "lowrank", "both")


def _grid() -> list[Case]:
    cases = []
    for index, (dtype, head_dim, diag, seq) in enumerate(itertools.product(DTYPES.values(), HEAD_DIMS, DIAGS, SEQS)):
        cases.append(
            Case(
                dtype=dtype,
                seq=seq,
                head_dim=head_dim,
                diag=diag,
                alibi=index % 2 == 1,
                precond=PRECONDS[index % 4],
                steps=1 + (index // 2) % 4,
                batch=1 if seq > 500 else 2,
            )
        )
    return cases


@pytest.mark.parametrize("case", _grid(), ids=str)
def test_matches_reference(case: Case) -> None:
    check_case(case)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("precond", PRECONDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_steps_and_preconditioner(dtype, precond, steps) -> None:
    check_case(Case(dtype=dtype, seq=67, head_dim=64, diag="shared", alibi=True, precond=precond, steps=steps))


@pytest.mark.parametrize("diag", DIAGS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("panel_rows", ["64", "128"])
def test_multiple_diagonal_panels(monkeypatch, panel_rows, dtype, diag) -> None:
    """The D-wide diagonal terms run one row panel at a time; force several panels."""
    monkeypatch.setenv("CEM_OPS_PANEL_ROWS", panel_rows)
    check_case(Case(dtype=dtype, seq=257, head_dim=64, diag=diag, alibi=True, precond="both", steps=2, heads=3, dim=40))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("head_dim", [16, 80, 100])
def test_padded_head_dims(dtype, head_dim) -> None:
    """Head dims below a bucket run zero-padded (vector loads on or off by alignment)."""
    check_case(Case(dtype=dtype, seq=130, head_dim=head_dim, diag="shared", alibi=True, precond="diag", steps=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wide_model(dtype) -> None:
    """D = 4096 with 32 heads of 128: the epilogue and the D-wide products at full width."""
    check_case(Case(dtype=dtype, seq=67, head_dim=128, diag="shared", alibi=True, precond="both", steps=2, batch=1, heads=32, dim=4096, rank=8))


def test_float64_and_large_head_dim_fall_back_to_reference() -> None:
    _require_compiled_kernels()
    # float64 runs the reference on CUDA silently (gradcheck needs it) ...
    inputs = cast(make_inputs(Case(dtype=torch.float32, seq=33, head_dim=64, diag="shared", steps=2), 1), torch.float64, "cuda")
    out = cem_attention(**inputs)
    torch.testing.assert_close(out, reference_attention(**inputs))
    # ... and a head dim above the compiled buckets does too, with a warning that says why.
    largest = max((max(b) for b in cuda_attention_kernels().values()), default=0)
    case = Case(dtype=torch.float32, seq=20, head_dim=largest + 16, diag="per_head", steps=2)
    check_case(case)


def test_bad_input_names_the_argument() -> None:
    _require_compiled_kernels()
    inputs = cast(make_inputs(Case(dtype=torch.float32, seq=9, head_dim=64, diag="shared"), 2), torch.float32, "cuda")
    inputs["diag"] = inputs["diag"][:-1]
    with pytest.raises(ValueError, match="diag must have shape"):
        cem_attention(**inputs)
    inputs["diag"] = None
    inputs["w_k"] = inputs["w_k"].to(torch.bfloat16)
    with pytest.raises(TypeError, match="w_k must have the dtype of x"):
        cem_attention(**inputs)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("diag", DIAGS)
def test_saved_state_matches_reference(dtype, diag) -> None:
    """attention_fwd's saved state (iterates, head outputs, diag values, lse) itself."""
    _require_compiled_kernels()
    case = Case(dtype=dtype, seq=130, head_dim=64, diag=diag, alibi=True, precond="both", steps=3)
    seed = random.randrange(2**31)
    low = cast(make_inputs(case, seed), dtype, "cuda")
    exact = cast(low, torch.float64, "cuda")
    args = [low[k] for k in ("x", "w_q", "w_k", "diag", "alibi_slopes", "precond_diag", "precond_lowrank", "step_size")]
    got = torch.ops.cem.attention_fwd(*args, None, True)
    want = reference.attention_forward(*[exact[k] for k in ("x", "w_q", "w_k", "diag", "alibi_slopes", "precond_diag", "precond_lowrank", "step_size")], None)
    for name, a, b in zip(("out", "iterates", "head_outputs", "diag_values", "lse"), got, want):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if b.numel():
            # lse is O(log N): compare it absolutely through exp(lse_a - lse_b) - 1.
            err = (a.double() - b).abs().max().item() if name == "lse" else rel_err(a, b)
            assert err < TOLERANCES[dtype] * (10 if name == "lse" else 1), f"{case} seed {seed}: {name} err {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inference_without_saved_state(dtype) -> None:
    _require_compiled_kernels()
    case = Case(dtype=dtype, seq=67, head_dim=64, diag="shared", alibi=True, precond="both", steps=3)
    low = cast(make_inputs(case, random.randrange(2**31)), dtype, "cuda")
    with torch.no_grad():
        out = cem_attention(**low)
        ref = reference_attention(**cast(low, torch.float64, "cuda"))
    assert rel_err(out, ref) < TOLERANCES[dtype]


def _opcheck_args(case: Case):
    low = cast(make_inputs(case, random.randrange(2**31)), case.dtype, "cuda")
    keys = ("x", "w_q", "w_k", "diag", "alibi_slopes", "precond_diag", "precond_lowrank", "step_size")
    args = [low[k] for k in keys]
    for i, k in enumerate(keys):
        if args[i] is not None and k in DIFFERENTIABLE:
            args[i] = args[i].requires_grad_()
    return args


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("diag", ["none", "shared"])
def test_opcheck(dtype, diag) -> None:
    _require_compiled_kernels()
    case = Case(dtype=dtype, seq=19, head_dim=64, diag=diag, alibi=True, precond="both", steps=2)
    args = _opcheck_args(case)
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    detached = [a.detach() if a is not None else None for a in args]
    torch.library.opcheck(torch.ops.cem.attention_fwd.default, (*args, None, True), **tol)
    # Without saved state there is no backward: check it as an inference op.
    torch.library.opcheck(torch.ops.cem.attention_fwd.default, (*detached, 0.3, False), **tol)

    state = torch.ops.cem.attention_fwd(*detached, None, True)
    grad_out = torch.randn_like(state[0])
    bwd_args = (grad_out, *detached, None, *state[1:])
    torch.library.opcheck(torch.ops.cem.attention_bwd.default, bwd_args, **tol)


def test_runs_on_the_current_stream() -> None:
    """Inputs produced late on a side stream must be seen by the kernels launched on it; a kernel
    on the default stream would read them before they exist."""
    _require_compiled_kernels()
    case = Case(dtype=torch.float32, seq=130, head_dim=64, diag="shared", alibi=True, precond="both", steps=2)
    seed = random.randrange(2**31)
    low = cast(make_inputs(case, seed), case.dtype, "cuda")
    grad = torch.randn(case.batch, case.seq, case.dim, device="cuda", dtype=case.dtype)
    ref_out, ref_grads = forward_backward(cem_attention, low, grad)
    torch.cuda.synchronize()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the side stream busy so that ordering matters
        late = {k: None if v is None else v * 1 for k, v in low.items()}
        out, grads = forward_backward(cem_attention, late, grad)
    side.synchronize()
    # Not bitwise: cuBLAS may pick other algorithms per stream. Stale inputs would be far off.
    assert rel_err(out, ref_out) < 1e-5, f"seed {seed}: output differs on a side stream"
    for k, g in ref_grads.items():
        assert rel_err(grads[k], g) < 1e-5, f"seed {seed}: grad {k} differs on a side stream"


def test_cuda_graph_capture() -> None:
    """Capture forward and backward in a CUDA graph: launching on any stream other than the
    capturing one fails during capture."""
    _require_compiled_kernels()
    case = Case(dtype=torch.float32, seq=67, head_dim=64, diag="shared", alibi=True, precond="both", steps=2)
    low = cast(make_inputs(case, random.randrange(2**31)), case.dtype, "cuda")
    grad = torch.randn(case.batch, case.seq, case.dim, device="cuda")
    eager_out, eager_grads = forward_backward(cem_attention, low, grad)

    static = {k: None if v is None else v.detach().clone().requires_grad_(k in DIFFERENTIABLE) for k, v in low.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (allocator, handles)
        cem_attention(**static).backward(grad)
    torch.cuda.current_stream().wait_stream(side)
    for v in static.values():
        if v is not None:
            v.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cem_attention(**static)
        out.backward(grad)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, eager_out) < 1e-6
    for k, g in eager_grads.items():
        assert rel_err(static[k].grad, g) < 1e-6, k


def test_option_grid_covers_every_value() -> None:
    """Guards against a silently shrunken parametrization."""
    grid = _grid()
    assert {c.steps for c in grid} == {1, 2, 3, 4}
    assert {c.precond for c in grid} == set(PRECONDS)
    assert {c.alibi for c in grid} == {False, True}
    for dtype, diag in itertools.product(DTYPES.values(), DIAGS):
        sub = [c for c in grid if c.dtype == dtype and c.diag == diag]
        assert {c.alibi for c in sub} == {False, True} and {c.precond for c in sub} == set(PRECONDS)
