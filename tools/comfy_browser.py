"""The real ComfyUI frontend in headless Chromium, on a server from tools/comfy_server.py.

    with ComfyServer(tmp_dir, placeholders=model_names(graphs), tiny_wan=True) as server, \\
            Frontend(server.url) as page:
        page.load(graph); page.screenshot("shot.png")

The browser is Debian's Chromium (CHROMIUM_PATH, else `chromium` on PATH) driven by Playwright; nothing
is downloaded at run time. `missing_requirements()` says why the harness (server and browser) cannot run
here.
"""
from __future__ import annotations

import os
import pathlib
import shutil

from comfy_server import comfyui_path, pinned_frontend_version

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM_PATH"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_requirements() -> list[str]:
    """Why the harness cannot run on this machine; empty when it can."""
    missing = []
    if not (comfyui_path() / "main.py").is_file():
        missing.append(f"ComfyUI not found at {comfyui_path()} (run tools/setup.sh or set COMFYUI_PATH)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright is not installed (pip install -r requirements-ci.txt)")
    if chromium_path() is None:
        missing.append("no Chromium binary (apt-get install chromium, or set CHROMIUM_PATH)")
    pinned = pinned_frontend_version()
    try:
        from importlib.metadata import version
        found = version("comfyui-frontend-package")
        if pinned and found != pinned:
            missing.append(f"comfyui-frontend-package {found} installed, ComfyUI pins {pinned}")
    except Exception:  # PackageNotFoundError
        missing.append(f"comfyui-frontend-package=={pinned} is not installed")
    return missing



_LOAD_JS = """async (graph) => {
  const app = window.app;
  await app.loadGraphData(graph);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const LG = window.LiteGraph;
  return app.graph.nodes.map(n => ({
    id: n.id, type: n.type, title: n.title,
    registered: !!LG.registered_node_types[n.type],
    has_errors: !!n.has_errors,
    virtual: !!n.isVirtualNode,  // frontend-only (Note, Reroute, PrimitiveNode): never sent to the server
  }));
}"""
_OVERLAYS_JS = """() => {
  const visible = el => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  const texts = sel => [...document.querySelectorAll(sel)].filter(visible).map(e => e.innerText.trim());
  return {dialogs: texts('.p-dialog'), toasts: texts('.p-toast-message')};
}"""
_WIDGETS_JS = """(id) => {
  const node = window.app.graph.getNodeById(id);
  const def = node.constructor.nodeData || {};
  const spec = name => ((def.input || {}).required || {})[name] || ((def.input || {}).optional || {})[name];
  return (node.widgets || []).map(w => ({
    name: w.name, type: w.type, value: w.value,
    options: JSON.parse(JSON.stringify(w.options || {})),
    tooltip: ((spec(w.name) || [])[1] || {}).tooltip || null,
    visible: node.isWidgetVisible(w), y: w.y, height: w.computedHeight,  // layout of the last drawn frame
  }));
}"""
_WIDGET_POINT_JS = """([id, name]) => {
  const app = window.app, node = app.graph.getNodeById(id);
  const widget = node.widgets.find(w => w.name === name);
  const height = widget.computedHeight || window.LiteGraph.NODE_WIDGET_HEIGHT;
  const [x, y] = app.canvas.ds.convertOffsetToCanvas(
      [node.pos[0] + node.size[0] / 2, node.pos[1] + widget.y + height / 2]);
  const rect = app.canvas.canvas.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
  return {x: rect.left + x / dpr, y: rect.top + y / dpr};
}"""
_NODE_SIZE_JS = """(id) => {
  const node = window.app.graph.getNodeById(id);
  return {size: [...node.size], fitted: node.computeSize()};
}"""
_ADD_NODE_JS = """async (type) => {
  await window.app.loadGraphData({last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [],
                                  config: {}, extra: {}, version: 0.4});
  const node = window.LiteGraph.createNode(type);
  node.pos = [80, 80];
  window.app.graph.add(node);
  window.app.canvas.setDirty(true, true);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  return node.id;
}"""


