"""pytest-benchmark setup: the device grid to run (--bench-device) and the machine's identity
recorded in the JSON (GPU name, clocks and driver via nvidia-ml-py; CPU model; versions; git SHA)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--bench-device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="device whose grid runs (auto: cuda when available)")
    parser.addoption("--bench-quick", action="store_true", help="a small slice of the grid (see harness.py)")
    parser.addoption("--bench-impls", default="all",
                     help=f"comma-separated implementations to measure, of {', '.join(harness.IMPLEMENTATIONS)}")


def bench_device(config) -> str:
    choice = config.getoption("--bench-device")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def bench_impls(config) -> list[str]:
    choice = config.getoption("--bench-impls")
    if choice == "all":
        return list(harness.IMPLEMENTATIONS)
    impls = [name.strip() for name in choice.split(",") if name.strip()]
    unknown = [name for name in impls if name not in harness.IMPLEMENTATIONS]
    if unknown or not impls:
        raise pytest.UsageError(f"--bench-impls: unknown {unknown or choice!r}; "
                                f"expected a comma-separated subset of {', '.join(harness.IMPLEMENTATIONS)}")
    return impls


def pytest_generate_tests(metafunc):
    if "ceiling_device" in metafunc.fixturenames:
        metafunc.parametrize("ceiling_device", [bench_device(metafunc.config)])
    if "bench_config" not in metafunc.fixturenames:
        return
    device = bench_device(metafunc.config)
    quick = metafunc.config.getoption("--bench-quick")
    grid = harness.cuda_grid(quick) if device == "cuda" else harness.cpu_grid(quick)
    metafunc.parametrize("bench_config", grid, ids=lambda c: c.label)
    metafunc.parametrize("impl", bench_impls(metafunc.config))
    metafunc.parametrize("mode", harness.MODES)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["cem_ops"] = harness.machine_identity(bench_device(config))
