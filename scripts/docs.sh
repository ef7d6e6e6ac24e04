#!/usr/bin/env bash
# Build the documentation site into build/docs/html, from scratch (-E: a cached page would hide
# its warnings). Warnings are errors, and every cross-reference (links between pages, to
# headings, to the API) must resolve.
# Usage: bash scripts/docs.sh [--no-setup]   (--no-setup: use .venv as it is)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--no-setup" ]; then
  bash scripts/setup.sh docs
fi
.venv/bin/python -m sphinx -E -W --keep-going -n -q -b html -d build/docs/doctrees docs build/docs/html
echo "Documentation built in build/docs/html/index.html"
