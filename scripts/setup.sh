#!/usr/bin/env bash
# One-time, idempotent set-up: a virtual environment in .venv, the CPU build of torch first (an
# unpinned torch would pull a multi-GB CUDA build), the package with its dev extra, and the offline
# assets (SmolLM2-135M, MMLU, text corpora) in ${LOLCATS_CACHE:-~/.cache/lolcats}.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LOLCATS_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.lolcats-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q torch==2.13.0
  "$py" -m pip install -q -e ".[dev,eval]"
  echo "$want" > "$stamp"
fi
"$py" -m lolcats.assets
