"""The machine code of the built CUDA kernels, read without a GPU: every tensor-core attention
kernel (bf16/fp16, each architecture built) must use HMMA.16816 (mma.sync m16n8k16), LDSM
(ldmatrix) and LDGSTS (cp.async), and keep everything in registers: no LDL/STL, the local-memory
traffic of spilled registers. cuobjdump comes from the CUDA toolkit or, where the toolkit lacks
it, from Triton's wheel."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

import cem_ops

HOT_KERNELS = ("attention_fwd_tc_kernel", "attention_bwd_tc_kernel", "attention_dq_tc_kernel",
               "attention_delta_tc_kernel")
REQUIRED = ("HMMA.16816", "LDSM", "LDGSTS")
FORBIDDEN = ("LDL", "STL")


def find_cuobjdump() -> str | None:
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
                  shutil.which("cuobjdump") or ""]
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def opcodes_by_function(sass: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(architecture, function): {opcode: count}} of cuobjdump -sass output."""
    table: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    arch, function = "?", None
    for line in sass.splitlines():
        if match := re.match(r"\s*code for (sm_\w+)", line):
            arch, function = match.group(1), None
        elif match := re.match(r"\s*Function : (\S+)", line):
            function = match.group(1)
        elif function and (match := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)):
            table[(arch, function)][match.group(1)] += 1
    return table


def test_tensor_core_kernels_use_mma_ldmatrix_cp_async_and_do_not_spill() -> None:
    info = cem_ops.build_info()
    if not info["with_cuda"]:
        pytest.skip("cem_ops._C was built without the CUDA kernels")
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump found (CUDA toolkit or Triton's wheel)")
    library = cem_ops._C.__file__
    result = subprocess.run([tool, "-sass", library], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    table = opcodes_by_function(result.stdout)
    built_archs = {arch for arch, _ in table}
    hot = {key: ops for key, ops in table.items() if any(kernel in key[1] for kernel in HOT_KERNELS)}
    assert hot, f"no tensor-core kernels found in {library} (architectures {sorted(built_archs)})"
    for kernel in HOT_KERNELS:
        for arch in built_archs:
            assert any(kernel in name for a, name in hot if a == arch), f"{kernel} missing for {arch}"
    problems = []
    for (arch, name), ops in sorted(hot.items()):
        for required in REQUIRED:
            if not any(op.startswith(required) for op in ops):
                problems.append(f"{arch} {name}: no {required}")
        for forbidden in FORBIDDEN:
            spills = sum(count for op, count in ops.items() if op.split(".")[0] == forbidden)
            if spills:
                problems.append(f"{arch} {name}: {spills} {forbidden} (local memory)")
    assert not problems, "\n".join(problems)
