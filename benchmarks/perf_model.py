"""A performance model of the CUDA attention path, written before any GPU run: for each kernel
and cuBLAS product of a call, the executed tensor-core FLOPs at an assumed efficiency, the bytes
it moves at the memory bandwidth, and its waves (blocks over SMs x resident blocks); the time is
the larger of the two times divided by the last wave's fill, plus a launch overhead. Totals give
the predicted time and useful TFLOP/s (cem_ops.testing.attention_flops, the benchmarks'
convention; fwd+bwd counts 3.5x the forward) of the first kernels ("v1": WMMA through shared
memory, two passes, separate tile and dQ kernels) and of today's tensor-core kernels ("v2":
mma.sync/ldmatrix/cp.async, S and P in registers, one pass without a diagonal, dQ by atomics).

    python benchmarks/perf_model.py                 # config of record and the benchmark grid, Markdown
    python benchmarks/perf_model.py --gpu h100

Every efficiency below is an assumption (stated in ASSUMPTIONS); after a GPU run the measured
numbers go beside these predictions in benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

GPUS = {
    # dense bf16 matmul rate as measured by cuBLAS (not the datasheet peak), HBM bandwidth, SMs
    "h200": dict(matmul_tflops=800.0, hbm_tbps=4.8, sms=132),
    "h100": dict(matmul_tflops=800.0, hbm_tbps=3.35, sms=132),
}

# Fraction of the measured matmul rate each kind of work reaches, in executed FLOPs.
ASSUMPTIONS = {
    # WMMA with float32 scores through shared memory, 4 warps, synchronous loads: the review's
    # estimate of the first kernels (about 11-13% of 800 TFLOP/s useful) calibrates it.
    "v1_core": 0.12,
    "v2_fwd": 0.42,         # FlashAttention-2's forward at head dim 128 (330-350 of ~800 TFLOP/s)
    "v2_probs_pass": 0.35,  # the second pass over keys that adds P into the panel (atomics)
    "v2_bwd": 0.33,         # FlashAttention-2's backward (its five products at ~260 TFLOP/s)
    "v2_rows": 0.35,        # Delta's pass over keys, the deterministic dQ kernel
    "gemm": 0.80,          # large cuBLAS GEMMs (projections, D-wide panel products)
    "launch_us": 5.0,      # per kernel launch and cuBLAS call
}


@dataclass
class Shape:
    batch: int
    seq: int
    dim: int
    heads: int
    head_dim: int
    steps: int
    diag: str  # "none" | "shared" | "per_head"

    @property
    def tag(self) -> str:
        return (f"B={self.batch} N={self.seq} D={self.dim} H={self.heads} Dh={self.head_dim} T={self.steps} "
                f"{self.diag}")


@dataclass
class Work:
    name: str
    flops: float = 0.0      # executed tensor-core (or GEMM) FLOPs
    bytes: float = 0.0      # HBM traffic
    efficiency: float = 1.0
    blocks: int = 0         # 0: not a tiled kernel (cuBLAS or elementwise)
    resident: int = 1       # blocks per SM
    launches: int = 1


def useful_flops(s: Shape) -> float:
    pairs = s.batch * s.seq * (s.seq + 1) / 2
    projections = 2 * s.batch * s.seq * s.dim * s.heads * s.head_dim * (1 + 2 * s.steps)
    core = s.steps * s.heads * pairs * 2 * (2 * s.head_dim)
    diag_heads = {"none": 0, "shared": 1, "per_head": s.heads}[s.diag]
    return projections + core + s.steps * diag_heads * pairs * 2 * (2 * s.dim)


def tile_pairs(seq: int, rows: int, keys: int) -> float:
    """Executed (row, key) pairs of a causal pass in rows x keys tiles (whole diagonal tiles)."""
    row_tiles = math.ceil(seq / rows)
    return sum(rows * keys * math.ceil(min((r + 1) * rows, seq) / keys) for r in range(row_tiles))


def panel_products(s: Shape, panel_rows: int) -> float:
    """sum over panels of rows x keys: the D-wide GEMM rectangle of the diagonal's panels."""
    return sum(min(panel_rows, s.seq - r0) * min(r0 + panel_rows, s.seq) for r0 in range(0, s.seq, panel_rows))


