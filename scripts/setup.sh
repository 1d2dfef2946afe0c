#!/usr/bin/env bash
# Create .venv (if missing) and install phimm with the extras given ("test", "demo", ...). Re-runs only
# install when pyproject.toml changed. Usage: bash scripts/setup.sh [extras]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.phimm-installed-$(sha1sum pyproject.toml | cut -c1-12)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # the torch stack first, pinned together: any other torch makes pip fetch gigabytes
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0
  .venv/bin/python -m pip install -q -e ".[${extras}]"
  touch "$stamp"
fi
