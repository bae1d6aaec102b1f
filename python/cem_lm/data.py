"""The corpus: the running Python's standard-library sources as bytes (vocabulary 256), split
by file into train/val/test with a rule that depends only on each file's relative path.

Available offline on any machine with Python, but each Python version ships different sources,
so the manifest records the file list, byte counts and a SHA-256 of each split.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.90, "val": 0.05, "test": 0.05}
# Test suites are excluded: they are large, repetitive and not what the library itself looks like.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
DOCUMENT_END = 0  # one NUL byte after each file; no stdlib source contains NUL


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: Path) -> list[str]:
    """Relative POSIX paths of the *.py files under root, sorted, outside excluded directories."""
    paths = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS]  # prune: never walk site-packages
        rel_dir = Path(directory).relative_to(root)
        paths.extend((rel_dir / name).as_posix() for name in names if name.endswith(".py"))
    return sorted(paths)


def split_of(rel_path: str) -> str:
    """train/val/test from the first 8 bytes of SHA-256(path): stable across machines and runs."""
    u = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big") / 2**64
    cumulative = 0.0
    for split in SPLITS:
        cumulative += SPLIT_FRACTIONS[split]
        if u < cumulative:
            return split
    return SPLITS[-1]


@dataclass
class Corpus:
    tokens: dict[str, Tensor]  # split -> 1-D uint8 byte stream
    manifest: dict


def load_corpus(root: Path | None = None) -> Corpus:
    root = Path(root) if root is not None else stdlib_root()
    files = list_source_files(root)
    if not files:
        raise FileNotFoundError(f"no *.py files found under {root}")
    chunks: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    listing: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for rel in files:
        data = (root / rel).read_bytes()
        split = split_of(rel)
        chunks[split].append(data + bytes([DOCUMENT_END]))
        listing[split].append({"path": rel, "bytes": len(data)})

    tokens, summary = {}, {}
    for split in SPLITS:
        stream = b"".join(chunks[split])
        if not stream:
            raise ValueError(f"split {split!r} is empty ({len(files)} files under {root})")
        tokens[split] = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
        summary[split] = {
            "num_files": len(listing[split]),
            "bytes": len(stream),
            "sha256": hashlib.sha256(stream).hexdigest(),
            "files": listing[split],
        }
    manifest = {
        "corpus": "Python standard library sources (*.py)",
        "python_version": platform.python_version(),
        "stdlib_root": str(root),
        "excluded_dirs": sorted(EXCLUDED_DIRS),
        "split_rule": "sha256(relative path)[:8] as a fraction of 2^64, cut at the cumulative split fractions",
        "split_fractions": SPLIT_FRACTIONS,
        "document_end_byte": DOCUMENT_END,
        "splits": summary,
    }
    return Corpus(tokens, manifest)


def manifest_summary(manifest: dict) -> dict:
    """The manifest without the file lists: what every results file carries."""
    out = {k: v for k, v in manifest.items() if k != "splits"}
    out["splits"] = {s: {k: v for k, v in info.items() if k != "files"} for s, info in manifest["splits"].items()}
    return out


def sample_batch(stream: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random windows of seq_len + 1 bytes -> (inputs, next-byte targets), each (B, N) int64."""
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=generator)
    windows = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def eval_windows(stream: Tensor, seq_len: int, max_windows: int | None = None) -> Tensor:
    """Fixed, evenly spaced, non-overlapping windows of seq_len + 1 bytes, (W, N + 1) int64.

    The same windows for every model, so evaluations compare like with like; with max_windows
    the subset still spans the whole split rather than its first files.
    """
    available = (stream.numel() - 1) // seq_len
    count = available if max_windows is None else min(max_windows, available)
    starts = torch.linspace(0, (available - 1) * seq_len, count).long()
    starts = starts - starts % seq_len  # keep windows on the non-overlapping grid
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()]).long()
