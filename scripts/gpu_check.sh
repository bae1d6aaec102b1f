#!/usr/bin/env bash
# GPU verification of the CUDA attention kernels, on a machine with a GPU, torch preinstalled and
# no network. Stages (each fits in 10 minutes on one H100; run them one per command):
#
#   scripts/gpu_check.sh env        GPU identity (nvidia-ml-py / nvidia-smi), toolchain versions
#   scripts/gpu_check.sh build      pip install --no-build-isolation -e . for this GPU's arch only
#                                   (unless TORCH_CUDA_ARCH_LIST is set), import check
#   scripts/gpu_check.sh test       the GPU tests (tests/test_cuda_attention.py, the primitive-layout twin of
#                                   tests/test_emulator.py), then the rest of the suite (the emulated
#                                   backend is not built here: CI runs it)
#   scripts/gpu_check.sh sanitize   compute-sanitizer memcheck, racecheck, synccheck on small shapes
#   scripts/gpu_check.sh bench      ceilings + attention speed grid (quick slice unless BENCH_FULL=1),
#                                   JSON, Markdown and PNG under benchmarks/results/; BENCH_IMPLS
#                                   (e.g. stock,stock_compiled,llama,ours) narrows the implementations
#   scripts/gpu_check.sh all        everything above, in order
#
# Logs go to benchmarks/results/gpu_check/<stage>.log (and are copied to $OUT when it is set).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
LOGDIR=benchmarks/results/gpu_check
mkdir -p "$LOGDIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}  # the interpreter that holds torch (plain `python` may be another one)
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}

publish() {  # copy logs where the caller can fetch them
  if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/gpu_check" && cp -r "$LOGDIR"/. "$OUT/gpu_check/"; fi
}

run_logged() {  # run_logged <stage> <command...>: tee to the stage log, keep the exit status
  local stage=$1; shift
  echo "== $stage: $*" | tee -a "$LOGDIR/$stage.log"
  "$@" 2>&1 | tee -a "$LOGDIR/$stage.log"
  local rc=${PIPESTATUS[0]}
  echo "== $stage: exit $rc" | tee -a "$LOGDIR/$stage.log"
  return "$rc"
}

stage_env() {
  : > "$LOGDIR/env.log"
  run_logged env "$PYTHON" - <<'PY'
import json, platform, shutil, subprocess, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name()
    info["capability"] = torch.cuda.get_device_capability()
try:
    import pynvml
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    info["nvml"] = {
        "driver": pynvml.nvmlSystemGetDriverVersion(),
        "name": pynvml.nvmlDeviceGetName(h),
        "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
        "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
        "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
        "power_limit_w": pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000,
        "memory_total_gb": pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30,
    }
except Exception as error:
    info["nvml"] = f"nvidia-ml-py unavailable ({error}); see nvidia-smi below"
for tool in ("nvcc", "cmake", "ninja", "compute-sanitizer"):
    info[tool] = shutil.which(tool) or ("/usr/local/cuda/bin/" + tool if tool in ("nvcc", "compute-sanitizer") else None)
print(json.dumps(info, indent=1, default=str))
PY
  local rc=$?
  command -v nvidia-smi >/dev/null && run_logged env nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,memory.total --format=csv
  return $rc
}

stage_build() {
  : > "$LOGDIR/build.log"
  for tool in cmake ninja; do
    command -v $tool >/dev/null || {
      echo "missing build tool: $tool (put it on PATH; there is no network to pip install it)" | tee -a "$LOGDIR/build.log"; return 1; }
  done
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  export CEM_OPS_CUDA=1
  export CEM_OPS_CUDA_EMULATION=${CEM_OPS_CUDA_EMULATION:-0}  # the CPU emulation is CI's job, not the GPU's
  # Only this GPU's architecture (sm_90a on Hopper, sm_80 code for any Ampere) unless told.
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c "import torch; m, n = torch.cuda.get_device_capability(); print('9.0a' if (m, n) == (9, 0) else '8.0' if m == 8 else f'{m}.{n}')")
  fi
  export TORCH_CUDA_ARCH_LIST
  export CEM_OPS_PTXAS_VERBOSE=${CEM_OPS_PTXAS_VERBOSE:-1}
  local start=$SECONDS
  if ! run_logged build "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .; then
    echo "== build: pip install -e failed; building in place instead" | tee -a "$LOGDIR/build.log"
    run_logged build "$PYTHON" setup.py build_ext --inplace || return 1
  fi
  echo "== build: $((SECONDS - start)) s for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" | tee -a "$LOGDIR/build.log"
  run_logged build "$PYTHON" -c "import cem_ops, pprint; pprint.pprint(cem_ops.build_info())"
}

stage_test() {
  : > "$LOGDIR/test.log"
  # Up to 10 failures: one failing case should not hide the pattern of the others.
  run_logged test "$PYTHON" -m pytest -q --maxfail=10 -ra -m cuda tests/test_cuda_attention.py tests/test_emulator.py || return 1
  run_logged test "$PYTHON" -m pytest -q -ra -m "not cuda and not emulation" tests
}

stage_sanitize() {
  : > "$LOGDIR/sanitize.log"
  [ -x "$SANITIZER" ] || { echo "compute-sanitizer not found (set SANITIZER=...)" | tee -a "$LOGDIR/sanitize.log"; return 1; }
  # No caching allocator: every tensor its own allocation, so out-of-bounds accesses are visible.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  local rc=0
  run_logged sanitize timeout 540 "$SANITIZER" --tool memcheck --error-exitcode 1 "$PYTHON" scripts/cuda_smoke.py || rc=1
  run_logged sanitize timeout 540 "$SANITIZER" --tool racecheck --racecheck-report all --error-exitcode 1 \
    "$PYTHON" scripts/cuda_smoke.py --dtypes bf16,fp32 --head-dims 64,100 || rc=1
  run_logged sanitize timeout 300 "$SANITIZER" --tool synccheck --error-exitcode 1 \
    "$PYTHON" scripts/cuda_smoke.py --dtypes bf16 --head-dims 59 || rc=1
  return $rc
}

stage_bench() {
  : > "$LOGDIR/bench.log"
  local name="cuda-$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")"
  local json="benchmarks/results/$name.json"
  # The quick slice (target model at 2k and 8k) fits one command; BENCH_FULL=1 runs the whole grid.
  run_logged bench "$PYTHON" -m pytest -q benchmarks/test_ceilings.py benchmarks/test_attention_speed.py \
    --bench-device cuda $([ -n "${BENCH_FULL:-}" ] || echo --bench-quick) --bench-impls "${BENCH_IMPLS:-all}" \
    --benchmark-json "$json" || return 1
  run_logged bench "$PYTHON" benchmarks/report.py "$json"
  cp "$json" "${json%.json}.md" "$LOGDIR/" 2>/dev/null
  [ -f "${json%.json}.png" ] && cp "${json%.json}.png" "$LOGDIR/"
  return 0
}

status=0
case "${1:-all}" in
  env) stage_env || status=1 ;;
  build) stage_build || status=1 ;;
  test) stage_test || status=1 ;;
  sanitize) stage_sanitize || status=1 ;;
  bench) stage_bench || status=1 ;;
  all)
    stage_env || status=1
    stage_build || { publish; exit 1; }
    stage_test || status=1
    stage_sanitize || status=1
    stage_bench || status=1
    ;;
  *) echo "usage: $0 [env|build|test|sanitize|bench|all]"; exit 2 ;;
esac
publish
exit $status
