"""Loads the compiled extension cem_ops._C, whose import registers every cem op, and refuses a
missing, stale or mismatched binary with a message that says how to rebuild."""

from __future__ import annotations

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


def load_extension():
    if not any(PACKAGE_DIR.glob("_C*.so")) and not any(PACKAGE_DIR.glob("_C*.pyd")):
        raise ImportError(f"cem_ops: the compiled extension cem_ops._C is not built (no _C*.so in {PACKAGE_DIR}). "
                          f"{rebuild_hint()}")
    try:
        from . import _C
    except ImportError as error:
        raise ImportError(f"cem_ops: the compiled extension cem_ops._C failed to load ({error}). {rebuild_hint()}") from error
    if Path(_C.__file__).resolve().parent != PACKAGE_DIR:
        # e.g. an editable install of another checkout answering for this one
        raise ImportError(f"cem_ops: cem_ops._C was loaded from {_C.__file__}, not from this package ({PACKAGE_DIR}). "
                          f"{rebuild_hint()}")

    if _C.torch_version != torch.__version__:
        raise ImportError(
            f"cem_ops: cem_ops._C was built against torch {_C.torch_version} but torch {torch.__version__} is "
            f"installed; C++ ABIs differ between torch releases. {rebuild_hint()}"
        )
    if _is_source_checkout():
        current = source_hash(SOURCE_ROOT)
        if current != _C.source_hash:
            message = (
                f"cem_ops: cem_ops._C is stale: csrc/ changed since it was built (built from {_C.source_hash}, "
                f"sources are now {current}). {rebuild_hint()}"
            )
            if os.environ.get("CEM_OPS_ALLOW_STALE", "").strip().lower() not in ("1", "true", "yes", "on"):
                raise ImportError(message + " (CEM_OPS_ALLOW_STALE=1 downgrades this to a warning.)")
            warnings.warn(message, stacklevel=2)
    return _C
