#!/usr/bin/env bash
# Set up (idempotent) with test extras, then run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q -rs --durations=15 "$@"
