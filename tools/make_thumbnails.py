"""Write workflows/<name>.jpg, the template-browser thumbnail of each UI workflow, from a real screenshot.

Same harness as tests/test_frontend.py (tools/comfy_server.py, tools/comfy_browser.py): a temporary
`main.py --cpu` server with this pack, the pinned frontend in headless Chromium, the workflow loaded with
app.loadGraphData and fitted to the view. The frontend's own chrome (tabs, side bar, run button, canvas
menu) is hidden so the graph fills the picture; it is scaled to WIDTH pixels wide and saved as JPEG
quality 80.

    python tools/make_thumbnails.py [workflows/NAME.json ...] [--out DIR] [--png]

--png also keeps the full-size screenshots next to the thumbnails (to look at them).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import comfy_browser as cb  # noqa: E402
import comfy_server as cs  # noqa: E402

WIDTH, QUALITY = 512, 80
VIEWPORT = (1024, 768)  # 4:3, so the thumbnail is 512x384
HIDE_CHROME = """
.splitter-overlay-root, .p-toast { display: none !important; }
"""


def make_thumbnails(paths: list[pathlib.Path], out: pathlib.Path, keep_png: bool = False) -> list[pathlib.Path]:
    from PIL import Image

    graphs = {path: json.loads(path.read_text()) for path in paths}
    written = []
    with tempfile.TemporaryDirectory(prefix="bsa_thumbs_") as tmp:
        tmp = pathlib.Path(tmp)
        with cs.ComfyServer(tmp / "comfy", placeholders=cs.model_names(graphs.values())) as server, \
                cb.Frontend(server.url, *VIEWPORT) as frontend:
            frontend.page.evaluate("async () => { const s = window.app.extensionManager.setting;"
                                   " await s.set('Comfy.Graph.CanvasInfo', false); }")
            frontend.page.add_style_tag(content=HIDE_CHROME)
            for path, graph in graphs.items():
                nodes = frontend.load(graph)
                missing = [n["type"] for n in nodes if not n["registered"]]
                if missing:
                    raise SystemExit(f"{path.name}: the frontend does not know {missing}")
                frontend.fit_view()
                png = frontend.screenshot((out if keep_png else tmp) / f"{path.stem}.png")
                image = Image.open(png).convert("RGB")
                image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.LANCZOS)
                jpg = out / f"{path.stem}.jpg"
                image.save(jpg, "JPEG", quality=QUALITY, optimize=True)
                written.append(jpg)
                print(f"{jpg}  {image.width}x{image.height}  {jpg.stat().st_size // 1024} KiB")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflows", nargs="*", type=pathlib.Path, help="UI workflows (default: workflows/*.json "
                                                                          "but *_api.json)")
    parser.add_argument("--out", type=pathlib.Path, default=cs.WORKFLOWS, help="folder for the .jpg files")
    parser.add_argument("--png", action="store_true", help="keep the full-size PNG screenshots in --out too")
    args = parser.parse_args(argv)
    missing = cb.missing_requirements()
    if missing:
        raise SystemExit("cannot take screenshots: " + "; ".join(missing))
    paths = [p.resolve() for p in args.workflows] or cs.ui_workflows()
    args.out.mkdir(parents=True, exist_ok=True)
    make_thumbnails(paths, args.out, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
