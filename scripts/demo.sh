#!/usr/bin/env bash
# Launch phimm's web demo on the embedded default model (creates .venv on first use). Extra arguments go to
# `phimm demo` (e.g. --port 7861).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/phimm demo "$@"
