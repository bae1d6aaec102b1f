"""Fingerprint of the compiled sources. setup.py bakes it into _C; an editable install compares
it on import so that a binary older than csrc/ is refused instead of silently used."""

from __future__ import annotations

import hashlib
from pathlib import Path

SOURCE_SUFFIXES = {".cpp", ".h", ".cu", ".cuh", ".py", ".cmake"}


def source_files(root: Path) -> list[Path]:
    files = [p for p in (root / "csrc").rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES]
    return sorted(files) + [root / "CMakeLists.txt"]


def source_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in source_files(root):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
