#!/usr/bin/env bash
# Set up (idempotent), then run the tiny Wan workflow dense and with BSA; prints times and sparsity.
# Extra arguments go to tools/run_workflow.py (e.g. --width 128 --height 128 --length 17 --steps 2).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/tools/setup.sh"
exec "$REPO/.venv/bin/python" "$REPO/tools/run_workflow.py" "$@"
