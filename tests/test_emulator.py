"""The CUDA emulation itself, through two standalone programs of device code:

  tests/cuda/primitive_layouts.cu  mma.sync m16n8k16, ldmatrix (x1/x2/x4, .trans) and cp.async
                                   against plain matrix products, with fragments built from
                                   the PTX ISA's formulas. Built for the emulation here, and with
                                   nvcc for the GPU when one is present (the device twin: it proves
                                   the emulated layouts are the hardware's).
  tests/cuda/checker_cases.cu      one kernel per kind of bug the checker must report (races,
                                   bounds, alignment, divergent barriers and warp operations,
                                   cp.async misuse, launch limits), each beside its correct twin.

Both are compiled like the emulated backend's kernels (the compiler and flags it reports), with
its emulator unit, csrc/cuda/emulation/emulator.cpp.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cem_ops.testing import emulation_available
from cem_ops.testing.emulation import emulated_backend

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ROOT / "tests" / "cuda"


def build(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"build failed: {shlex.join(command)}\n{result.stderr[-4000:]}"


def compile_emulated(source: Path, out_dir: Path) -> Path:
    """An executable of `source` (device code) linked with the emulator, built as the backend's
    kernels are."""
    if not emulation_available():
        pytest.skip("cem_ops was built without the emulated CUDA backend (needs the CUDA headers)")
    backend = emulated_backend()
    cxx = backend.cxx_compiler
    common = ["-std=c++20", "-O1", "-g", "-DCEM_CUDA_EMULATION", f"-I{ROOT / 'csrc'}", f"-I{backend.cuda_include_dir}"]
    emulator = out_dir / "emulator.o"
    if not emulator.exists():
        build([cxx, *common, "-c", str(ROOT / "csrc/cuda/emulation/emulator.cpp"), "-o", str(emulator)])
    program = out_dir / source.stem
    build([cxx, *common, *shlex.split(backend.kernel_flags), "-x", "c++", str(source), "-x", "none", str(emulator),
           "-ldl", "-o", str(program)])
    return program


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("emulated_programs")


def run_program(program: Path, *args: str) -> str:
    result = subprocess.run([str(program), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{program.name} failed:\n{result.stdout}\n{result.stderr}"
    assert "FAIL" not in result.stdout, result.stdout
    return result.stdout


@pytest.mark.emulation
def test_primitive_layouts_in_emulation(build_dir) -> None:
    program = compile_emulated(PROGRAMS / "primitive_layouts.cu", build_dir)
    out = run_program(program, str(random.SystemRandom().randrange(2**31)))
    assert out.count("PASS") == 13, out  # every check ran


@pytest.mark.emulation
def test_checker_reports_every_planted_bug(build_dir) -> None:
    program = compile_emulated(PROGRAMS / "checker_cases.cu", build_dir)
    out = run_program(program)
    assert "every checker case behaved" in out, out


@pytest.mark.cuda
def test_primitive_layouts_on_the_gpu(tmp_path) -> None:
    """The device twin of the emulated layout test."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none is visible)")
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.exists(nvcc):
        pytest.skip("needs nvcc to build the device twin")
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
    program = tmp_path / "primitive_layouts"
    build([nvcc, "-std=c++17", f"-arch={arch}", f"-I{ROOT / 'csrc'}", "-o", str(program),
           str(PROGRAMS / "primitive_layouts.cu")])
    out = run_program(program, str(random.SystemRandom().randrange(2**31)))
    assert out.count("PASS") == 13, out
