#!/usr/bin/env bash
# Set everything up in .venv, then run the whole test suite (lint and docs build included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
bash scripts/docs.sh --no-setup  # the documentation site, strict
.venv/bin/python -m pytest -q "$@"
