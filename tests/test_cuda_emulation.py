"""The emulated CUDA backend as a tool: its switch and errors, block orders, and bugs planted into
the real attention kernels that its checker must catch:

  a removed __syncthreads   (every barrier site of every attention kernel, one at a time)
  a removed __syncwarp      (every site)
  a divergent barrier       (half of each block skips one)
  an unaligned vector load  (16-byte loads forced onto rows that are not 16-byte aligned)
  a read past a ragged edge (tile loads told K has one more row: caught under AddressSanitizer)

The clean kernels run through the same paths with the checker on (tests/test_cuda_attention.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cem_ops
from cem_ops import _extension
from cem_ops.testing import AttentionCase, cuda_emulation, emulation_available
from cem_ops.testing import emulation

pytestmark = pytest.mark.emulation

ROOT = Path(__file__).resolve().parent.parent
KERNELS = "csrc/cuda/attention_kernels.cuh"


@pytest.fixture
def backend():
    if not emulation_available():
        pytest.skip("cem_ops was built without the emulated CUDA backend (needs the CUDA headers)")
    module = emulation.emulated_backend()
    yield module
    module.set_fault("none", "", 0)
    module.plant("none")


def case(**changes) -> AttentionCase:
    """Two query tiles (the second ragged), every kind of kernel: shared diagonal, ALiBi, both
    preconditioner parts, T = 2."""
    base = AttentionCase(batch=2, seq=70, dim=40, heads=2, head_dim=64, steps=2, diag="shared", alibi=True,
                         precond_diag=True, precond_rank=2, dtype=torch.bfloat16)
    return base.with_(**changes)


def forward_backward(inputs, grad_out: torch.Tensor):
    leaves = inputs.to(inputs.x.dtype, requires_grad=True)
    out = torch.ops.cem.attention(*leaves.args())
    return (out, *torch.autograd.grad(out, leaves.differentiable(), grad_out))


def cuda_headers_present() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return (Path(home) / "include" / "cuda_fp16.h").is_file()


def test_the_emulated_backend_is_built_where_the_cuda_headers_are() -> None:
    """Guards the emulated suite against skipping silently on a machine that could run it."""
    if os.environ.get("CEM_OPS_CUDA_EMULATION", "").strip().lower() in ("0", "off", "false", "no"):
        pytest.skip("CEM_OPS_CUDA_EMULATION=0: built without the emulated backend on purpose")
    if not cuda_headers_present():
        pytest.skip("no CUDA headers here, so no emulated backend is expected")
    info = cem_ops.build_info()
    assert info["cuda_emulation"] is True, f"CUDA headers are present but the emulated backend was not built: {info}"
    assert emulation.emulated_backend().device == "emulated sm_80"


def test_missing_backend_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(_extension, "has_extension", lambda name: name != "_C_emulated")
    monkeypatch.setattr(emulation, "_BACKEND", None)
    with pytest.raises(RuntimeError, match="built without the emulated CUDA backend.*CEM_OPS_CUDA_EMULATION=1"):
        with cuda_emulation():
            pass


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_order="random"), "block_order must be one of"),
    (dict(seed=-1), "seed must be a non-negative integer"),
    (dict(workers=0), "workers must be a positive integer"),
])
def test_bad_settings_name_the_argument(backend, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        with cuda_emulation(**kwargs):
            pass


def test_only_the_block_runs_the_emulation(backend, rng) -> None:
    inputs = case().make(rng)
    backend.reset_stats()
    torch.ops.cem.attention(*inputs.args())
    assert backend.stats()["launches"] == 0, "the CPU kernels should run outside cuda_emulation()"
    with pytest.raises(ZeroDivisionError), cuda_emulation():
        torch.ops.cem.attention(*inputs.args())
        assert backend.stats()["launches"] > 0
        raise ZeroDivisionError  # leaving by an exception restores the switch as well
    launches = backend.stats()["launches"]
    torch.ops.cem.attention(*inputs.args())
    assert backend.stats()["launches"] == launches


@pytest.mark.parametrize("settings", [
    dict(block_order="reversed", workers=1),
    dict(block_order="shuffled", seed=11, workers=1),
    dict(block_order="shuffled", seed=12, workers=2),
    dict(block_order="sequential", workers=2),
], ids=["reversed", "shuffled", "shuffled-2-workers", "2-workers"])
@pytest.mark.parametrize("diag", ["none", "shared", "per_head"])
def test_block_order_does_not_change_results(backend, monkeypatch, diag, settings, rng) -> None:
    """No kernel may depend on the order blocks run in: every order gives the same bits."""
    monkeypatch.setenv("CEM_OPS_PANEL_ROWS", "64")  # several diagonal panels as well
    inputs = case(diag=diag, seq=130).make(rng)
    grad_out = torch.randn(inputs.x.shape, generator=rng).to(inputs.x.dtype)
    with cuda_emulation(block_order="sequential", workers=1):
        want = forward_backward(inputs, grad_out)
    with cuda_emulation(**settings):
        got = forward_backward(inputs, grad_out)
    for w, g in zip(want, got):
        assert torch.equal(w, g)


def sync_sites(backend, kind: str) -> dict[int, set[str]]:
    """{line: kernels} of the attention kernels' `kind` sites reached by a full clean run (a
    template kernel's lines serve several kernels)."""
    generator = torch.Generator().manual_seed(0)
    for diag in ("none", "shared", "per_head"):
        inputs = case(diag=diag).make(generator)
        with cuda_emulation():
            forward_backward(inputs, torch.randn(inputs.x.shape, generator=generator).to(inputs.x.dtype))
    sites: dict[int, set[str]] = {}
    for kernel, site_kind, file, line in backend.sync_sites():
        if site_kind == kind and file.endswith(KERNELS):
            sites.setdefault(line, set()).add(kernel)
    return sites


