#!/usr/bin/env bash
# Set everything up in .venv, then run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/grouped_training.py "$@"
