#!/usr/bin/env bash
# Set everything up in .venv (with the demo extra), then run the main job: the MultiDigits
# multi-task benchmark, writing its tables and plots to demo-output/.
# Extra arguments go to the benchmark, e.g. bash scripts/demo.sh --quick
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
.venv/bin/python -m examples.multidigits --output demo-output "$@"
