#!/usr/bin/env bash
# Sets up .venv if needed, then runs the main job (default: the embedded smoke preset on a local
# Ray). Extra arguments go to `python -m pipeline.run` (e.g. --config configs/sq32k.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pipeline.run "$@"
