#!/usr/bin/env bash
# Builds a cem_ops wheel and checks it as a user gets it: no build-machine path in its binaries'
# RUNPATH, then installed into a fresh venv (which pulls the torch the wheel requires), imported
# from there, and the test suite run against the installed package rather than the checkout.
#
#   bash scripts/check_wheel.sh                 # build with the environment's torch, then check
#   bash scripts/check_wheel.sh dist/x.whl      # check a wheel built before
#
# Environment: the build switches of setup.py (TORCH_CUDA_ARCH_LIST, CEM_OPS_CUDA, ...), VENV
# (default build/wheel-venv, recreated), and extra pytest arguments in PYTEST_ARGS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$ROOT/build/wheel-venv}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

if [ $# -ge 1 ]; then
  wheel=$1
else
  echo "== building the wheel (CUDA sources take several minutes on 2 cores)" >&2
  rm -rf "$ROOT/build/wheel-dist"
  "$PYTHON" -m pip wheel --no-build-isolation --no-deps . -w "$ROOT/build/wheel-dist" 2>&1 \
    | grep --line-buffered -E "^cem_ops:|\[[0-9]+/[0-9]+\]|error|Error|FAILED|Created wheel|Stored" || true
  wheel=$(ls "$ROOT"/build/wheel-dist/cem_ops-*.whl)
fi
[ -f "$wheel" ] || { echo "no wheel at $wheel" >&2; exit 1; }
echo "== wheel: $(basename "$wheel")" >&2

echo "== RUNPATH of its binaries (relative to the package only)" >&2
unpacked=$(mktemp -d)
trap 'rm -rf "$unpacked"' EXIT
"$PYTHON" -m zipfile -e "$wheel" "$unpacked"
status=0
for so in "$unpacked"/cem_ops/*.so; do
  runpath=$(readelf -d "$so" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p; s/.*(RPATH).*\[\(.*\)\]/\1/p')
  echo "   $(basename "$so"): ${runpath:-none}" >&2
  IFS=: read -ra entries <<< "$runpath"
  for entry in "${entries[@]}"; do
    case "$entry" in
      '$ORIGIN'*) ;;
      *) echo "   not relocatable: $entry is a path of the build machine" >&2; status=1 ;;
    esac
  done
done
[ $status -eq 0 ] || exit 1

echo "== fresh venv at $VENV, with the wheel and the test requirements" >&2
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "$wheel" -r "$ROOT/requirements-dev.txt"

echo "== the installed package" >&2
# From outside the checkout, so that nothing of it can be imported by accident.
cd "$(mktemp -d)"
"$VENV/bin/python" - "$VENV" <<'PY'
import json, sys
from importlib.metadata import version
import cem_ops
assert cem_ops.__file__.startswith(sys.argv[1]), f"cem_ops imported from {cem_ops.__file__}, not the venv"
print(f"   cem_ops {version('cem_ops')} from {cem_ops.__file__}")
print(f"   {json.dumps(cem_ops.build_info())}")
PY

echo "== the test suite against the installed package" >&2
# pytest puts tests/ (not the repository root) on sys.path, so cem_ops is the venv's.
"$VENV/bin/python" -m pytest -q -ra -p no:cacheprovider --rootdir "$ROOT" "$ROOT/tests" ${PYTEST_ARGS:-}
