"""Speed and peak memory of one CEM attention call: reference, stock PyTorch (eager and
compiled), a Llama layer and ours, side by side in one run. See harness.py for the conventions.

    pytest benchmarks/test_attention_speed.py --benchmark-json benchmarks/results/<name>.json
    python benchmarks/report.py benchmarks/results/<name>.json
"""

from __future__ import annotations

import pytest
import torch

import harness

# Keep the dense reference to sizes whose N x N scores fit comfortably.
REFERENCE_BYTES_LIMIT = 0.35


def memory_budget(device: str) -> float:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_attention(benchmark, bench_config: harness.Config, impl: str, mode: str):
    config = bench_config
    if config.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if impl == "llama" and (config.steps != 1 or config.diag != "none"):
        pytest.skip("the Llama yardstick does not depend on T or the diagonal: measured once per (B, N, D, H)")
    predicted = config.reference_bytes() * (2 if mode == "forward_backward" else 1)
    dense = impl in ("reference", "stock", "stock_compiled")
    if dense and predicted > REFERENCE_BYTES_LIMIT * memory_budget(config.device):
        pytest.skip(f"{impl} materializes N x N scores: ~{predicted / 2**30:.0f} GiB predicted")
    generator = torch.Generator().manual_seed(0)
    run = harness.make_call(impl, config, mode, generator)
    run()  # warm-up: compilation, allocator, handles
    peak = harness.peak_bytes(run, config.device)
    benchmark.extra_info.update(
        impl=impl,
        mode=mode,
        config=config.label,
        seq=config.seq,
        steps=config.steps,
        diag=config.diag,
        model=f"D{config.dim}-H{config.heads}-Dh{config.head_dim}",
        flops=config.flops(impl, mode),
        min_bytes=config.min_bytes(mode),
        peak_memory_bytes=peak,
        backend=harness.cem_ops.kernel_backends()["attention_fwd"][config.device.upper()] if impl == "ours" else impl,
    )
    rounds = 20 if config.device == "cuda" else max(2, min(10, 4096 // config.seq))
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
