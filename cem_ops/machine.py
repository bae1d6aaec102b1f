"""Where a result was produced: the CPU, the GPU (name, clocks and driver via nvidia-ml-py), the
software versions, the build of cem_ops and the source revision. Benchmarks and experiment
reports record it next to their numbers."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision(repo: Path) -> dict[str, object]:
    """{"sha", "dirty"} of the checkout at ``repo`` ("unknown" outside one)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        return {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"sha": "unknown", "dirty": None}


def gpu_identity(index: int | None = None) -> dict[str, object]:
    """GPU name, clocks, power limit and driver read with nvidia-ml-py (pynvml), plus torch's view."""
    index = torch.cuda.current_device() if index is None else index
    info: dict[str, object] = {"name": torch.cuda.get_device_name(index),
                               "capability": torch.cuda.get_device_capability(index)}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        info.update(
            nvml_name=pynvml.nvmlDeviceGetName(handle),
            driver=pynvml.nvmlSystemGetDriverVersion(),
            sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            sm_clock_max_mhz=pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            mem_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            mem_clock_max_mhz=pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            power_limit_w=pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000,
            memory_total_gib=pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30,
        )
    except Exception as error:  # the identity is still useful without NVML
        info["nvml_error"] = repr(error)
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe(device: str | torch.device, repo: Path | None = None) -> dict[str, object]:
    """The machine, software and build behind a measurement on ``device``."""
    from . import build_info

    device = torch.device(device)
    info: dict[str, object] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cem_ops_build": build_info(),
    }
    if repo is not None:
        info["git"] = git_revision(repo)
    if device.type == "cuda":
        info["gpu"] = gpu_identity(device.index)
    return info
