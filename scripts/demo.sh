#!/usr/bin/env bash
# The main job: install, build, check the ops against the float64 reference on this machine's
# device and print a small throughput table.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
"$PYTHON" benchmarks/demo.py "$@"
