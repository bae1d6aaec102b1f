"""The CMake floor: CMakeLists.txt declares a minimum version, and the CUDA build (with the
emulated backend) must configure with exactly that version, not only with the newest CMake."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CMAKE_LISTS = ROOT / "CMakeLists.txt"


def declared_floor() -> str:
    match = re.search(r"cmake_minimum_required\(VERSION (\d+\.\d+)\)", CMAKE_LISTS.read_text())
    assert match, "CMakeLists.txt declares no cmake_minimum_required(VERSION x.y)"
    return match.group(1)


def cmake_of_version(version: str) -> Path:
    """A CMake x.y binary: CEM_OPS_FLOOR_CMAKE, else the PyPI wheel of that version, installed
    once under build/ (skips with the reason where it cannot be had)."""
    if os.environ.get("CEM_OPS_FLOOR_CMAKE"):
        return Path(os.environ["CEM_OPS_FLOOR_CMAKE"])
    target = ROOT / "build" / f"cmake-{version}"
    binary = target / "cmake" / "data" / "bin" / "cmake"
    if not binary.is_file():
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--target", str(target), f"cmake=={version}.*"],
            capture_output=True, text=True, timeout=300)
        if result.returncode != 0 or not binary.is_file():
            pytest.skip(f"CMake {version} could not be installed from PyPI: {result.stderr.strip()[-300:]}")
    return binary


def test_cuda_build_configures_with_the_declared_cmake_floor(tmp_path):
    if not CMAKE_LISTS.is_file():
        pytest.skip("not a source checkout: no CMakeLists.txt")
    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    if not nvcc.is_file() or torch.version.cuda is None or shutil.which("ninja") is None:
        pytest.skip("needs nvcc, ninja and a CUDA build of torch to configure the CUDA build")
    floor = declared_floor()
    cmake = cmake_of_version(floor)
    version = subprocess.run([str(cmake), "--version"], capture_output=True, text=True, check=True).stdout
    assert f"cmake version {floor}." in version, version

    result = subprocess.run(
        [str(cmake), "-S", str(ROOT), "-B", str(tmp_path), "-G", "Ninja", f"-DPython3_EXECUTABLE={sys.executable}",
         "-DCEM_OPS_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DCEM_OPS_CUDA_EMULATION=ON",
         f"-DCEM_OPS_CUDA_INCLUDE_DIR={nvcc.parent.parent / 'include'}"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "cem_ops: CUDA" in result.stdout and "emulated CUDA backend" in result.stdout
    # Every .cu unit compiles as C++17: the dialect an older CMake can ask nvcc for.
    cuda_units = re.findall(r"^build \S+\.cu\.o: CUDA_COMPILER\S*[^\n]*\n((?:  [^\n]*\n)+)",
                            (tmp_path / "build.ninja").read_text(), flags=re.MULTILINE)
    assert len(cuda_units) >= 2, "no CUDA units in build.ninja"
    assert all(re.search(r"^  FLAGS = .*-std=c\+\+17\b", unit, flags=re.MULTILINE) for unit in cuda_units)
