"""The CUDA attention path (glue and kernels of cem::attention_fwd / attention_bwd) against the
float64 reference, on two backends with the same tests:

  cuda      a GPU (skipped with the reason where none is visible or the kernels were not built);
  emulated  the same glue and kernel sources built for the CPU (cem_ops.testing.cuda_emulation):
            every CUDA thread a fiber, with the shared-memory race detector on and uninitialized
            CPU memory filled with NaN. Runs in CI; smaller shapes (odd N up to 130).

Every check draws fresh random inputs (cem_ops.testing; the seed is printed on failure) and holds
output and every gradient to the policy every backend shares (cem_ops.testing.
assert_matches_reference). Which (dtype, head dim) pairs run a compiled kernel comes from the
build (cem_ops._C or cem_ops._C_emulated); the others run the reference and must match just the
same. `pytest -m emulation` runs the emulated half alone.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from dataclasses import dataclass

import pytest
import torch

import cem_ops
from cem_ops import reference
from cem_ops.ops.backends import cuda_attention_kernels, kernel_backends
from cem_ops.testing import (
    TOLERANCES,
    AttentionCase,
    assert_matches_reference,
    cuda_emulation,
    emulation_available,
    output_and_gradients,
    relative_error,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DIAGS = ("none", "shared", "per_head")
# preconditioner parts -> (diagonal p on, rank of U)
PRECONDS = {"none": (False, 0), "diag": (True, 0), "lowrank": (False, 3), "both": (True, 3)}


def parse_kernel_table(text: str) -> dict[str, tuple[int, ...]]:
    """"bf16:64,128 fp32:64" -> {"bf16": (64, 128), "fp32": (64,)}."""
    table = {}
    for entry in text.split():
        dtype, _, dims = entry.partition(":")
        table[dtype] = tuple(int(d) for d in dims.split(",") if d)
    return table


@dataclass(frozen=True)
class Backend:
    """Where the CUDA path runs: a GPU, or the CPU emulation of the same sources."""

    name: str

    @property
    def device(self) -> str:
        return "cuda" if self.name == "cuda" else "cpu"

    def require(self) -> None:
        if self.name == "cuda":
            if not torch.cuda.is_available():
                pytest.skip("needs a CUDA device (none is visible)")
            if kernel_backends()["attention_fwd"]["CUDA"] != "compiled":
                pytest.skip("cem_ops._C was built without the CUDA kernels (rebuild with CEM_OPS_CUDA=1)")
        elif not emulation_available():
            pytest.skip("cem_ops was built without the emulated CUDA backend (needs the CUDA headers; "
                        "CEM_OPS_CUDA_EMULATION=1)")

    def kernels(self) -> dict[str, tuple[int, ...]]:
        if self.name == "cuda":
            return cuda_attention_kernels()
        return parse_kernel_table(cem_ops.testing.emulation.emulated_backend().cuda_attention_kernels)

    def runs_kernel(self, dtype: torch.dtype, head_dim: int) -> bool:
        """Whether this build has a compiled kernel for (dtype, head_dim) (else the reference runs)."""
        return any(head_dim <= bucket for bucket in self.kernels().get(DTYPE_NAMES.get(dtype), ()))

    @contextlib.contextmanager
    def active(self, deterministic: bool = False):
        """Inside: cem ops on this backend's tensors take the CUDA path, in the default mode
        (dQ and head sums by atomics) or the deterministic one. Deterministic emulated runs also
        fill every uninitialized CPU tensor with NaN, so an output element no kernel writes shows."""
        self.require()
        if self.name == "cuda":
            poison_allocator()
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        try:
            with cuda_emulation() if self.name == "emulated" else contextlib.nullcontext():
                yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)


CUDA = pytest.param(Backend("cuda"), marks=pytest.mark.cuda, id="cuda")
EMULATED = pytest.param(Backend("emulated"), marks=pytest.mark.emulation, id="emulated")
BACKENDS = [CUDA, EMULATED]


def cuda_case(backend: Backend, dtype: torch.dtype, seq: int, head_dim: int, *, diag: str = "none",
              alibi: bool = False, precond: str = "none", steps: int = 1, batch: int = 2, heads: int = 2,
              dim: int = 48, rank: int = 3) -> AttentionCase:
    use_diag, use_rank = PRECONDS[precond]
    return AttentionCase(batch=batch, seq=seq, dim=dim, heads=heads, head_dim=head_dim, steps=steps, diag=diag,
                         alibi=alibi, precond_diag=use_diag, precond_rank=rank if use_rank else 0, dtype=dtype,
                         device=backend.device)


def case_id(case: AttentionCase) -> str:
    precond = {v: k for k, v in PRECONDS.items()}.get((case.precond_diag, min(case.precond_rank, 3)), "?")
    return (f"{DTYPE_NAMES[case.dtype]}-N{case.seq}-Dh{case.head_dim}-{case.diag}-alibi{int(case.alibi)}-{precond}"
            f"-T{case.steps}-B{case.batch}-H{case.heads}-D{case.dim}")


def poison_allocator() -> None:
    """Fill cached allocator blocks with NaN so that any output element a kernel fails to write
    shows up as NaN instead of a lucky leftover value."""
    blocks = [torch.full((1 << n,), float("nan"), device="cuda") for n in range(10, 25, 2)]
    del blocks


def check_case(backend: Backend, case: AttentionCase, rng: torch.Generator, record_error,
               deterministic: bool = False) -> None:
    backend.require()
    inputs = case.make(rng)
    kernel = "kernel" if backend.runs_kernel(case.dtype, case.head_dim) else "reference fallback"
    mode = "deterministic" if deterministic else "atomic"
    with backend.active(deterministic):
        assert_matches_reference("attention", torch.ops.cem.attention, inputs, rng, record_error,
                                 context=f"{backend.name} {case_id(case)} ({kernel}, {mode})")


def with_gradients(inputs, grad_out: torch.Tensor):
    """The op's output and the gradients of sum(out * grad_out), by input name."""
    out, grads = output_and_gradients(torch.ops.cem.attention, inputs, inputs.x.dtype, grad_out)
    return out.detach(), dict(zip(inputs.differentiable_names(), grads))