def planted_failure(backend, fault: str, line: int, rng, **case_changes) -> str:
    """The error of a forward+backward run with `fault` planted at `line` of the kernels."""
    inputs = case(**case_changes).make(rng)
    backend.set_fault(fault, KERNELS, line)
    try:
        with cuda_emulation(), pytest.raises(RuntimeError) as error:
            forward_backward(inputs, torch.randn(inputs.x.shape, generator=rng).to(inputs.x.dtype))
    finally:
        backend.set_fault("none", "", 0)
    return str(error.value)


def test_every_barrier_is_needed_and_its_removal_is_caught(backend, rng) -> None:
    sites = sync_sites(backend, "__syncthreads")
    assert set().union(*sites.values()) >= {
        "attention_fwd_kernel", "attention_bwd_dq_kernel", "attention_bwd_dk_kernel", "attention_bwd_delta_kernel",
        "attention_tile_probs_kernel", "attention_tile_probs_grad_kernel"}, sites
    for line, kernels in sorted(sites.items()):
        message = planted_failure(backend, "drop_barrier", line, rng, seq=130)
        assert "hazard" in message and any(k in message for k in kernels), f"__syncthreads at line {line}: {message}"


def test_every_syncwarp_is_needed_and_its_removal_is_caught(backend, rng) -> None:
    sites = sync_sites(backend, "__syncwarp")
    assert sites, "the attention kernels use __syncwarp"
    for line, kernels in sorted(sites.items()):
        message = planted_failure(backend, "drop_syncwarp", line, rng)
        assert "hazard" in message and any(k in message for k in kernels), f"__syncwarp at line {line}: {message}"


def test_a_divergent_barrier_is_an_error_not_a_hang(backend, rng) -> None:
    line = min(line for line, kernels in sync_sites(backend, "__syncthreads").items() if "attention_fwd_kernel" in kernels)
    message = planted_failure(backend, "divergent_barrier", line, rng)
    assert "not every thread reaches" in message and "attention_fwd_kernel" in message, message


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_an_unaligned_vector_load_is_caught(backend, dtype, rng) -> None:
    inputs = case(head_dim=59, dtype=dtype).make(rng)  # rows of 59 elements: not 16-byte aligned
    backend.plant("force_vector_loads")
    with cuda_emulation(), pytest.raises(RuntimeError, match="not 16-byte aligned.*misaligned vector access"):
        torch.ops.cem.attention(*inputs.args())


def compiler_library(name: str) -> str | None:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    path = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def run_smoke_under_asan(*args: str) -> subprocess.CompletedProcess:
    # libstdc++ is preloaded after ASan so that ASan's exception interceptor finds it at start-up
    # (Python itself does not link it); C++ errors are thrown across it.
    libraries = [compiler_library("libasan.so"), compiler_library("libstdc++.so")]
    if None in libraries:
        pytest.skip("AddressSanitizer's runtime (libasan.so) or libstdc++.so was not found")
    env = dict(os.environ, LD_PRELOAD=" ".join(libraries), ASAN_OPTIONS="detect_leaks=0",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, str(ROOT / "scripts" / "cuda_smoke.py"), "--emulated", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def test_every_kernel_path_stays_in_bounds_under_asan(backend) -> None:
    """Out-of-bounds global accesses: AddressSanitizer knows every tensor's exact size."""
    result = run_smoke_under_asan()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("ok ") == 36, result.stdout


def test_a_read_past_the_ragged_edge_is_caught_under_asan(backend) -> None:
    result = run_smoke_under_asan("--plant", "extra_key_row", "--dtypes", "bf16", "--head-dims", "64")
    assert result.returncode != 0, result.stdout[-2000:]
    assert "outside any live allocation" in result.stderr, result.stderr[-3000:]
