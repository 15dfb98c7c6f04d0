#!/usr/bin/env bash
# Set up (idempotent) with test extras, then run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
# The example third-party plugins (plugins/*) install like any user's package; their tests run below.
for plugin in plugins/*/; do
  "${EVOLSPLAT_VENV:-.venv}/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$plugin"
done
export PYTHONUNBUFFERED=1
exec "${EVOLSPLAT_VENV:-.venv}/bin/python" -m pytest -q -rs --durations=15 "$@"
