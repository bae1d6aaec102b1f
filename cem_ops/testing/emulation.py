"""The CUDA kernels on the CPU: ``with cuda_emulation():`` makes cem_ops.attention and the
attention_fwd / attention_bwd ops on CPU tensors run the CUDA glue and kernels, compiled for the
CPU against an emulation of the GPU (cem_ops._C_emulated, docs/cuda-emulation.md), instead of the
fast CPU kernels. Each CUDA thread runs as a fiber; shared-memory races, out-of-bounds and
misaligned accesses and divergent barriers fail the op with a report naming the kernel, block,
thread and offset. Inputs in bfloat16/float16 stay in their dtype, as on a GPU.

The switch is per host thread (autograd's CPU backward runs on the calling thread, so gradients
take the emulated path too); outside the block the CPU keeps its C++ kernels. The emulator's
settings (block order, seed, checks, workers) are per host thread too: the innermost block the
thread has open. Launches from several host threads run one at a time.
"""

from __future__ import annotations

import contextlib
import os
import threading
from types import ModuleType
from typing import Iterator

BLOCK_ORDERS = ("sequential", "reversed", "shuffled")
MAX_WORKERS = 16  # the emulator's host threads


_BACKEND: ModuleType | None = None
_OPEN = threading.local()  # .settings: this thread's open cuda_emulation() blocks, innermost last


def _open_settings() -> list[tuple]:
    if not hasattr(_OPEN, "settings"):
        _OPEN.settings = []
    return _OPEN.settings


def emulated_backend() -> ModuleType:
    """cem_ops._C_emulated, checked like cem_ops._C (once); a clear error when it was not built."""
    global _BACKEND
    if _BACKEND is not None:
        return _BACKEND
    from .. import _extension

    if not _extension.has_extension("_C_emulated"):
        raise RuntimeError(
            "cem_ops was built without the emulated CUDA backend (cem_ops._C_emulated): it needs the CUDA "
            "toolkit's headers (cuda_fp16.h; nvcc is not needed). Set CUDA_HOME to a toolkit and rebuild with "
            f"CEM_OPS_CUDA_EMULATION=1. {_extension.rebuild_hint()}"
        )
    _BACKEND = _extension.load_extension("_C_emulated")
    return _BACKEND


def emulation_available() -> bool:
    """Whether this installation has the emulated CUDA backend."""
    from .. import _extension

    return _extension.has_extension("_C_emulated")


def default_workers() -> int:
    """Host threads for the blocks of a launch: the cores this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@contextlib.contextmanager
def cuda_emulation(*, block_order: str = "sequential", seed: int = 0, check_hazards: bool = True,
                   workers: int | None = None) -> Iterator[ModuleType]:
    """Run the CUDA attention path on CPU tensors inside the block (see the module docstring).

    Args:
        block_order: "sequential", "reversed" or "shuffled": the order blocks of a launch run in
            (and, when shuffled, the order a block's threads resume in), to expose assumptions
            about ordering between blocks.
        seed: the seed of the shuffled orders.
        check_hazards: the shared-memory race detector (bounds, alignment and divergent barriers
            are always checked).
        workers: host threads that run the blocks of a launch side by side (each block on one;
            1 to MAX_WORKERS = 16; None: default_workers()). With 1, blocks run strictly in
            block_order.

    Yields the emulated backend module (its ``stats()`` counts launches, blocks, context switches
    and checked accesses).
    """
    if block_order not in BLOCK_ORDERS:
        raise ValueError(f"block_order must be one of {BLOCK_ORDERS}, got {block_order!r}")
    if not _is_int(seed) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if not isinstance(check_hazards, bool):
        raise TypeError(f"check_hazards must be True or False, got {check_hazards!r}")
    workers = default_workers() if workers is None else workers
    if not _is_int(workers) or not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be an integer from 1 to {MAX_WORKERS}, got {workers!r}")
    backend = emulated_backend()
    from .. import _C

    settings = (block_order, seed, check_hazards, workers)
    open_settings = _open_settings()
    backend.configure(*settings)
    open_settings.append(settings)
    previous = _C._set_cuda_emulation(True)
    try:
        yield backend
    finally:
        _C._set_cuda_emulation(previous)
        open_settings.pop()
        if open_settings:  # an enclosing block gets its settings back
            backend.configure(*open_settings[-1])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