# The option grid: every dtype x head dim x diagonal mode x sequence length, with the remaining
# options (T, ALiBi, preconditioner parts) rotated so each value meets every dtype and diag mode.
# Odd lengths cover ragged tiles (64-row tiles); the emulation's are shorter.
SEQS = {"cuda": (1, 7, 67, 130, 1025), "emulated": (1, 17, 65, 97, 130)}
HEAD_DIMS = (64, 128, 59)


def _grid(backend: Backend) -> list[tuple[AttentionCase, bool]]:
    """(case, deterministic) pairs; the mode rotates too, so that each meets every dtype and
    diagonal mode."""
    cases = []
    combos = itertools.product(DTYPES.values(), HEAD_DIMS, DIAGS, SEQS[backend.name])
    for index, (dtype, head_dim, diag, seq) in enumerate(combos):
        case = cuda_case(backend, dtype, seq, head_dim, diag=diag, alibi=index % 2 == 1,
                         precond=list(PRECONDS)[index % 4], steps=1 + (index // 2) % 4, batch=1 if seq > 500 else 2)
        cases.append((case, (index + index // 5) % 2 == 0))
    return cases


def backend_cases(cases_of) -> list:
    """(backend, case, deterministic) parameters for every backend, marked like the backend."""
    return [pytest.param(b.values[0], case, deterministic, marks=b.marks,
                         id=f"{b.id}-{case_id(case)}-{'det' if deterministic else 'atomic'}")
            for b in BACKENDS for case, deterministic in cases_of(b.values[0])]


@pytest.mark.parametrize("backend,case,deterministic", backend_cases(_grid))
def test_matches_reference(backend, case, deterministic, rng, record_error) -> None:
    check_case(backend, case, rng, record_error, deterministic)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("precond", PRECONDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_steps_and_preconditioner(backend, dtype, precond, steps, rng, record_error) -> None:
    case = cuda_case(backend, dtype, 67, 64, diag="shared", alibi=True, precond=precond, steps=steps)
    check_case(backend, case, rng, record_error, deterministic=steps % 2 == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("diag", DIAGS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("panel_rows", ["64", "128"])
def test_multiple_diagonal_panels(monkeypatch, backend, panel_rows, dtype, diag, rng, record_error) -> None:
    """The D-wide diagonal terms run one row panel at a time; force several panels (in both
    modes: panels change how dK and the head sums accumulate)."""
    monkeypatch.setenv("CEM_OPS_PANEL_ROWS", panel_rows)
    seq = 257 if backend.name == "cuda" else 130
    case = cuda_case(backend, dtype, seq, 64, diag=diag, alibi=True, precond="both", steps=2, heads=3, dim=40)
    check_case(backend, case, rng, record_error, deterministic=panel_rows == "128")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", ["", "0", "-3", "abc", "2.5"])
def test_bad_panel_rows_is_a_clear_error(monkeypatch, backend, value, rng) -> None:
    backend.require()
    monkeypatch.setenv("CEM_OPS_PANEL_ROWS", value)
    inputs = cuda_case(backend, torch.float32, 9, 64, diag="shared").make(rng)
    with backend.active(), pytest.raises(ValueError, match="CEM_OPS_PANEL_ROWS must be a positive integer"):
        torch.ops.cem.attention(*inputs.args())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", ["9223372036854775807", "99999999999999999999"])
def test_panel_rows_beyond_the_sequence_mean_one_panel(monkeypatch, backend, value, rng, record_error) -> None:
    monkeypatch.setenv("CEM_OPS_PANEL_ROWS", value)
    check_case(backend, cuda_case(backend, torch.float32, 70, 64, diag="shared", steps=2), rng, record_error)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("head_dim", [16, 80, 100])
def test_padded_head_dims(backend, dtype, head_dim, rng, record_error) -> None:
    """Head dims below a bucket run zero-padded (vector loads on or off by alignment)."""
    case = cuda_case(backend, dtype, 130, head_dim, diag="shared", alibi=True, precond="diag", steps=2)
    check_case(backend, case, rng, record_error, deterministic=head_dim == 80)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wide_model(backend, dtype, rng, record_error) -> None:
    """D = 4096 with 32 heads of 128: the epilogue and the D-wide products at full width."""
    case = cuda_case(backend, dtype, 67, 128, diag="shared", alibi=True, precond="both", steps=2, batch=1, heads=32,
                     dim=4096, rank=8)
    check_case(backend, case, rng, record_error, deterministic=dtype == torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:.*has no compiled CUDA kernel")
def test_float64_and_large_head_dim_fall_back_to_reference(backend, rng, record_error) -> None:
    backend.require()
    # float64 runs the reference silently (gradcheck needs it) ...
    inputs = cuda_case(backend, torch.float64, 33, 64, diag="shared", steps=2).make(rng)
    with backend.active():
        got = torch.ops.cem.attention(*inputs.args())
    torch.testing.assert_close(got, reference.attention(*inputs.args()))
    # ... and a head dim above the compiled buckets does too.
    largest = max((max(b) for b in backend.kernels().values()), default=0)
    check_case(backend, cuda_case(backend, torch.float32, 20, largest + 16, diag="per_head", steps=2), rng, record_error)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_missing_kernel_is_named_once(backend, rng, capfd) -> None:
    """The fallback warning names the dtype and head dim, so each distinct one warns (once).
    Depending on the caller it arrives as a Python warning or on stderr (c10's handler): both count."""
    backend.require()
    largest = max((max(b) for b in backend.kernels().values()), default=0)
    seen = []
    for dtype, head_dim in [(torch.float32, largest + 3), (torch.float32, largest + 3), (torch.bfloat16, largest + 3),
                            (torch.float32, largest + 5)]:
        inputs = cuda_case(backend, dtype, 5, head_dim, steps=1, batch=1, heads=1, dim=8).make(rng)
        capfd.readouterr()
        with backend.active(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.ops.cem.attention(*inputs.args())
        text = "\n".join(str(w.message) for w in caught) + capfd.readouterr().err
        seen.append([line for line in text.splitlines() if "has no compiled CUDA kernel" in line])
    assert [len(messages) for messages in seen] == [1, 0, 1, 1], seen
    assert f"Dh = w_q.size(1) = {largest + 5} with dtype Float" in seen[3][0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument(backend, rng) -> None:
    backend.require()
    inputs = cuda_case(backend, torch.float32, 9, 64, diag="shared").make(rng)
    inputs.diag = inputs.diag[:-1]
    with backend.active(), pytest.raises(ValueError, match="diag must have shape"):
        cem_ops.attention(inputs.x, inputs.w_q, inputs.w_k, diag=inputs.diag, step_size=inputs.step_size)
    inputs.diag = None
    inputs.w_k = inputs.w_k.to(torch.bfloat16)
    with backend.active(), pytest.raises(TypeError, match="w_k must have the dtype of x"):
        cem_ops.attention(inputs.x, inputs.w_q, inputs.w_k, step_size=inputs.step_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("diag", DIAGS)
def test_saved_state_matches_reference(backend, dtype, diag, rng) -> None:
    """attention_fwd's saved state itself: the output and iterates against the float64 run, and
    each step's head outputs, diagonal values and lse against the float64 step taken from the
    kernel's own iterate (so that rounding earlier steps does not blur the step checked)."""
    backend.require()
    case = cuda_case(backend, dtype, 130, 64, diag=diag, alibi=True, precond="both", steps=3)
    low = case.make(rng)
    with backend.active():
        out, iterates, head_outputs, diag_values, lse = torch.ops.cem.attention_fwd(*low.args(), True)
    exact = low.to(torch.float64)
    want = reference.attention_forward(*exact.args())
    for name, got, ref in (("out", out, want.out), ("iterates", iterates, want.iterates)):
        assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        err = relative_error(got, ref)
        assert err < TOLERANCES[dtype], f"{case_id(case)}: {name} err {err:.3e}"
    assert head_outputs.shape == want.head_outputs.shape and lse.shape == want.lse.shape
    assert diag_values.shape == want.diag_values.shape
    for t in range(case.steps):
        x_t = exact.x if t == 0 else iterates[t - 1].to(torch.float64)
        step = reference.attention_step_at(x_t, exact.x, exact.w_q, exact.w_k, exact.diag, exact.alibi_slopes,
                                           storage=dtype)
        err = relative_error(head_outputs[t], step.head_output.transpose(1, 2))
        assert err < TOLERANCES[dtype], f"{case_id(case)}: head outputs of step {t}: err {err:.3e}"
        if step.diag_value is not None:
            err = relative_error(diag_values[t], step.diag_value)
            assert err < TOLERANCES[dtype], f"{case_id(case)}: diagonal values of step {t}: err {err:.3e}"
        # lse is O(log N): compared absolutely.
        err = (lse[t].double() - step.lse).abs().max().item()
        assert err < 10 * TOLERANCES[dtype], f"{case_id(case)}: lse of step {t}: err {err:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inference_without_saved_state(backend, dtype, rng) -> None:
    backend.require()
    low = cuda_case(backend, dtype, 67, 64, diag="shared", alibi=True, precond="both", steps=3).make(rng)
    with backend.active(), torch.no_grad():
        out = torch.ops.cem.attention(*low.args())
    ref = reference.attention(*low.to(torch.float64).args())
    assert relative_error(out, ref) < TOLERANCES[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("diag", ["none", "shared"])
def test_opcheck(backend, dtype, diag, rng) -> None:
    backend.require()
    inputs = cuda_case(backend, dtype, 19, 64, diag=diag, alibi=True, precond="both", steps=2).make(
        rng, requires_grad=True)
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    detached = inputs.to(dtype).args()
    with backend.active():
        torch.library.opcheck(torch.ops.cem.attention_fwd.default, (*inputs.args(), True), **tol)
        # Without saved state there is no backward: check it as an inference op.
        torch.library.opcheck(torch.ops.cem.attention_fwd.default, (*detached[:-1], 0.3, False), **tol)
        state = torch.ops.cem.attention_fwd(*detached, True)
        grad_out = torch.randn_like(state[0])
        torch.library.opcheck(torch.ops.cem.attention_bwd.default, (grad_out, *detached, *state[1:]), **tol)


@pytest.mark.cuda
def test_runs_on_the_current_stream(rng) -> None:
    """Inputs produced late on a side stream must be seen by the kernels launched on it; a kernel
    on the default stream would read them before they exist."""
    Backend("cuda").require()
    low = cuda_case(Backend("cuda"), torch.float32, 130, 64, diag="shared", alibi=True, precond="both", steps=2).make(rng)
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


@pytest.mark.cuda
def test_cuda_graph_capture(rng) -> None:
    """Capture forward and backward in a CUDA graph: launching on any stream other than the
    capturing one fails during capture."""
    Backend("cuda").require()
    low = cuda_case(Backend("cuda"), torch.float32, 67, 64, diag="shared", alibi=True, precond="both", steps=2).make(rng)
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


@pytest.mark.parametrize("backend", [Backend("cuda"), Backend("emulated")], ids=["cuda", "emulated"])
def test_option_grid_covers_every_value(backend) -> None:
    """Guards against a silently shrunken parametrization."""
    grid = _grid(backend)
    cases = [case for case, _ in grid]
    assert {c.steps for c in cases} == {1, 2, 3, 4}
    assert {(c.precond_diag, c.precond_rank) for c in cases} == set(PRECONDS.values())
    assert {c.alibi for c in cases} == {False, True}
    assert all(c.seq % 64 for c in cases), "every length should leave a ragged tile"
    for dtype, diag in itertools.product(DTYPES.values(), DIAGS):
        sub = [(c, det) for c, det in grid if c.dtype == dtype and c.diag == diag]
        assert {c.alibi for c, _ in sub} == {False, True}
        assert {(c.precond_diag, c.precond_rank) for c, _ in sub} == set(PRECONDS.values())
        assert {det for _, det in sub} == {False, True}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("diag", DIAGS)
def test_deterministic_mode_repeats_bit_for_bit(backend, diag, rng) -> None:
    """torch.use_deterministic_algorithms(True): the same inputs give the same bits, run after
    run (and in emulation whatever the order blocks run in); the atomic default agrees with it
    within rounding."""
    backend.require()
    case = cuda_case(backend, torch.bfloat16, 130, 64, diag=diag, alibi=True, precond="both", steps=2, heads=3)
    inputs = case.make(rng)
    grad = torch.randn(inputs.x.shape, generator=rng).to(torch.bfloat16).to(backend.device)
    runs = []
    for order in ("sequential", "reversed", "shuffled"):
        with backend.active(deterministic=True):
            with cuda_emulation(block_order=order, seed=3) if backend.name == "emulated" else contextlib.nullcontext():
                out, grads = with_gradients(inputs, grad)
        runs.append((out, grads))
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        for name, g in grads.items():
            assert torch.equal(g, runs[0][1][name]), f"grad {name} changed between deterministic runs"
    with backend.active(deterministic=False):
        out, grads = with_gradients(inputs, grad)
    assert relative_error(out, runs[0][0]) < TOLERANCES[torch.bfloat16]
    for name, g in grads.items():
        assert relative_error(g, runs[0][1][name]) < 2e-2, f"grad {name}: atomic and deterministic modes disagree"
