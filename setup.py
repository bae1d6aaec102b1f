"""Builds cem_ops._C by driving CMake + Ninja (CMakeLists.txt is the one build description).

Environment:
  CEM_OPS_CUDA=0|1        force the CUDA kernels off or on (also off/on, false/true, no/yes; default: on
                          when torch has CUDA and nvcc is found)
  CEM_OPS_CUDA_EMULATION=0|1  force the emulated CUDA backend (cem_ops._C_emulated, the CUDA kernels run
                          on the CPU for tests) off or on (default: on when the CUDA headers are found)
  TORCH_CUDA_ARCH_LIST    e.g. "8.0;9.0a" (the default) or "9.0a"; "+PTX" adds PTX for that arch; 8.0 or newer
  CUDA_HOME               CUDA toolkit root (default: /usr/local/cuda, else nvcc on PATH)
  MAX_JOBS                parallel compile jobs (default: bounded by cores and free memory)
  CEM_OPS_CUDA_DTYPES     e.g. "bf16" or "fp32;fp16;bf16" (default): dtypes of the CUDA attention kernels
  CEM_OPS_CUDA_HEAD_DIMS  e.g. "128" or "64;128" (default): head-dim buckets of the CUDA attention kernels
  CEM_OPS_PTXAS_VERBOSE   1 prints ptxas register and spill reports for the CUDA kernels
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
VERSION = "0.1.0"  # cem_ops.__version__; wheels add the build tag as the local part
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0a"
MEMORY_PER_JOB_GB = 3  # nvcc and torch-heavy C++ units each peak near this


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_nvcc() -> str | None:
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        cuda_home = os.environ.get(variable)
        if cuda_home:  # the user's choice: use it or say why not, never fall back silently
            nvcc = Path(cuda_home) / "bin" / "nvcc"
            if not nvcc.is_file():
                raise RuntimeError(f"{variable}={cuda_home!r} has no bin/nvcc")
            return str(nvcc)
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else shutil.which("nvcc")


def env_switch(name: str) -> bool | None:
    """A boolean environment switch: None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise RuntimeError(f"{name} must be 0 or 1 (or off/on, false/true, no/yes), got {os.environ[name]!r}")


