#!/usr/bin/env bash
# The test command: install, build, run every test (CUDA tests skip with a reason where there is no GPU).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
"$PYTHON" -m pytest -q -ra "$@"
