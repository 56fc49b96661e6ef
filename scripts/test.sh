#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole test suite (exit code 5, no tests, is a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
