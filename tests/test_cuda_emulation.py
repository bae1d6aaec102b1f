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

import itertools
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
KERNEL_SOURCES = "csrc/cuda/"  # the kernels' own sources (the emulation lives in csrc/cuda/emulation/)


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


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(block_order="random"), ValueError, "block_order must be one of"),
    (dict(seed=-1), ValueError, r"seed must be an integer in \[0, 2\*\*64\)"),
    (dict(seed=2**64), ValueError, "seed must be an integer"),
    (dict(seed=True), ValueError, "seed must be an integer"),
    (dict(workers=0), ValueError, "workers must be an integer from 1 to 16"),
    (dict(workers=17), ValueError, "workers must be an integer from 1 to 16"),
    (dict(workers=2**31), ValueError, "workers must be an integer from 1 to 16"),
    (dict(workers=True), ValueError, "workers must be an integer from 1 to 16"),
    (dict(check_hazards="no"), TypeError, "check_hazards must be True or False"),
])
def test_bad_settings_name_the_argument(backend, kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        with cuda_emulation(**kwargs):
            pass


def test_settings_belong_to_the_thread_that_opened_the_block(backend) -> None:
    """Blocks in two host threads, closed in the opposite order: each thread keeps its own."""
    import threading

    opened, a_closed = threading.Event(), threading.Event()
    seen = {}

    def thread_b():
        with cuda_emulation(block_order="shuffled", seed=7, workers=2):
            opened.set()
            a_closed.wait(30)
            seen["b"] = backend.settings()

    with cuda_emulation(block_order="sequential", workers=1):
        outer = backend.settings()
        with cuda_emulation(block_order="reversed", workers=1):
            b = threading.Thread(target=thread_b)
            b.start()
            assert opened.wait(30)
            assert backend.settings() == ("reversed", 0, True, 1)
        a_closed.set()
        b.join(30)
        assert backend.settings() == outer == ("sequential", 0, True, 1)
    assert seen["b"] == ("shuffled", 7, True, 2)


CONCURRENT_LAUNCHES = """
import sys, threading, torch
from cem_ops.testing import AttentionCase, cuda_emulation

def run(seed, workers):
    rng = torch.Generator().manual_seed(seed)
    inputs = AttentionCase(batch=1, seq=33, dim=16, heads=1, head_dim=64, steps=2, diag="shared",
                           dtype=torch.bfloat16).make(rng)
    leaves = inputs.to(inputs.x.dtype, requires_grad=True)
    with cuda_emulation(workers=workers):
        out = torch.ops.cem.attention(*leaves.args())
        return [out, *torch.autograd.grad(out.float().square().sum(), leaves.differentiable())]

want = {seed: run(seed, 1) for seed in (1, 2)}
got, errors = {}, []
def worker(seed, workers):
    try:
        got[seed] = [run(seed, workers) for _ in range(6)]
    except BaseException as e:
        errors.append(repr(e))
threads = [threading.Thread(target=worker, args=(1, 2)), threading.Thread(target=worker, args=(2, 3))]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
for seed, runs in got.items():
    for r in runs:
        assert all(torch.equal(a, b) for a, b in zip(want[seed], r)), f"seed {seed} differs from its 1-thread run"
print("ok")
"""


def test_launches_from_several_host_threads_run_safely(backend, tmp_path) -> None:
    """Two host threads launching at once (each with its own workers) get their single-thread
    results; a hang would be a failure, hence the subprocess with a timeout (started outside
    the checkout: it imports the cem_ops under test, installed or editable)."""
    env = dict(os.environ, CEM_OPS_DETERMINISTIC="1")
    proc = subprocess.run([sys.executable, "-c", CONCURRENT_LAUNCHES], capture_output=True, text=True, timeout=600,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]


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
    """No kernel may depend on the order blocks run in: in the deterministic mode every order
    gives the same bits (the default mode's float atomics may differ in the last bits)."""
    monkeypatch.setenv("CEM_OPS_PANEL_ROWS", "128")  # several diagonal panels as well
    monkeypatch.setenv("CEM_OPS_DETERMINISTIC", "1")
    inputs = case(diag=diag, seq=130).make(rng)
    grad_out = torch.randn(inputs.x.shape, generator=rng).to(inputs.x.dtype)
    with cuda_emulation(block_order="sequential", workers=1):
        want = forward_backward(inputs, grad_out)
    with cuda_emulation(**settings):
        got = forward_backward(inputs, grad_out)
    for w, g in zip(want, got):
        assert torch.equal(w, g)


def kernel_source(file: str) -> str | None:
    """`csrc/cuda/<name>` for a kernel source file, None for anything else."""
    at = file.rfind(KERNEL_SOURCES)
    if at < 0 or "/emulation/" in file[at:]:
        return None
    return file[at:]


def sync_sites(backend, monkeypatch, kind: str) -> dict[tuple[str, int], set[str]]:
    """{(file, line): kernels} of the attention kernels' `kind` sites reached by clean runs of
    every kernel family: bf16 (tensor cores) and float32, every diagonal mode, dQ by atomics and
    deterministically (a template kernel's lines serve several kernels)."""
    generator = torch.Generator().manual_seed(0)
    for deterministic in ("0", "1"):
        monkeypatch.setenv("CEM_OPS_DETERMINISTIC", deterministic)
        for dtype, diag in itertools.product((torch.bfloat16, torch.float32), ("none", "shared", "per_head")):
            inputs = case(diag=diag, dtype=dtype).make(generator)
            with cuda_emulation():
                forward_backward(inputs, torch.randn(inputs.x.shape, generator=generator).to(dtype))
    monkeypatch.delenv("CEM_OPS_DETERMINISTIC")
    for dtype, diag in itertools.product((torch.bfloat16, torch.float32), ("none", "shared", "per_head")):
        decode(dtype, diag, generator)
    sites: dict[tuple[str, int], set[str]] = {}
    for kernel, site_kind, file, line in backend.sync_sites():
        source = kernel_source(file)
        if site_kind == kind and source is not None:
            sites.setdefault((source, line), set()).add(kernel)
    return sites


def decode(dtype: torch.dtype, diag: str, generator: torch.Generator):
    """cem::attention_cached in emulation: 9 chunk rows (two row blocks) against contexts of up
    to 300 keys over 4 x 8 (batch, head) pairs, so that partitions hold several key tiles."""
    inputs = AttentionCase(batch=4, seq=310, dim=24, heads=8, head_dim=8, diag=diag, dtype=dtype).make(generator)
    lengths = [301, 77, 0, 150]
    x = torch.stack([inputs.x[b, n:n + 9] for b, n in enumerate(lengths)])
    with cuda_emulation():
        return cem_ops.attention_cached(
            x, inputs.w_q, inputs.w_k, cache_keys=torch.einsum("bnd,hed->bnhe", inputs.x, inputs.w_k),
            cache_context=inputs.x if inputs.diag is not None else None, cache_lengths=torch.tensor(lengths),
            diag=inputs.diag, alibi_slopes=inputs.alibi_slopes, step_size=inputs.step_size)


def planted_failure(backend, fault: str, site: tuple[str, int], kernels: set[str], rng) -> str:
    """The error of forward+backward runs with `fault` planted at `site`, in a configuration that
    reaches one of `kernels`."""
    file, line = site
    dtype = torch.float32 if any("_tc_" not in k for k in kernels) else torch.bfloat16
    inputs = case(seq=130, dtype=dtype).make(rng)
    backend.set_fault(fault, file, line)
    try:
        if any("decode" in k for k in kernels):
            with pytest.raises(RuntimeError) as error:
                decode(dtype, "shared", rng)
            return str(error.value)
        with cuda_emulation(), pytest.raises(RuntimeError) as error:
            forward_backward(inputs, torch.randn(inputs.x.shape, generator=rng).to(dtype))
            if any("dq_tc" in k for k in kernels):  # the deterministic dQ kernel
                os.environ["CEM_OPS_DETERMINISTIC"] = "1"
                try:
                    forward_backward(inputs, torch.randn(inputs.x.shape, generator=rng).to(dtype))
                finally:
                    del os.environ["CEM_OPS_DETERMINISTIC"]
    finally:
        backend.set_fault("none", "", 0)
    return str(error.value)


def test_every_barrier_is_needed_and_its_removal_is_caught(backend, monkeypatch, rng) -> None:
    sites = sync_sites(backend, monkeypatch, "__syncthreads")
    assert set().union(*sites.values()) >= {
        "attention_fwd_tc_kernel", "attention_bwd_tc_kernel", "attention_delta_tc_kernel", "attention_dq_tc_kernel",
        "attention_fwd_kernel", "attention_bwd_dq_kernel", "attention_bwd_dk_kernel", "attention_bwd_delta_kernel",
        "attention_tile_probs_kernel", "attention_tile_probs_grad_kernel"}, sites
    for site, kernels in sorted(sites.items()):
        message = planted_failure(backend, "drop_barrier", site, kernels, rng)
        assert "hazard" in message and any(k in message for k in kernels), f"__syncthreads at {site}: {message}"


def test_every_syncwarp_is_needed_and_its_removal_is_caught(backend, monkeypatch, rng) -> None:
    sites = sync_sites(backend, monkeypatch, "__syncwarp")
    assert sites, "the float32 attention kernels use __syncwarp"
    for site, kernels in sorted(sites.items()):
        message = planted_failure(backend, "drop_syncwarp", site, kernels, rng)
        assert "hazard" in message and any(k in message for k in kernels), f"__syncwarp at {site}: {message}"


def test_a_divergent_barrier_is_an_error_not_a_hang(backend, monkeypatch, rng) -> None:
    sites = sync_sites(backend, monkeypatch, "__syncthreads")
    site = min(site for site, kernels in sites.items() if "attention_fwd_tc_kernel" in kernels)
    message = planted_failure(backend, "divergent_barrier", site, {"attention_fwd_tc_kernel"}, rng)
    assert "not every thread reaches" in message and "attention_fwd_tc_kernel" in message, message


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_an_unaligned_vector_load_is_caught(backend, dtype, rng) -> None:
    inputs = case(head_dim=59, dtype=dtype).make(rng)  # rows of 59 elements: not 16-byte aligned
    backend.plant("force_vector_loads")
    with cuda_emulation(), pytest.raises(RuntimeError, match="not 16-byte aligned.*misaligned"):
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
    env = dict(os.environ, LD_PRELOAD=" ".join(libraries), ASAN_OPTIONS="detect_leaks=0")
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
