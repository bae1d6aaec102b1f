"""Which backend runs each kernel op, and the reference fallback for backends without one."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.autograd import forward_ad

# Ops that need a backend implementation; the public ops are composites over these.
KERNEL_OPS = ("attention_fwd", "attention_bwd", "attention_cached", "mlp_fwd", "mlp_bwd")
DEVICES = ("CPU", "CUDA")

_fallback_lib = torch.library.Library("cem", "FRAGMENT")


def has_compiled_kernel(op: str, device: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"cem::{op}", device)


def register_reference_fallback(op: str, fn: Callable) -> None:
    """Run the reference for every backend that has no compiled kernel of its own (compiled
    CPU and CUDA kernels are registered on their own keys and take precedence)."""

    @functools.wraps(fn)
    def in_input_dtype(*args):
        # Like the compiled kernels: compute in the inputs' dtype even when autograd runs this
        # backward under the caller's torch.autocast.
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        if device not in ("cpu", "cuda"):
            return fn(*args)
        with torch.autocast(device, enabled=False):
            return fn(*args)

    _fallback_lib.impl(op, in_input_dtype, "CompositeExplicitAutograd")


def register_no_double_backward(op: str) -> None:
    """The explicit backward ops are not themselves differentiable: say so when asked."""

    def refuse(ctx, *grads):
        raise NotImplementedError(
            f"cem::{op} is not differentiable: double backward (create_graph=True) through cem ops is not supported"
        )

    torch.library.register_autograd(f"cem::{op}", refuse, setup_context=lambda ctx, inputs, output: None)


def check_devices_in_fake(op: str, x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """The kernels' device check, for the fake (meta) implementations: a meta tensor among real
    ones dispatches there, and must get the same error as on the kernels' path."""
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"cem::{op}: {name} must be on the device of x ({x.device}), got {t.device}")


def refuse_forward_mode_ad(op: str, *tensors: torch.Tensor | None) -> None:
    """The ops have reverse-mode derivatives only. Without this check, forward-mode AD (jvp,
    jacfwd, torch.autograd.forward_ad) through a custom op silently yields zero tangents."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is not None and forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"cem::{op} has no forward-mode derivative (jvp, jacfwd, torch.autograd.forward_ad); "
                "use reverse mode (backward, torch.autograd.grad)"
            )


def register_autocast(op: str) -> None:
    """Under torch.autocast the op runs in the autocast dtype, as matmul-like ops do: every
    floating input is cast to it (the ops require one dtype for all their tensors)."""

    def for_device(device_type: str) -> Callable:
        def kernel(*args):
            dtype = torch.get_autocast_dtype(device_type)
            cast = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            with torch.autocast(device_type, enabled=False):
                return getattr(torch.ops.cem, op).default(*cast)

        return kernel

    for key, device_type in (("AutocastCPU", "cpu"), ("AutocastCUDA", "cuda")):
        _fallback_lib.impl(op, for_device(device_type), key)


def kernel_backends() -> dict[str, dict[str, str]]:
    """{op: {device: "compiled" | "reference"}} for the ops that do the work."""
    return {
        op: {device: "compiled" if has_compiled_kernel(op, device) else "reference" for device in DEVICES}
        for op in KERNEL_OPS
    }


def cuda_attention_kernels() -> dict[str, tuple[int, ...]]:
    """{dtype: head-dim buckets} of the compiled CUDA attention kernels, e.g. {"bf16": (64, 128)};
    empty for a CPU-only build. Other configurations run the reference on CUDA."""
    from .. import _C

    table: dict[str, tuple[int, ...]] = {}
    for entry in getattr(_C, "cuda_attention_kernels", "").split():
        dtype, _, dims = entry.partition(":")
        table[dtype] = tuple(int(d) for d in dims.split(",") if d)
    return table


def build_info() -> dict[str, object]:
    """How cem_ops._C was built, which backends run each op, and whether the emulated CUDA
    backend (cem_ops.testing.cuda_emulation) was built."""
    from .. import _C
    from ..testing.emulation import emulation_available

    return {
        "torch_version": _C.torch_version,
        "source_hash": _C.source_hash,
        "with_cuda": bool(_C.with_cuda),
        "cuda_archs": _C.cuda_archs,
        "cuda_attention_kernels": cuda_attention_kernels(),
        "cuda_emulation": emulation_available(),
        "kernels": kernel_backends(),
    }
