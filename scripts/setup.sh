#!/usr/bin/env bash
# Creates .venv (once) with the project and its dependencies. Idempotent: it reinstalls only when
# pyproject.toml changed. torch is pinned to 2.13.0 first so that pip takes the local CPU wheel
# instead of pulling gigabytes of CUDA packages; the project's range then installs nothing more.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.hmn-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    # cpu: faiss-cpu (never with gpu); tracking: mlflow-skinny and tensorboard, for their tests
    .venv/bin/python -m pip install --quiet -e ".[dev,cpu,tracking]"
    echo "$want" > "$stamp"
fi