def panel_rows_of(s: Shape, tile: int) -> int:
    return max(tile, math.ceil(max(256, s.seq // 8) / tile) * tile)


def time_of(w: Work, gpu: dict) -> float:
    compute = w.flops / (w.efficiency * gpu["matmul_tflops"] * 1e12) if w.flops else 0.0
    memory = w.bytes / (gpu["hbm_tbps"] * 1e12)
    t = max(compute, memory)
    if w.blocks:
        wave = gpu["sms"] * w.resident
        waves = math.ceil(w.blocks / wave)
        t /= w.blocks / (waves * wave)  # the partial last wave runs at its fill
    return t + w.launches * ASSUMPTIONS["launch_us"] * 1e-6


def projections(s: Shape, backward: bool) -> list[Work]:
    bn, hd, e = s.batch * s.seq, s.heads * s.head_dim, ASSUMPTIONS["gemm"]
    gemm = 2 * bn * s.dim * hd
    fwd = [Work("K = W_K c", gemm, 2 * (bn * s.dim + bn * hd), e)]
    fwd += [Work("Q, W_Q^T o per step", 2 * s.steps * gemm, 4 * s.steps * (bn * s.dim + bn * hd), e, launches=2 * s.steps)]
    if not backward:
        return fwd
    return fwd + [Work("backward projections (5 per step, dW_K, dc)", (5 * s.steps + 2) * gemm,
                       (5 * s.steps + 2) * 3 * bn * s.dim * 2, e, launches=5 * s.steps + 2)]


def elementwise(s: Shape, passes: float, name: str) -> Work:
    return Work(name, 0.0, passes * s.batch * s.seq * s.dim * 4, launches=int(passes))


def diag_gemms(s: Shape, count: int, tile: int) -> list[Work]:
    if s.diag == "none":
        return []
    rows = panel_rows_of(s, tile)
    per_step = 2 * s.batch * panel_products(s, rows) * s.dim * (1 if s.diag == "shared" else s.heads)
    panels = math.ceil(s.seq / rows)
    return [Work(f"D-wide panel GEMMs ({count} per step and panel)", count * s.steps * per_step,
                 count * s.steps * s.batch * panel_products(s, rows) * 4 * 2, ASSUMPTIONS["gemm"],
                 launches=count * s.steps * panels)]


def core_bytes(s: Shape) -> float:
    """q, k, o (and panels) of one pass, input dtype: a lower bound the tiles stay close to."""
    return 3 * s.batch * s.seq * s.heads * s.head_dim * 2


def v1_works(s: Shape, backward: bool) -> list[Work]:
    bh, e = s.batch * s.heads, ASSUMPTIONS["v1_core"]
    pairs = tile_pairs(s.seq, 64, 64) * bh
    dh = 2 * s.head_dim
    tiles = math.ceil(s.seq / 64)
    diag = s.diag != "none"
    works = projections(s, backward)
    # forward per step: QK^T twice and P K in the fwd kernel, QK^T again in the tile kernel
    works.append(Work("fwd kernel (QK^T x2, PK)", s.steps * 3 * pairs * dh, s.steps * core_bytes(s), e, tiles * bh, 2,
                      s.steps))
    if diag:
        works.append(Work("tile_probs (QK^T, all heads)", s.steps * pairs * dh, s.steps * core_bytes(s), e,
                          tiles * tiles // 2 * s.batch, 1, s.steps))
    works += diag_gemms(s, 2, 64)
    works.append(elementwise(s, 5 * s.steps, "float32 passes over (B, N, D)"))
    if not backward:
        return works
    if diag:
        works.append(Work("bwd_delta (QK^T)", s.steps * pairs * dh, s.steps * core_bytes(s), e, tiles * bh, 2, s.steps))
        works.append(Work("tile_probs grad (QK^T, dO K^T)", s.steps * 2 * pairs * dh, s.steps * core_bytes(s), e,
                          tiles * tiles // 2 * s.batch, 1, s.steps))
    works.append(Work("bwd_dk (S^T, dP^T, 2 dK products)", s.steps * 4 * pairs * dh, s.steps * 2 * core_bytes(s), e,
                      tiles * bh, 2, s.steps))
    works.append(Work("bwd_dq (S, dP, dQ)", s.steps * 3 * pairs * dh, s.steps * 2 * core_bytes(s), e, tiles * bh, 2,
                      s.steps))
    works += diag_gemms(s, 5, 64)
    works.append(elementwise(s, 12 * s.steps, "float32 passes over (B, N, D)"))
    return works


def v2_works(s: Shape, backward: bool) -> list[Work]:
    bh = s.batch * s.heads
    dh = 2 * s.head_dim
    diag = s.diag != "none"
    fwd_pairs = tile_pairs(s.seq, 128, 64) * bh
    rows_pairs = tile_pairs(s.seq, 64, 64) * bh
    works = projections(s, backward)
    # 128 x 64 tiles, 8 warps; resident blocks: registers (~210 x 256 threads) allow one block per SM.
    works.append(Work("fwd kernel (QK^T, PK)", s.steps * 2 * fwd_pairs * dh, s.steps * core_bytes(s),
                      ASSUMPTIONS["v2_fwd"], math.ceil(s.seq / 128) * bh, 1, s.steps))
    if diag:
        works.append(Work("fwd second pass (QK^T, P into the panel)", s.steps * fwd_pairs * dh,
                          s.steps * (core_bytes(s) + 4 * s.batch * panel_products(s, panel_rows_of(s, 128))),
                          ASSUMPTIONS["v2_probs_pass"], math.ceil(s.seq / 128) * bh, 1, 0))
    works += diag_gemms(s, 2, 128)
    works.append(elementwise(s, 2 * s.steps, "float32 passes over (B, N, D)"))
    if not backward:
        return works
    if diag:
        works.append(Work("Delta (QK^T)", s.steps * rows_pairs * dh, s.steps * core_bytes(s), ASSUMPTIONS["v2_rows"],
                          math.ceil(s.seq / 64) * bh, 1, s.steps))
    # key-block outer, 4 warps, 64 keys: S^T, dP^T, two dK products and the dQ product, dQ atomics
    works.append(Work("bwd kernel (S^T, dP^T, dK x2, dQ)", s.steps * 5 * rows_pairs * dh,
                      s.steps * (2 * core_bytes(s) + 2 * 4 * s.batch * s.seq * s.heads * s.head_dim),
                      ASSUMPTIONS["v2_bwd"], math.ceil(s.seq / 64) * bh, 2 if not diag else 1, s.steps))
    works += diag_gemms(s, 5, 128)
    works.append(elementwise(s, 9 * s.steps, "float32 passes over (B, N, D)"))
    return works


def predict(s: Shape, gpu: dict, version: str, backward: bool) -> tuple[float, float]:
    works = (v1_works if version == "v1" else v2_works)(s, backward)
    seconds = sum(time_of(w, gpu) for w in works)
    useful = useful_flops(s) * (3.5 if backward else 1.0)
    return seconds, useful / seconds / 1e12


RECORD = Shape(4, 8192, 1024, 8, 128, 2, "shared")


def grid() -> list[Shape]:
    shapes = []
    for dim, heads, head_dim in ((768, 12, 64), (1024, 8, 128), (2048, 16, 128)):
        for seq in (1024, 2048, 4096, 8192, 16384):
            for steps, diag in ((1, "none"), (2, "shared")):
                shapes.append(Shape(max(1, 32768 // seq), seq, dim, heads, head_dim, steps, diag))
    return shapes


def table(shapes: list[Shape], gpu: dict) -> str:
    rate = gpu["matmul_tflops"]
    lines = ["| shape | v1 fwd ms | v2 fwd ms | v1 fwd TFLOP/s (%) | v2 fwd TFLOP/s (%) | v1 fwd+bwd ms | "
             "v2 fwd+bwd ms | v1 fwd+bwd TFLOP/s (%) | v2 fwd+bwd TFLOP/s (%) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in shapes:
        row = [s.tag]
        cells = {}
        for backward in (False, True):
            for version in ("v1", "v2"):
                cells[(version, backward)] = predict(s, gpu, version, backward)
        for backward in (False, True):
            row += [f"{cells[(v, backward)][0] * 1e3:.2f}" for v in ("v1", "v2")]
            row += [f"{cells[(v, backward)][1]:.0f} ({100 * cells[(v, backward)][1] / rate:.0f}%)" for v in ("v1", "v2")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def breakdown(s: Shape, gpu: dict, version: str, backward: bool) -> str:
    works = (v1_works if version == "v1" else v2_works)(s, backward)
    lines = [f"| {version} {'fwd+bwd' if backward else 'fwd'}: part | executed TFLOP | GB | waves | ms |", "|---|---|---|---|---|"]
    for w in works:
        wave = gpu["sms"] * w.resident
        waves = f"{w.blocks / wave:.2f}" if w.blocks else "-"
        lines.append(f"| {w.name} | {w.flops / 1e12:.2f} | {w.bytes / 1e9:.2f} | {waves} | {time_of(w, gpu) * 1e3:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h200")
    args = parser.parse_args()
    gpu = GPUS[args.gpu]
    print(f"GPU model: {args.gpu} {gpu}; assumptions: {ASSUMPTIONS}\n")
    print("Config of record:\n")
    print(table([RECORD], gpu) + "\n")
    for version in ("v1", "v2"):
        for backward in (False, True):
            print(breakdown(RECORD, gpu, version, backward) + "\n")
    print("Benchmark grid (bf16, B N = 32k tokens):\n")
    print(table(grid(), gpu))


if __name__ == "__main__":
    main()
