"""What the "BSA Report" node shows: per sampling step and transformer block, the kept query and KV-cube
shares and the attention time, plus the kept query-cube x KV-cube matrix of the calls the reports chose.

Nothing here runs unless a report is connected: the patch builds a RunReport only for a sampling run whose
prompt has a BSA Report on that sampler's branch (or that apply_bsa was asked to record). In the hot path
the kept shares stay 0-d tensors on the attention's device and CUDA times stay event pairs; both are read
when the report is rendered. Importable without ComfyUI.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .cubes import cube_layout

REPORT_NODE = "BSAReport"
MODEL_INPUT = "model"
HEATMAP_MIN_PIXELS = 512  # small cube matrices are upscaled (nearest) to at least this many pixels
HEATMAP_MAX_PIXELS = 2048  # larger cube matrices are averaged down to this many pixels
KEPT_RGB = (1.0, 0.78, 0.2)  # amber: the query cube attends this KV cube
SKIPPED_RGB = (0.1, 0.1, 0.18)  # dark: skipped


@dataclass(frozen=True)
class ReportSpec:
    """Which call the heat-map shows: sampling step (0-based; -1 = the last step that layer ran sparse),
    transformer block, head. Batch row 0."""

    step: int = -1
    layer: int = 0
    head: int = 0


def find_report_specs(prompt: dict | None, bsa_node_id, sampler_node_id=None) -> tuple[ReportSpec, ...]:
    """The ReportSpecs of the BSA Report nodes of an API prompt that read a model made by BSA node
    `bsa_node_id` (their model input leads upstream to it) and, when `sampler_node_id` is given, that
    model is upstream of that sampler: the reports on the branch that sampler runs. Ordered by node id;
    a widget linked to a primitive node (PrimitiveInt) takes its value; one linked to a node that computes it
    takes the value that Report last received (remember_linked_values), else the default (the value is known
    only when the Report runs, after the sampler)."""
    if not isinstance(prompt, dict) or bsa_node_id is None:
        return ()
    specs = []
    for report_id in sorted(prompt, key=str):
        node = prompt[report_id]
        if not isinstance(node, dict) or node.get("class_type") != REPORT_NODE:
            continue
        inputs = node.get("inputs") or {}
        model = inputs.get(MODEL_INPUT)
        if not _leads_to(prompt, model, str(bsa_node_id)):
            continue
        if sampler_node_id is not None and not _leads_to(prompt, [str(sampler_node_id), 0], str(model[0]),
                                                         include_start=False):
            continue
        defaults = ReportSpec()
        values = {name: _widget_value(prompt, report_id, inputs.get(name), name) for name in REPORT_WIDGETS}
        spec = ReportSpec(**{name: value if value is not None else getattr(defaults, name)
                             for name, value in values.items()})
        if spec not in specs:
            specs.append(spec)
    return tuple(specs)


REPORT_WIDGETS = ("step", "layer", "head")
_linked_values: dict[tuple[str, str], int] = {}  # (Report node id, widget) -> value its computing link gave last


def remember_linked_values(prompt: dict | None, report_id, spec: ReportSpec) -> None:
    """The Report `report_id` of `prompt` runs with `spec`: keeps the values of its widgets linked to a node
    that computes them, for the next run's sampler to record (find_report_specs); without this, such a Report
    asked every run for a heat-map that no run recorded."""
    node = (prompt or {}).get(str(report_id))
    inputs = (node.get("inputs") or {}) if isinstance(node, dict) else {}
    for name in REPORT_WIDGETS:
        if _computed(prompt, inputs.get(name)):
            _linked_values[(str(report_id), name)] = getattr(spec, name)


def _computed(prompt: dict, value) -> bool:
    """A link to a node other than a primitive (its value exists only once that node has run)."""
    return _is_link(value) and _literal_int(prompt, value) is None


def _widget_value(prompt: dict, report_id, value, name: str) -> int | None:
    """A Report widget's value as the sampler can know it: literal, from a primitive, or remembered."""
    literal = _literal_int(prompt, value)
    if literal is None and _is_link(value):
        return _linked_values.get((str(report_id), name))
    return literal