class Frontend:
    """Headless Chromium on the ComfyUI page (a context manager); `page` is the Playwright page."""

    def __init__(self, url: str, width: int = 1280, height: int = 800, profile_dir: pathlib.Path | None = None):
        self.url, self.viewport = url, {"width": width, "height": height}
        self.profile_dir = profile_dir
        self.console: list[str] = []  # console errors and warnings, uncaught errors; newest last

    def __enter__(self):
        import tempfile

        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self._profile = tempfile.TemporaryDirectory(prefix="bsa_chromium_", dir=self.profile_dir)
        self.context = self._playwright.chromium.launch_persistent_context(
            self._profile.name, executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS,
            viewport=self.viewport)
        # The "Nodes 2.0" banner keeps its dismissal in localStorage, not in the settings file.
        self.context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.page.on("console", lambda m: m.type in ("error", "warning") and self.console.append(
            f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda error: self.console.append(f"error: uncaught {error}"))
        self.page.goto(self.url)
        self.page.wait_for_function("window.app && window.app.graph && window.app.vueAppReady "
                                    "&& window.LiteGraph", timeout=90_000)
        return self

    def __exit__(self, *exc):
        self.context.close()
        self._playwright.stop()
        self._profile.cleanup()

    def errors_since(self, index: int) -> list[str]:
        """Console errors and uncaught errors after self.console[index], less the network ones this offline
        machine causes by design (404s of optional files, registry look-ups the page's CSP blocks)."""
        network = ("Failed to load resource", "violates the following Content Security Policy")
        return [m for m in self.console[index:] if m.startswith("error") and not any(n in m for n in network)]

    def load(self, graph: dict) -> list[dict]:
        """app.loadGraphData(graph) as the Open menu does; returns the graph's nodes with `registered`
        (the frontend knows the type), `has_errors` and `virtual` (frontend-only, like Note)."""
        return self.page.evaluate(_LOAD_JS, graph)

    def overlays(self) -> dict:
        """Visible dialogs (missing nodes/models) and toasts (validation) as text."""
        return self.page.evaluate(_OVERLAYS_JS)

    def widgets(self, node_id) -> list[dict]:
        """The node's widgets: name, type ('slider', 'number', 'combo', ...), value, options, and the input's
        tooltip from the node definition the frontend got from /object_info."""
        return self.page.evaluate(_WIDGETS_JS, node_id)

    def node_size(self, node_id) -> dict:
        """The node's `size` and the `fitted` size its visible inputs and widgets need (computeSize)."""
        return self.page.evaluate(_NODE_SIZE_JS, node_id)

    def select_combo(self, node_id, widget_name: str, option: str):
        """Pick `option` in a combo widget as a user does: click the widget, click the entry in its menu."""
        point = self.page.evaluate(_WIDGET_POINT_JS, [node_id, widget_name])
        self.page.mouse.click(point["x"], point["y"])
        self.page.locator(".litecontextmenu").get_by_text(option, exact=True).click()
        self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    def add_node(self, node_type: str):
        """A new graph holding one fresh node of node_type at 100% zoom; returns its id."""
        return self.page.evaluate(_ADD_NODE_JS, node_type)

    def hover_tooltip(self, node_id, widget_name: str, timeout: float = 5000) -> str:
        """Hover the mouse over a widget on the canvas and return the tooltip the frontend shows."""
        self.page.mouse.move(0, 0)
        self.page.wait_for_timeout(50)
        point = self.page.evaluate(_WIDGET_POINT_JS, [node_id, widget_name])
        self.page.mouse.move(point["x"], point["y"], steps=4)
        tooltip = self.page.locator(".node-tooltip")
        tooltip.wait_for(state="visible", timeout=timeout)
        return tooltip.inner_text().strip()

    def saved_workflow(self) -> dict:
        """The graph as a saved UI workflow stores it (widgets_values by position)."""
        return self.page.evaluate("() => window.app.graph.serialize()")

    def graph_to_prompt(self) -> dict:
        """The API prompt the Run button would queue for the loaded graph."""
        return self.page.evaluate("async () => (await window.app.graphToPrompt()).output")

    def fit_view(self, margin: float = 0.92):
        """Zoom and pan so that every node (and group) fills the canvas, after the nodes took their drawn size."""
        self.page.evaluate("""async (margin) => {
          const app = window.app, frame = () => new Promise(r => requestAnimationFrame(r));
          app.canvas.deselectAll && app.canvas.deselectAll();
          app.canvas.setDirty(true, true); await frame(); await frame();
          const rects = [...app.graph.nodes.map(n => n.boundingRect), ...(app.graph.groups || []).map(g => g._bounding)];
          const x0 = Math.min(...rects.map(r => r[0])), y0 = Math.min(...rects.map(r => r[1]));
          const x1 = Math.max(...rects.map(r => r[0] + r[2])), y1 = Math.max(...rects.map(r => r[1] + r[3]));
          app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], {zoom: margin});
          app.canvas.setDirty(true, true); await frame(); await frame();
        }""", margin)
        self.page.mouse.move(0, self.viewport["height"] - 1)

    def screenshot(self, path, **kwargs) -> pathlib.Path:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), **kwargs)
        return path
