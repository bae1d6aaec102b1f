"""The two ceilings every attention number is read against: the device's dense matrix-product
rate (bf16 on CUDA, float32 on CPU) and its memory-copy bandwidth, measured in the same run."""

from __future__ import annotations

import pytest
import torch

import harness


@pytest.fixture(autouse=True)
def _needs_the_device(ceiling_device: str):
    if ceiling_device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def test_matmul_rate(benchmark, ceiling_device: str):
    cuda = ceiling_device == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(ceiling_device, dtype)
    b = torch.randn(n, n, generator=generator).to(ceiling_device, dtype)

    def run():
        torch.mm(a, b)
        harness.synchronize(ceiling_device)

    run()
    benchmark.extra_info.update(kind="ceiling", what=f"matmul {n}^3 {str(dtype)[6:]}", flops=2.0 * n**3,
                                min_bytes=3.0 * n * n * a.element_size())
    benchmark.pedantic(run, rounds=20 if cuda else 5, warmup_rounds=1, iterations=1)


def test_copy_bandwidth(benchmark, ceiling_device: str):
    cuda = ceiling_device == "cuda"
    numel = (1 << 30) if cuda else (1 << 26)  # 2 GiB of bf16 on CUDA, 256 MiB of float32 on CPU
    src = torch.ones(numel, dtype=torch.bfloat16 if cuda else torch.float32, device=ceiling_device)
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        harness.synchronize(ceiling_device)

    run()
    benchmark.extra_info.update(kind="ceiling", what="device copy", flops=0.0,
                                min_bytes=2.0 * numel * src.element_size())
    benchmark.pedantic(run, rounds=20 if cuda else 5, warmup_rounds=1, iterations=1)
