"""Loads the compiled extension cem_ops._C, whose import registers every cem op, and refuses a
missing, stale or mismatched binary with a message that says how to rebuild."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ._source_hash import source_hash

REBUILD_HINT = "Build it from the repository root with: pip install --no-build-isolation -e ."


def load_extension():
    try:
        from . import _C
    except ImportError as error:
        raise ImportError(f"cem_ops: the compiled extension cem_ops._C is missing or failed to load ({error}). {REBUILD_HINT}") from error

    if _C.torch_version != torch.__version__:
        raise ImportError(
            f"cem_ops: cem_ops._C was built against torch {_C.torch_version} but torch {torch.__version__} is "
            f"installed; C++ ABIs differ between torch releases. {REBUILD_HINT}"
        )
    root = Path(__file__).resolve().parent.parent
    if (root / "csrc").is_dir() and (root / "CMakeLists.txt").is_file():  # a source checkout
        current = source_hash(root)
        if current != _C.source_hash:
            message = (
                f"cem_ops: cem_ops._C is stale: csrc/ changed since it was built (built from {_C.source_hash}, "
                f"sources are now {current}). {REBUILD_HINT}"
            )
            if os.environ.get("CEM_OPS_ALLOW_STALE") != "1":
                raise ImportError(message + " (CEM_OPS_ALLOW_STALE=1 downgrades this to a warning.)")
            warnings.warn(message, stacklevel=2)
    return _C
