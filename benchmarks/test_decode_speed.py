"""Speed of one decode step (one new token per row) against a long cached context: CEM attention
without and with a shared diagonal beside a Llama layer (SDPA over a KV cache), plus the device's
copy bandwidth measured in the same run, so each step's cache traffic reads as a share of it.

    pytest benchmarks/test_decode_speed.py --bench-device cpu --benchmark-json benchmarks/results/cpu-decode.json
    python benchmarks/decode_report.py benchmarks/results/cpu-decode.json > benchmarks/results/cpu-decode.md
    pytest benchmarks/test_decode_speed.py --bench-device cpu --bench-quick    # a slice, under a minute

Model: D 512, H 8, Dh 64, ALiBi; CEM with T = 2 steps (and T = 1 without a diagonal); float32 on
the CPU, bf16 on CUDA. Caches are filled with random values and their lengths set directly (no
prefill), and every timed call starts from the same length, so the context stays fixed. Before
each timed call the last-level cache is flushed (untimed), as in a model, where the other layers'
caches pass through it between two steps of one layer: the step reads its cache from memory.

Cache bytes read per step (the least a step must read): CEM re-reads its cache once per step t,
T x B x context x bytes_per_token; Llama reads keys and values once, B x context x 2 H Dh x elem.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import harness
from cem_ops.nn import CEMAttention, LlamaAttention

DIM, HEADS = 512, 8
CONTEXTS, BATCHES = (1024, 4096, 16384, 32768), (1, 8, 64)
QUICK_CONTEXTS, QUICK_BATCHES = (1024, 4096), (1, 8)
# Caches above this share of the device's memory are skipped (the rest of the machine needs room).
MEMORY_SHARE = 0.35
# Random positions generated once and repeated along the context: filling GiBs with randn would
# cost more than the measurement, and the step's speed does not depend on the values.
FILL_BLOCK = 1024
COPY_BYTES = 1 << 30
# On a small shared machine another process's build or test run slows every thread-parallel step:
# before each measurement wait until the other processes leave the CPUs (nearly) idle, for at most
# QUIET_WAIT_S over the whole session so that the grid still ends in bounded time.
QUIET_SHARE, QUIET_WAIT_S = 0.05, 240.0
_quiet_wait_left = {"s": QUIET_WAIT_S}


@dataclass(frozen=True)
class DecodeImpl:
    name: str  # cem (no diagonal), cem_shared (shared diagonal), llama
    steps: int | None  # CEM's T; None for Llama

    @property
    def label(self) -> str:
        return self.name if self.steps is None else f"{self.name}-T{self.steps}"

    @property
    def cache_passes(self) -> int:
        """How often one decode step reads the whole cache: once per CEM step, once for Llama."""
        return self.steps or 1

    def make(self, device: str, dtype: torch.dtype, generator: torch.Generator) -> nn.Module:
        if self.name == "llama":
            return LlamaAttention(DIM, HEADS, position="alibi", device=device, dtype=dtype)
        diag = "none" if self.name == "cem" else "shared"
        module = CEMAttention(DIM, HEADS, steps=self.steps, diag=diag, alibi=True, device=device, dtype=dtype)
        if module.diag is not None:
            # The diagonal is initialized to zero; make it non-zero so no path can skip its terms.
            with torch.no_grad():
                module.diag.copy_(0.02 * torch.randn(module.diag.shape, generator=generator))
        return module


IMPLS = (DecodeImpl("cem", 2), DecodeImpl("cem", 1), DecodeImpl("cem_shared", 2), DecodeImpl("llama", None))


def pytest_generate_tests(metafunc):
    if "decode_case" not in metafunc.fixturenames:
        return
    quick = metafunc.config.getoption("--bench-quick")
    contexts, batches = (QUICK_CONTEXTS, QUICK_BATCHES) if quick else (CONTEXTS, BATCHES)
    # Implementations innermost: the ones compared at one (batch, context) run close in time.
    cases = [(impl, context, batch) for batch in batches for context in contexts for impl in IMPLS]
    metafunc.parametrize("decode_case", cases, ids=[f"{i.label}-B{b}-ctx{c}" for i, c, b in cases])


@pytest.fixture
def device(ceiling_device: str) -> str:
    """The --bench-device of conftest (parametrized there as ceiling_device)."""
    if ceiling_device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return ceiling_device


def memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def rounds_for(device: str, tokens: int, quick: bool) -> int:
    """Timed rounds: many for short steps, at least 3 for the longest (the CPU grid takes about
    8 minutes on 2 cores); tokens = batch x context."""
    if device == "cuda":
        return 10 if quick else 50
    rounds = max(3, min(20, (1 << 20) // tokens))
    return min(rounds, 5) if quick else rounds


def last_level_cache_bytes(device: str) -> int:
    if device == "cuda":
        return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or (64 << 20)
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
    return max(sizes, default=64 << 20)


@functools.lru_cache(maxsize=None)
def flush_buffer(device: str) -> torch.Tensor:
    """Twice the last-level cache (at most 1 GiB): reading it evicts whatever was there."""
    size = min(2 * last_level_cache_bytes(device), COPY_BYTES)
    return torch.ones(size // 4, dtype=torch.float32, device=device)


def flush_last_level_cache(device: str) -> None:
    flush_buffer(device).sum()  # a read only: no dirty lines written back during the timed step
    harness.synchronize(device)


def cpu_busy_seconds() -> tuple[float, float] | None:
    """(busy seconds of all CPUs since boot, CPU seconds of this process), or None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle, iowait; steal counts as busy: the cores were not ours
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK"), sum(os.times()[:2])