def find_cuda_headers() -> str | None:
    """The CUDA toolkit's include directory (cuda_fp16.h and friends), without needing nvcc."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            include = Path(os.environ[variable]) / "include"
            return str(include) if (include / "cuda_fp16.h").is_file() else None
    nvcc = shutil.which("nvcc")
    candidates = [Path("/usr/local/cuda/include")] + ([Path(nvcc).resolve().parent.parent / "include"] if nvcc else [])
    return next((str(c) for c in candidates if (c / "cuda_fp16.h").is_file()), None)


def emulation_headers() -> str | None:
    """Where the emulated CUDA backend finds the CUDA headers, or None to build without it."""
    flag = env_switch("CEM_OPS_CUDA_EMULATION")
    if flag is False:
        return None
    headers = find_cuda_headers()
    if flag and headers is None:
        raise RuntimeError("CEM_OPS_CUDA_EMULATION=1 but no CUDA headers (cuda_fp16.h) were found (set CUDA_HOME)")
    return headers


def cuda_enabled(torch_module) -> tuple[bool, str | None]:
    flag = env_switch("CEM_OPS_CUDA")
    if flag is False:
        return False, None
    nvcc = find_nvcc()
    if torch_module.version.cuda is None or nvcc is None:
        if flag:
            raise RuntimeError(
                f"CEM_OPS_CUDA=1 but torch {torch_module.__version__} has no CUDA"
                if torch_module.version.cuda is None
                else "CEM_OPS_CUDA=1 but nvcc was not found (set CUDA_HOME)"
            )
        return False, None
    return True, nvcc


ARCH_PATTERN = re.compile(r"(\d+)\.(\d)(a?)(\+PTX)?", re.IGNORECASE)
MIN_CUDA_ARCH = (8, 0)  # the kernels use bf16 tensor-core (WMMA) instructions


def cmake_cuda_architectures(arch_list: str) -> str:
    """"8.0;9.0a" -> "80-real;90a-real;90-virtual": machine code for each entry, and PTX for the
    newest (without its "a": architecture-specific PTX does not run on later GPUs) so that newer
    GPUs can JIT it. "+PTX" adds PTX for that entry too."""
    archs, newest = [], None
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        match = ARCH_PATTERN.fullmatch(item)
        if not match:
            raise RuntimeError(f"TORCH_CUDA_ARCH_LIST: {item!r} is not an architecture like 8.0, 9.0a or 9.0+PTX")
        major, minor, suffix, ptx = match.groups()
        if (int(major), int(minor)) < MIN_CUDA_ARCH:
            raise RuntimeError(f"TORCH_CUDA_ARCH_LIST: {item} is older than the kernels support (8.0 or newer)")
        number = f"{major}{minor}{suffix.lower()}"
        archs.append(f"{number}-real")
        if ptx:
            archs.append(f"{number}-virtual")
        if newest is None or (int(major), int(minor)) > newest:
            newest = (int(major), int(minor))
    if not archs:
        raise RuntimeError(f"TORCH_CUDA_ARCH_LIST={arch_list!r} names no architecture")
    portable_ptx = f"{newest[0]}{newest[1]}-virtual"
    if portable_ptx not in archs:
        archs.append(portable_ptx)
    return ";".join(archs)


def parallel_jobs() -> int:
    if os.environ.get("MAX_JOBS", "").strip():
        value = os.environ["MAX_JOBS"].strip()
        if not value.isdigit() or int(value) < 1:
            raise RuntimeError(f"MAX_JOBS must be a positive integer, got {os.environ['MAX_JOBS']!r}")
        return int(value)
    available_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return max(1, min(os.cpu_count() or 1, int(available_gb // MEMORY_PER_JOB_GB)))


def torch_requirement() -> str:
    """The binary only loads with the torch it was compiled against: a wheel says so."""
    try:
        import torch
    except ImportError:  # metadata without a build
        return "torch>=2.6"
    return f"torch=={torch.__version__.split('+')[0]}"


def build_tag() -> str:
    """The version's local part, naming what the binary is tied to (as GPU wheels do):
    "torch2.14cu130" with the CUDA kernels, "torch2.14cpu" without; empty without torch."""
    try:
        import torch
    except ImportError:  # metadata without a build
        return ""
    torch_release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    with_cuda, _ = cuda_enabled(torch)
    return f"torch{torch_release}" + (f"cu{torch.version.cuda.replace('.', '')}" if with_cuda else "cpu")


def package_version() -> str:
    tag = build_tag()
    return f"{VERSION}+{tag}" if tag else VERSION


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if ext.name != "cem_ops._C":
            return  # one CMake build makes every module, next to _C
        import torch

        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}"
        jobs = parallel_jobs()  # settings are checked before anything compiles
        with_cuda, nvcc = cuda_enabled(torch)
        emulation_include = emulation_headers()
        source_hash = load_module("_source_hash", ROOT / "cem_ops" / "_source_hash.py").source_hash(ROOT)
        args = [
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCEM_OPS_OUTPUT_DIR={output_dir}",
            f"-DCEM_OPS_SOURCE_HASH={source_hash}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCEM_OPS_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DCEM_OPS_CUDA_EMULATION={'ON' if emulation_include else 'OFF'}",
            f"-DCEM_OPS_CUDA_INCLUDE_DIR={emulation_include or ''}",
        ]
        if with_cuda:
            arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCEM_OPS_CUDA_ARCHS={cmake_cuda_architectures(arch_list)}"]
            # Optional narrowing of the generated kernel instantiations, and ptxas reports.
            for name in ("CEM_OPS_CUDA_DTYPES", "CEM_OPS_CUDA_HEAD_DIMS"):
                args.append(f"-D{name}={os.environ.get(name, '')}")
            args.append(f"-DCEM_OPS_PTXAS_VERBOSE={'ON' if os.environ.get('CEM_OPS_PTXAS_VERBOSE') == '1' else 'OFF'}")
        if shutil.which("ccache"):
            args += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        print(f"cem_ops: building with CUDA {'on' if with_cuda else 'off'}, emulated CUDA backend "
              f"{'on' if emulation_include else 'off'}, {jobs} jobs", flush=True)
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja", *args])
        subprocess.check_call(["cmake", "--build", str(build_dir), "--parallel", str(jobs)])


setup(
    name="cem_ops",
    version=package_version(),
    description="Fused kernels for Causal Energy Minimization (CEM) Transformer layers in PyTorch",
    packages=find_packages(include=["cem_ops", "cem_ops.*"]),
    python_requires=">=3.10",
    install_requires=[torch_requirement()],
    ext_modules=[CMakeExtension("cem_ops._C")] + ([CMakeExtension("cem_ops._C_emulated")] if emulation_headers() else []),
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
