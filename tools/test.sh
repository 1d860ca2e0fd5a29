#!/usr/bin/env bash
# Set up (idempotent), then run the CPU test suite. Extra arguments go to pytest.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/tools/setup.sh"
cd "$REPO"
status=0
.venv/bin/python -m pytest -q tests "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests" >&2
fi
exit "$status"
