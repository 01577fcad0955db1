#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, integration tests on the real SmolLM2 included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${LOLCATS_VENV:-.venv}/bin/ruff" check lolcats tests scripts examples
exec "${LOLCATS_VENV:-.venv}/bin/python" -m pytest -q "$@"
