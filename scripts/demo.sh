#!/usr/bin/env bash
# Set up (idempotent) and run the main job: linearize SmolLM2-135M offline with the demo recipe
# (~18 minutes on 2 CPU cores after the one-time set-up, ~13 of them training). Extra arguments go to `lolcats linearize`,
# e.g. `bash scripts/demo.sh --overwrite` or `bash scripts/demo.sh distill.max_steps=10`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${LOLCATS_VENV:-.venv}/bin/lolcats" linearize recipes/smollm2_135m.yaml "$@"