def others_cpu_share(measure: Callable[[], None]) -> float | None:
    """Run ``measure``; the share of the machine's CPU time other processes took meanwhile (on a
    small machine a concurrent build or test run slows every thread-parallel step)."""
    before, start = cpu_busy_seconds(), time.perf_counter()
    measure()
    after, wall = cpu_busy_seconds(), time.perf_counter() - start
    if before is None or after is None:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others / (wall * (os.cpu_count() or 1)))


def wait_for_quiet() -> float:
    """Seconds spent waiting for the other processes to take under QUIET_SHARE of the CPUs."""
    start = time.perf_counter()
    while _quiet_wait_left["s"] > 0:
        share = others_cpu_share(lambda: time.sleep(0.5))
        if share is None or share < QUIET_SHARE:
            break
        _quiet_wait_left["s"] -= 0.5
    return time.perf_counter() - start


def fill_random(storage: torch.Tensor, context: int, generator: torch.Generator) -> None:
    """Random values in positions [0, context) of a (B, capacity, ...) cache tensor."""
    block = min(FILL_BLOCK, context)
    pattern = torch.randn((storage.shape[0], block, *storage.shape[2:]), generator=generator)
    pattern = pattern.to(storage.device, storage.dtype)
    for start in range(0, context, block):
        count = min(block, context - start)
        storage[:, start:start + count].copy_(pattern[:, :count])


def test_copy_bandwidth(benchmark, device: str):
    """A 1 GiB tensor copied into another (1 GiB read + 1 GiB written): the streaming ceiling
    (first, so that a long grid cannot leave it to a busier moment)."""
    numel = COPY_BYTES // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)
        harness.synchronize(device)

    benchmark.extra_info.update(kind="ceiling", what="copy 1 GiB", device=device, threads=torch.get_num_threads(),
                                bytes_moved=2 * numel * src.element_size(), waited_for_quiet_s=wait_for_quiet())
    benchmark.extra_info["others_cpu_share"] = others_cpu_share(
        lambda: benchmark.pedantic(copy, rounds=20 if device == "cuda" else 7, warmup_rounds=1, iterations=1))


def test_decode_step(benchmark, device: str, decode_case: tuple[DecodeImpl, int, int], request):
    impl, context, batch = decode_case
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    module = impl.make(device, dtype, generator)
    bytes_per_token = module.new_cache(batch, 1).bytes_per_token
    capacity = context + 1  # room for the one token each step appends
    cache_bytes = batch * capacity * bytes_per_token
    budget = MEMORY_SHARE * memory_bytes(device)
    if cache_bytes > budget:
        pytest.skip(f"{impl.label} B{batch} context {context}: its cache of {cache_bytes / 2**30:.1f} GiB exceeds the "
                    f"budget of {budget / 2**30:.1f} GiB ({MEMORY_SHARE:.0%} of the {device}'s memory)")
    cache = module.new_cache(batch, capacity)
    for name in ("keys", "values", "context"):
        storage = getattr(cache, name, None)
        if storage is not None:
            fill_random(storage, context, generator)
    x = torch.randn(batch, 1, DIM, generator=generator).to(device, dtype)

    def reset_context() -> None:
        cache.lengths.fill_(context)  # the step appended a token: back to the same context
        flush_last_level_cache(device)

    def decode_step() -> None:
        with torch.no_grad():
            module(x, cache=cache)
        harness.synchronize(device)

    benchmark.extra_info.update(
        kind="decode",
        impl=impl.name,
        label=impl.label,
        steps=impl.steps,
        context=context,
        batch=batch,
        model=f"D{DIM}-H{HEADS}-Dh{DIM // HEADS}",
        dtype=str(dtype).removeprefix("torch."),
        device=device,
        threads=torch.get_num_threads(),
        cache_bytes_per_token=bytes_per_token,
        cache_bytes_read=impl.cache_passes * batch * context * bytes_per_token,
        cache_nbytes=cache.nbytes,
        flushed_cache_bytes=flush_buffer(device).nbytes,
    )
    rounds = rounds_for(device, batch * context, request.config.getoption("--bench-quick"))
    benchmark.extra_info["waited_for_quiet_s"] = wait_for_quiet()
    benchmark.extra_info["others_cpu_share"] = others_cpu_share(
        lambda: benchmark.pedantic(decode_step, setup=reset_context, rounds=rounds, warmup_rounds=1, iterations=1))
