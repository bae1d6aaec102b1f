"""Loads the compiled extensions, whose import registers the ops: cem_ops._C (every cem op) and,
on demand, cem_ops._C_emulated (the CUDA kernels built for the CPU, cem_ops.testing.emulation).
A missing, stale or mismatched binary is refused with a message that says how to rebuild."""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path

import torch

from ._source_hash import source_hash

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_ROOT = PACKAGE_DIR.parent


def _is_source_checkout() -> bool:
    return (SOURCE_ROOT / "csrc").is_dir() and (SOURCE_ROOT / "CMakeLists.txt").is_file()


def rebuild_hint() -> str:
    if _is_source_checkout():
        return f"Build it from the repository root ({SOURCE_ROOT}) with: pip install --no-build-isolation -e ."
    return "Install a cem_ops wheel built for this torch, or build cem_ops from source (see its README)."


def has_extension(name: str) -> bool:
    return any(PACKAGE_DIR.glob(f"{name}.*.so")) or any(PACKAGE_DIR.glob(f"{name}.*.pyd"))


def load_extension(name: str = "_C"):
    if not has_extension(name):
        raise ImportError(f"cem_ops: the compiled extension cem_ops.{name} is not built (no {name}*.so in {PACKAGE_DIR}). "
                          f"{rebuild_hint()}")
    try:
        module = importlib.import_module(f"cem_ops.{name}")
    except ImportError as error:
        raise ImportError(f"cem_ops: the compiled extension cem_ops.{name} failed to load ({error}). {rebuild_hint()}") from error
    if Path(module.__file__).resolve().parent != PACKAGE_DIR:
        # e.g. an editable install of another checkout answering for this one
        raise ImportError(f"cem_ops: cem_ops.{name} was loaded from {module.__file__}, not from this package "
                          f"({PACKAGE_DIR}). {rebuild_hint()}")

    if module.torch_version != torch.__version__:
        raise ImportError(
            f"cem_ops: cem_ops.{name} was built against torch {module.torch_version} but torch {torch.__version__} is "
            f"installed; C++ ABIs differ between torch releases. {rebuild_hint()}"
        )
    if _is_source_checkout():
        current = source_hash(SOURCE_ROOT)
        if current != module.source_hash:
            message = (
                f"cem_ops: cem_ops.{name} is stale: csrc/ changed since it was built (built from {module.source_hash}, "
                f"sources are now {current}). {rebuild_hint()}"
            )
            if os.environ.get("CEM_OPS_ALLOW_STALE", "").strip().lower() not in ("1", "true", "yes", "on"):
                raise ImportError(message + " (CEM_OPS_ALLOW_STALE=1 downgrades this to a warning.)")
            warnings.warn(message, stacklevel=2)
    return module
