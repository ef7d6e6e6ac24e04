#!/usr/bin/env bash
# Set everything up in .venv (with the demo extra), then run the main job: MultiMNIST and
# instance-wise risk minimisation on real MNIST digits, writing tables and plots to demo-output/.
# Extra arguments go to the main job, e.g. bash scripts/demo.sh --quick
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
.venv/bin/python -m examples.multimnist --output demo-output "$@"
