#!/usr/bin/env bash
# Installs the build and test requirements (a no-op where they are present) and builds cem_ops
# in place as an editable install. CUDA kernels build when torch has CUDA and nvcc is found
# (CEM_OPS_CUDA=0 forces a CPU-only build). Sourced by test.sh and demo.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda  # nvcc may also sit elsewhere on PATH as a wrapper
fi
echo "== installing build and test requirements" >&2
"$PYTHON" -m pip install --quiet -r requirements-dev.txt
echo "== building cem_ops (progress below; CUDA sources take several minutes on 2 cores)" >&2
start=$(date +%s)
"$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . 2>&1 \
  | grep --line-buffered -E "^cem_ops:|-- cem_ops|\[[0-9]+/[0-9]+\]|error|Error|FAILED|Successfully" || true
"$PYTHON" -c "import cem_ops" || { echo "cem_ops failed to build or import (see above)" >&2; exit 1; }
echo "== built in $(( $(date +%s) - start )) s: $("$PYTHON" -c 'import cem_ops, json; print(json.dumps(cem_ops.build_info()))')" >&2
