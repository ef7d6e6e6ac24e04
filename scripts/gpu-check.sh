#!/usr/bin/env bash
# Run the CUDA tests and a short GPU benchmark (about 4 minutes), printing one Markdown table.
# Skips cleanly (exit 0) on a machine without CUDA. Arguments go to benchmarks/gpu_check.py
# (--device, --quick, --skip-tests, --skip-bench, --repeats, --output).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" benchmarks/gpu_check.py "$@"
