"""Peak CPU memory of one forward+backward call, ours against the dense reference, as N grows:
the fused CPU path must stay linear in N (issue: N = 16k in bounded memory).

    python benchmarks/cpu_memory.py                     # writes benchmarks/results/cpu-memory.{json,md}
    python benchmarks/cpu_memory.py --seqs 1024 2048 --out /tmp/mem    # /tmp/mem.{json,md}

Memory is counted by cem_testing::cpu_allocation_probe, which wraps the CPU allocator: the peak of
tensor bytes allocated during the call and alive at once (inputs made before the call excluded).
A reference size whose predicted need (4x the previous size's peak) exceeds half the machine's RAM
is not run, and the prediction is recorded instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

from cem_ops.testing import cpu_peak_bytes  # noqa: E402

SEQS = (2048, 8192, 16384)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Peak CPU memory of one forward+backward call as N grows, "
                                     "ours against the dense reference.")
    parser.add_argument("--seqs", type=int, nargs="+", default=list(SEQS), help=f"sequence lengths (default {SEQS})")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "cpu-memory",
                        help="output path without suffix (default benchmarks/results/cpu-memory)")
    args = parser.parse_args()
    if any(n < 1 for n in args.seqs):
        parser.error("--seqs must be positive")
    return args


def main() -> None:
    args = parse_args()
    seqs = sorted(set(args.seqs))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = []
    for impl in ("ours", "reference"):
        previous = None
        for seq in seqs:
            config = harness.Config(1, seq, 256, 4, 64, 2, "shared", True, torch.float32, "cpu")
            predicted = None if previous is None else 4 * previous
            if impl == "reference" and predicted is not None and predicted > ram / 2:
                rows.append(dict(impl=impl, seq=seq, peak_bytes=None, predicted_bytes=predicted, seconds=None))
                print(f"{impl:9s} N={seq:6d} not run: ~{predicted / 2**30:.1f} GiB predicted", flush=True)
                continue
            run = harness.make_call(impl, config, "forward_backward", torch.Generator().manual_seed(0))
            start = time.perf_counter()
            peak = cpu_peak_bytes(run)
            seconds = time.perf_counter() - start
            previous = peak
            rows.append(dict(impl=impl, seq=seq, peak_bytes=peak, predicted_bytes=None, seconds=seconds))
            print(f"{impl:9s} N={seq:6d} peak {peak / 2**20:9.1f} MiB  ({seconds:.1f} s)", flush=True)

    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    identity = harness.machine_identity("cpu")
    config = "B=1, D=256, H=4, Dh=64, T=2, shared diagonal, ALiBi, float32, forward+backward"
    out.with_suffix(".json").write_text(json.dumps(dict(machine=identity, config=config, rows=rows), indent=1))
    lines = [f"# CPU peak memory, {config}", "", f"Machine: {identity['cpu']} ({identity['cpu_count']} cores), "
             f"torch {identity['torch']}, git {identity['git']['sha'][:10]}", "",
             "| N | ours peak MiB | reference peak MiB | reference / ours |", "|---|---|---|---|"]
    for seq in seqs:
        ours = next(r for r in rows if r["impl"] == "ours" and r["seq"] == seq)
        ref = next(r for r in rows if r["impl"] == "reference" and r["seq"] == seq)
        if ref["peak_bytes"] is None:
            ref_text, ratio = f"not run (~{ref['predicted_bytes'] / 2**20:.0f} predicted)", ""
        else:
            ref_text, ratio = f"{ref['peak_bytes'] / 2**20:.1f}", f"{ref['peak_bytes'] / ours['peak_bytes']:.1f}x"
        lines.append(f"| {seq} | {ours['peak_bytes'] / 2**20:.1f} | {ref_text} | {ratio} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
