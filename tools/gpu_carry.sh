#!/usr/bin/env bash
# Folders the GPU machine needs for bench/e2e_wan.py (it has torch but no ComfyUI and no internet):
#   .whl/        pure-Python wheels of ComfyUI's sampling path missing there (torchsde, trampoline)
#   .comfy_min/  ComfyUI's Python sources only (from .comfyui/ComfyUI, see tools/setup.sh), ~3 MiB
# Both are git-ignored; carry them with the run and follow bench/e2e_wan.py's docstring.
# With CK=1 also .ck/: comfy-kitchen 0.2.40's cp312 wheel unzipped, its ROCm library removed (41 MiB), for
# sol_attn in bench/pareto_bsa.py (PYTHONPATH=.ck). With the tracked files (~40 MiB, mostly assets/) it passes the
# device tool's 64 MiB unless assets/*.safetensors stay home for that call: untracked files travel unless ignored, so
# `git rm --cached -q assets/*.safetensors && echo '/assets/*.safetensors' >> .git/info/exclude`, and after the call
# `git reset -q assets/` and drop that line from .git/info/exclude.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
SRC="${COMFYUI_PATH:-.comfyui/ComfyUI}"
[ -d "$SRC/comfy" ] || { echo "ComfyUI not found at $SRC: run tools/setup.sh first" >&2; exit 1; }
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl torchsde==0.2.6 trampoline==0.1.2
rm -rf .comfy_min && mkdir -p .comfy_min/ComfyUI
(cd "$SRC" && find comfy comfy_api -name '*.py' -print0 | xargs -0 -I{} cp --parents {} "$REPO/.comfy_min/ComfyUI/")
cp "$SRC"/{comfyui_version.py,node_helpers.py,folder_paths.py,LICENSE} .comfy_min/ComfyUI/
if [ "${CK:-0}" = 1 ]; then
  tmp="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    -d "$tmp" comfy-kitchen==0.2.40
  rm -rf .ck && mkdir .ck && "$PY" -m zipfile -e "$tmp"/comfy_kitchen-*.whl .ck && rm -rf "$tmp"
  rm -f .ck/comfy_kitchen/backends/hip/_C*.so
  du -sh .ck
fi
du -sh .whl .comfy_min
