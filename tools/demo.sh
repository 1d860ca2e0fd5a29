#!/usr/bin/env bash
# Set up (idempotent), then sample the small trained Wan (workflows/tiny_wan_shapes_t2v_api.json) dense and
# with BSA through ComfyUI's executor; prints times, sparsity and PSNR against dense, writes decoded frames.
# Extra arguments go to tools/run_workflow.py (e.g. --steps 10, or --workflow workflows/tiny_wan_t2v_api.json).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/tools/setup.sh"
exec "$REPO/.venv/bin/python" "$REPO/tools/run_workflow.py" "$@"