def _is_link(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], int)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _literal_int(prompt: dict, value) -> int | None:
    """An int widget value, or the literal `value` of the primitive node (PrimitiveInt) a link comes from."""
    if _is_link(value):
        node = prompt.get(str(value[0]), prompt.get(value[0]))
        if not (isinstance(node, dict) and str(node.get("class_type", "")).startswith("Primitive")):
            return None
        value = (node.get("inputs") or {}).get("value")
    return value if _is_int(value) else None


def _leads_to(prompt: dict, link, target: str, include_start: bool = True) -> bool:
    """Whether following `link` ([node_id, output_index]) and every link upstream of it reaches `target`.
    include_start=False: only the inputs of link's node and upstream of them count."""
    pending, seen = [link], set()
    while pending:
        value = pending.pop()
        if not _is_link(value):
            continue
        source = str(value[0])
        if source == target and (include_start or value is not link):
            return True
        if source in seen:
            continue
        seen.add(source)
        node = prompt.get(source, prompt.get(value[0]))
        if isinstance(node, dict):
            pending.extend((node.get("inputs") or {}).values())
    return False


class _Timer:
    """Attention time of one call: a CUDA event pair (read when the report is rendered) or perf_counter."""

    def __init__(self, device: torch.device):
        self._start = self._end = None
        self._ms = None
        if device.type == "cuda":
            self._stream = torch.cuda.current_stream(device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record(self._stream)
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> _Timer:
        if self._start is not None:
            self._end = torch.cuda.Event(enable_timing=True)
            self._end.record(self._stream)
        else:
            self._ms = 1e3 * (time.perf_counter() - self._t0)
        return self

    def ms(self) -> float:
        if self._ms is None:
            self._end.synchronize()
            self._ms = self._start.elapsed_time(self._end)
        return self._ms


@dataclass
class _Row:
    """The calls of one (step, block): cond and uncond run as one call when batched, two otherwise."""

    sigma: float | None
    sparse_calls: int = 0
    dense_calls: int = 0
    kept_query_sum: object = 0.0  # 0-d tensors once a sparse call is recorded
    kept_kv_sum: object = 0.0
    sparse_timers: list = field(default_factory=list)
    dense_timers: list = field(default_factory=list)
    dense_reasons: list = field(default_factory=list)

    @property
    def mode(self) -> str:
        return "mixed" if self.sparse_calls and self.dense_calls else "sparse" if self.sparse_calls else "dense"

    def kept_pct(self) -> tuple[float, float]:
        """Mean kept query / KV-cube % over the row's sparse calls; a dense-only row keeps everything."""
        if not self.sparse_calls:
            return 100.0, 100.0
        return (100 * float(self.kept_query_sum) / self.sparse_calls,
                100 * float(self.kept_kv_sum) / self.sparse_calls)

    def ms(self) -> tuple[float, float]:
        """(sparse, dense) attention milliseconds."""
        return sum(t.ms() for t in self.sparse_timers), sum(t.ms() for t in self.dense_timers)


@dataclass
class Heatmap:
    """The kept KV-cube matrix of one call, batch row 0, one head: mask [N, N] bool, query cube x KV cube."""

    step: int
    sigma: float | None
    layer: int
    head: int
    mask: torch.Tensor | None
    how: str  # which selection produced it, or why there is no mask


class RunReport:
    """One sampling run's per-(step, block) numbers and one heat-map per ReportSpec asked for. A step is a
    sampler step (every model call of it, cond and uncond, heun's second call...), numbered and given its
    sigma by the sampler's own schedule on the host: nothing is read back from the GPU while sampling."""

    def __init__(self, specs: tuple[ReportSpec, ...]):
        self.specs = tuple(specs)
        self.rows: dict[tuple[int, int], _Row] = {}
        self.step = 0
        self.sigma: float | None = None
        self.heatmaps: dict[ReportSpec, Heatmap] = {}

    def begin_forward(self, step: int, sigma: float | None) -> None:
        """A model call of sampler step `step` (schedule sigma `sigma`, a host number) starts."""
        self.step, self.sigma = step, sigma

    def _row(self, block: int) -> _Row:
        row = self.rows.get((self.step, block))
        if row is None:
            row = self.rows[(self.step, block)] = _Row(self.sigma)
        return row

    @staticmethod
    def start_timer(q: torch.Tensor) -> _Timer:
        return _Timer(q.device)

    def record_sparse(self, block: int, timer: _Timer, kept_query_fraction, kept_kv_fraction) -> None:
        timer.stop()
        row = self._row(block)
        row.sparse_calls += 1
        row.kept_query_sum = row.kept_query_sum + kept_query_fraction
        row.kept_kv_sum = row.kept_kv_sum + kept_kv_fraction
        row.sparse_timers.append(timer)

    def record_dense(self, block: int, timer: _Timer, reason: str) -> None:
        timer.stop()
        row = self._row(block)
        row.dense_calls += 1
        row.dense_timers.append(timer)
        if reason not in row.dense_reasons:
            row.dense_reasons.append(reason)

    def wanted_selections(self, block: int) -> list[ReportSpec]:
        """The specs that want this call's selection: their layer at their step (every step for step -1:
        the last one stays), first call of the step."""
        wanted = []
        for spec in self.specs:
            if block != spec.layer or (spec.step >= 0 and self.step != spec.step):
                continue
            heatmap = self.heatmaps.get(spec)
            if heatmap is None or heatmap.step != self.step:
                wanted.append(spec)
        return wanted

    def capture_selection(self, spec: ReportSpec, block: int, q: torch.Tensor, k: torch.Tensor, grid, config,
                          n_prefix: int, scale: float | None, backend: str) -> None:
        """Selects again, on the side, for batch row 0 and spec's head of this call (q, k [B, H, L, D]):
        the Triton selection when the call ran on the kernels, else the reference."""
        head = spec.head
        if not 0 <= head < q.shape[1]:
            self.heatmaps[spec] = Heatmap(self.step, self.sigma, block, head, None,
                                          f"head {head} out of range: the model has {q.shape[1]} heads "
                                          f"(0-{q.shape[1] - 1})")
            return
        layout = cube_layout(grid, config.cube_size, q.device)
        video = slice(n_prefix, n_prefix + layout.num_tokens)
        q_cubes, k_cubes = (layout.to_cubes(x[:1, head:head + 1, video, :]) for x in (q, k))
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        selection, how = _select(q_cubes, k_cubes, layout, config, scale, backend)
        self.heatmaps[spec] = Heatmap(self.step, self.sigma, block, head, selection.to_dense()[0, 0], how)

    def table(self) -> str:
        """One row per (step, block), then the totals."""
        steps = sorted({step for step, _ in self.rows})
        blocks = sorted({block for _, block in self.rows})
        title = (f"BSA report: {len(steps)} steps x {len(blocks)} layers of self-attention (cross-attention not "
                 "shown); kept %: mean over the row's sparse calls; calls: cond and uncond batched count once")
        header = (f"{'step':>4} {'sigma':>8} {'layer':>5} {'mode':>6} {'kept queries %':>14} "
                  f"{'kept KV cubes %':>15} {'attention ms':>12} {'calls':>5}  note")
        lines = [title, header]
        sparse_calls = dense_calls = 0
        kept_q_sum = kept_kv_sum = sparse_ms = dense_ms = 0.0
        for (step, block), row in sorted(self.rows.items()):
            kept_q, kept_kv = row.kept_pct()
            row_sparse_ms, row_dense_ms = row.ms()
            sigma = "-" if row.sigma is None else f"{row.sigma:.4f}"
            lines.append(f"{step:>4} {sigma:>8} {block:>5} {row.mode:>6} {kept_q:>14.1f} {kept_kv:>15.1f} "
                         f"{row_sparse_ms + row_dense_ms:>12.3f} {row.sparse_calls + row.dense_calls:>5}  "
                         f"{'; '.join(row.dense_reasons)}".rstrip())
            sparse_calls, dense_calls = sparse_calls + row.sparse_calls, dense_calls + row.dense_calls
            kept_q_sum, kept_kv_sum = kept_q_sum + float(row.kept_query_sum), kept_kv_sum + float(row.kept_kv_sum)
            sparse_ms, dense_ms = sparse_ms + row_sparse_ms, dense_ms + row_dense_ms
        kept = (f"kept queries {100 * kept_q_sum / sparse_calls:.1f}%, kept KV cubes "
                f"{100 * kept_kv_sum / sparse_calls:.1f}%" if sparse_calls else "no sparse call")
        lines.append(f"total: {sparse_calls} sparse calls, {kept}, {sparse_ms:.3f} ms; "
                     f"{dense_calls} dense calls, {dense_ms:.3f} ms")
        return "\n".join(lines)


def _select(q_cubes, k_cubes, layout, config, scale: float, backend: str):
    if backend == "triton":  # the call itself just ran on the kernels: they import
        from .gpu_select import select_triton
        return select_triton(q_cubes, k_cubes, layout, config, scale), "Triton selection"
    from .reference import bsa_select
    return bsa_select(q_cubes, k_cubes, layout, config, scale), "reference selection"


def heatmap_image(mask: torch.Tensor) -> torch.Tensor:
    """[N, M] bool -> [1, H, W, 3] float in 0..1: dark = skipped, amber = attended. Small matrices are
    upscaled (nearest) to at least HEATMAP_MIN_PIXELS; one over HEATMAP_MAX_PIXELS cubes is averaged
    down, each pixel shaded by the kept share of the cubes it covers."""
    kept = mask.detach().to("cpu", torch.float32)
    side = max(kept.shape)
    shrink = heatmap_shrink(side)
    if shrink > 1:
        kept = torch.nn.functional.avg_pool2d(kept[None, None], shrink, ceil_mode=True)[0, 0]
    scale = max(1, -(-HEATMAP_MIN_PIXELS // side))
    colours = torch.lerp(torch.tensor(SKIPPED_RGB), torch.tensor(KEPT_RGB), kept[..., None])
    return colours.repeat_interleave(scale, 0).repeat_interleave(scale, 1)[None].contiguous()


def heatmap_shrink(cubes: int) -> int:
    """Cubes per pixel along each axis of the heat-map of `cubes` x `cubes`."""
    return -(-cubes // HEATMAP_MAX_PIXELS)


def placeholder_image(size: int = 256) -> torch.Tensor:
    """Grey with a dark cross: nothing to show. [1, size, size, 3]."""
    image = torch.full((size, size, 3), 0.5)
    i = torch.arange(size)
    width = max(1, size // 32)
    cross = ((i[:, None] - i[None]).abs() < width) | ((i[:, None] + i[None] - (size - 1)).abs() < width)
    image[cross] = 0.2
    return image[None]


def render(report: RunReport | None, spec: ReportSpec, no_report_message: str) -> tuple[str, torch.Tensor]:
    """(table + heat-map line, heat-map image) of a finished run; the message and a placeholder without one."""
    if report is None or not report.rows:
        return no_report_message, placeholder_image()
    text = report.table()
    if spec not in report.specs:
        recorded = "; ".join(f"step {s.step}, layer {s.layer}, head {s.head}" for s in report.specs)
        note = (f"heat-map: this run recorded {recorded}; step {spec.step}, layer {spec.layer}, head {spec.head} "
                "is recorded from the next sampling run (change the seed or any sampler input and queue again)")
        return f"{text}\n{note}", placeholder_image()
    heatmap = report.heatmaps.get(spec)
    step_text = f"step {spec.step}" if spec.step >= 0 else "step -1 (the last step it ran sparse)"
    if heatmap is None:
        rows = [row for (step, layer), row in report.rows.items()
                if layer == spec.layer and (spec.step < 0 or step == spec.step)]
        why = (f"not in this run (steps 0-{max(s for s, _ in report.rows)}, layers "
               f"{min(b for _, b in report.rows)}-{max(b for _, b in report.rows)})" if not rows else
               "it ran dense: " + "; ".join(dict.fromkeys(r for row in rows for r in row.dense_reasons)))
        return f"{text}\nheat-map: {step_text}, layer {spec.layer}: {why}", placeholder_image()
    if heatmap.mask is None:
        return f"{text}\nheat-map: {heatmap.how}", placeholder_image()
    mask = heatmap.mask.cpu()
    kept, total = int(mask.sum()), mask.numel()
    sigma = "" if heatmap.sigma is None else f" (sigma {heatmap.sigma:.4f})"
    note = (f"heat-map: step {heatmap.step}{sigma}, layer {heatmap.layer}, head {heatmap.head}, batch row 0: "
            f"{mask.shape[0]} query cubes (rows) x {mask.shape[1]} KV cubes (columns), {kept}/{total} kept "
            f"({100 * kept / total:.1f}%), {heatmap.how}")
    shrink = heatmap_shrink(max(mask.shape))
    if shrink > 1:
        note += f"; image: {shrink}x{shrink} cubes a pixel, shaded by their kept share"
    return f"{text}\n{note}", heatmap_image(mask)


DENSE_RGB = (0.42, 0.42, 0.46)  # grey: the (step, layer) ran dense only
PLOT_CELL_PIXELS = (10, 40)  # each (step, layer) cell of the kept-KV plot is a square of this many pixels
PLOT_MAX_PIXELS = 960  # ... as large as fits into this many pixels per axis
PLOT_MARGINS = (70, 40, 90, 56)  # pixels left (layer labels), top (title), right (colour bar), bottom (step labels)


def kept_kv_plot(report: RunReport | None) -> torch.Tensor:
    """The report table's kept KV cubes % as a picture: one cell per sampling step (columns) and layer
    (rows), from dark (0 %) to amber (100 %) like the heat-map, grey where the layer ran dense, the value
    written in cells that are large enough, and a colour bar. [1, H, W, 3] float in 0..1; the placeholder
    without a finished run."""
    if report is None or not report.rows:
        return placeholder_image()
    from PIL import Image, ImageDraw, ImageFont

    steps = sorted({step for step, _ in report.rows})
    layers = sorted({layer for _, layer in report.rows})
    low, high = PLOT_CELL_PIXELS
    cell = max(low, min(high, PLOT_MAX_PIXELS // max(len(steps), len(layers))))
    font = ImageFont.load_default(size=max(10, min(14, cell // 2)))
    label_w, top, bar_w, bottom = PLOT_MARGINS
    width, height = label_w + cell * len(steps) + bar_w, top + cell * len(layers) + bottom
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)

    def colour(fraction: float) -> tuple[int, int, int]:
        return tuple(round(255 * (s + (k - s) * fraction)) for s, k in zip(SKIPPED_RGB, KEPT_RGB))

    draw.text((label_w, 10), "kept KV cubes % per sampling step and layer", fill=(0, 0, 0), font=font)
    for (step, layer), row in report.rows.items():
        x, y = label_w + cell * steps.index(step), top + cell * layers.index(layer)
        kept = None if not row.sparse_calls else row.kept_pct()[1]
        fill = tuple(round(255 * c) for c in DENSE_RGB) if kept is None else colour(kept / 100)
        draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=fill, outline=(255, 255, 255))
        if cell >= 28:
            text = "d" if kept is None else f"{kept:.0f}"
            ink = (0, 0, 0) if kept is not None and kept > 50 else (255, 255, 255)
            draw.text((x + cell / 2, y + cell / 2), text, fill=ink, font=font, anchor="mm")
    # axis labels: every layer / step when they fit, else every k-th
    for values, along_x in ((layers, False), (steps, True)):
        every = max(1, -(-18 // cell))
        for i, value in enumerate(values):
            if i % every:
                continue
            if along_x:
                draw.text((label_w + cell * i + cell / 2, top + cell * len(layers) + 4), str(value), fill=(0, 0, 0),
                          font=font, anchor="mt")
            else:
                draw.text((label_w - 6, top + cell * i + cell / 2), str(value), fill=(0, 0, 0), font=font, anchor="rm")
    draw.text((label_w + cell * len(steps) / 2, height - 8), "sampling step", fill=(0, 0, 0), font=font, anchor="mb")
    draw.text((6, top - 14), "layer", fill=(0, 0, 0), font=font)
    # colour bar: 100 % at the top, 0 % at the bottom, and the dense swatch under it
    bar_x, bar_h = width - bar_w + 16, max(40, cell * len(layers) - 24)
    for i in range(bar_h):
        draw.line((bar_x, top + i, bar_x + 14, top + i), fill=colour(1 - i / max(1, bar_h - 1)))
    draw.text((bar_x + 18, top), "100%", fill=(0, 0, 0), font=font, anchor="lt")
    draw.text((bar_x + 18, top + bar_h), "0%", fill=(0, 0, 0), font=font, anchor="lb")
    dense_y = top + bar_h + 6
    draw.rectangle((bar_x, dense_y, bar_x + 14, dense_y + 14), fill=tuple(round(255 * c) for c in DENSE_RGB))
    draw.text((bar_x + 18, dense_y + 7), "dense", fill=(0, 0, 0), font=font, anchor="lm")
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return (pixels.float() / 255)[None]
