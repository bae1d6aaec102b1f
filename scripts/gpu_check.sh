#!/usr/bin/env bash
# GPU verification of the CUDA attention kernels, on a bare machine with a GPU, torch
# preinstalled and no network. One command does it all within 9 minutes:
#
#   bash scripts/gpu_check.sh all
#
# Stages (each also runs alone: scripts/gpu_check.sh <stage>), with the time each may take in
# `all` (a stage that runs out of time is stopped and reported, and the next one starts):
#   env       (20 s)  GPU identity, clocks and driver (nvidia-ml-py, nvidia-smi), torch, CUDA, git SHA
#   build     (210 s) this GPU's architecture only (sm_90a on Hopper) unless TORCH_CUDA_ARCH_LIST is
#                     set, all cores, ptxas register/spill report; no emulated backend (CI runs it)
#   test      (120 s) the GPU half of tests/test_cuda_attention.py and tests/test_attention_cached.py,
#                     the primitive-layout twin of the emulated layout test, the machine-code check
#                     (tests/test_kernel_machine_code.py)
#   sanitize  (75 s)  compute-sanitizer memcheck, racecheck and synccheck on small shapes (training
#                     and decoding kernels)
#   bench     (105 s) matmul and copy ceilings and the quick slice of the speed grid (ours, Llama,
#                     eager stock; BENCH_FULL=1 for the whole grid, BENCH_IMPLS to choose), then the
#                     quick slice of the decode grid (CEM and Llama with caches)
#   suite     (not in all) the rest of the test suite on this machine
#
# Everything lands in one folder: $OUT/gpu_check when OUT is set, else benchmarks/results/gpu_check/.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
LOGDIR=${OUT:+$OUT/gpu_check}
LOGDIR=${LOGDIR:-benchmarks/results/gpu_check}
mkdir -p "$LOGDIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}  # the interpreter that holds torch (plain `python` may be another one)
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
START=$SECONDS

run_logged() {  # run_logged <stage> <seconds> <command...>: tee to the stage log, stop at the limit
  local stage=$1 limit=$2; shift 2
  echo "== $stage (+$((SECONDS - START)) s, limit ${limit} s): $*" | tee -a "$LOGDIR/$stage.log"
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOGDIR/$stage.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "== $stage: stopped after ${limit} s" | tee -a "$LOGDIR/$stage.log"
  echo "== $stage: exit $rc" | tee -a "$LOGDIR/$stage.log"
  return "$rc"
}

stage_env() {
  : > "$LOGDIR/env.log"
  GIT_SHA=${GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)} run_logged env 20 "$PYTHON" - <<'PY'
import json, os, platform, shutil, subprocess, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "git_sha": os.environ.get("GIT_SHA", "unknown")}
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
  command -v nvidia-smi >/dev/null && run_logged env 10 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,memory.total --format=csv
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
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c "import torch; m, n = torch.cuda.get_device_capability(); print('9.0a' if (m, n) == (9, 0) else f'{m}.{n}')")
  fi
  export TORCH_CUDA_ARCH_LIST
  export CEM_OPS_PTXAS_VERBOSE=${CEM_OPS_PTXAS_VERBOSE:-1}
  local start=$SECONDS
  if ! run_logged build 210 "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .; then
    echo "== build: pip install -e failed; building in place instead" | tee -a "$LOGDIR/build.log"
    run_logged build 150 "$PYTHON" setup.py build_ext --inplace || return 1
  fi
  echo "== build: $((SECONDS - start)) s for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" | tee -a "$LOGDIR/build.log"
  run_logged build 30 "$PYTHON" -c "import cem_ops, pprint; pprint.pprint(cem_ops.build_info())"
}

stage_test() {
  : > "$LOGDIR/test.log"
  # Up to 10 failures: one failing case should not hide the pattern of the others.
  run_logged test 120 "$PYTHON" -m pytest -q --maxfail=10 -ra -m cuda -p no:cacheprovider \
    tests/test_emulator.py tests/test_kernel_machine_code.py tests/test_cuda_attention.py tests/test_attention_cached.py \
    --junitxml="$LOGDIR/test.xml"
}

stage_suite() {
  : > "$LOGDIR/suite.log"
  run_logged suite 600 "$PYTHON" -m pytest -q -ra -m "not cuda and not emulation" -p no:cacheprovider tests
}

stage_sanitize() {
  : > "$LOGDIR/sanitize.log"
  [ -x "$SANITIZER" ] || { echo "compute-sanitizer not found (set SANITIZER=...)" | tee -a "$LOGDIR/sanitize.log"; return 1; }
  # No caching allocator: every tensor its own allocation, so out-of-bounds accesses are visible.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  local rc=0
  run_logged sanitize 35 "$SANITIZER" --tool memcheck --error-exitcode 1 "$PYTHON" scripts/cuda_smoke.py \
    --dtypes bf16,fp32 --head-dims 64,59 || rc=1
  run_logged sanitize 25 "$SANITIZER" --tool racecheck --racecheck-report all --error-exitcode 1 \
    "$PYTHON" scripts/cuda_smoke.py --dtypes bf16 --head-dims 128 --diags shared || rc=1
  run_logged sanitize 15 "$SANITIZER" --tool synccheck --error-exitcode 1 \
    "$PYTHON" scripts/cuda_smoke.py --dtypes bf16 --head-dims 64 --diags none || rc=1
  return $rc
}

stage_bench() {
  : > "$LOGDIR/bench.log"
  local name="cuda-$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")"
  local json="$LOGDIR/$name.json"
  # The quick slice (target model at 2k and 8k) fits the budget without torch.compile's minutes.
  local rc=0
  run_logged bench 75 "$PYTHON" -m pytest -q -p no:cacheprovider benchmarks/test_ceilings.py \
    benchmarks/test_attention_speed.py --bench-device cuda $([ -n "${BENCH_FULL:-}" ] || echo --bench-quick) \
    --bench-impls "${BENCH_IMPLS:-stock,llama,ours}" --benchmark-json "$json" || rc=1
  [ "$rc" = 0 ] && run_logged bench 10 "$PYTHON" benchmarks/report.py "$json"
  local decode_json="$LOGDIR/$name-decode.json"
  run_logged bench 20 "$PYTHON" -m pytest -q -p no:cacheprovider benchmarks/test_decode_speed.py --bench-device cuda \
    $([ -n "${BENCH_FULL:-}" ] || echo --bench-quick) --benchmark-json "$decode_json" || return 1
  run_logged bench 5 "$PYTHON" benchmarks/decode_report.py "$decode_json" --out "${decode_json%.json}.md" || return 1
  return $rc
}

status=0
case "${1:-all}" in
  env) stage_env || status=1 ;;
  build) stage_build || status=1 ;;
  test) stage_test || status=1 ;;
  suite) stage_suite || status=1 ;;
  sanitize) stage_sanitize || status=1 ;;
  bench) stage_bench || status=1 ;;
  all)
    stage_env || status=1
    stage_build || { echo "== all: the build failed after $((SECONDS - START)) s" | tee -a "$LOGDIR/all.log"; exit 1; }
    stage_test || status=1
    stage_sanitize || status=1
    stage_bench || status=1
    echo "== all: $((SECONDS - START)) s, status $status" | tee -a "$LOGDIR/all.log"
    ;;
  *) echo "usage: $0 [env|build|test|suite|sanitize|bench|all]"; exit 2 ;;
esac
exit $status
