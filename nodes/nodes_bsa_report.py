"""The "BSA Report" node: per-step, per-layer numbers of the last sampling run (a table and a plot) and one
kept-cube heat-map."""
from comfy_api.latest import io

from ..bsa_core.patch import bsa_report, last_report, remember_report_inputs, running_report_sampler
from ..bsa_core.report import ReportSpec, kept_kv_plot

DEFAULTS = ReportSpec()


class BSAReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BSAReport",
            display_name="BSA Report",
            category="model_patches/attention",
            description="What BSA did in the last sampling run of a model: per sampling step and transformer "
                        "layer the kept queries %, kept KV cubes % and attention time (a table, and the kept KV "
                        "cubes % as a plot), and a heat-map of the KV cubes each query cube attended for one step, "
                        "layer and head. The BSA Sparse Attention node upstream of `model` records only while this "
                        "node is in the workflow; without it, nothing is timed or stored.",
            inputs=[
                io.Model.Input("model", tooltip="The BSA-patched model (the output of BSA Sparse Attention, or of "
                                                "any model node after it) that the sampler used."),
                io.Latent.Input("samples", tooltip="The sampler's output latent: only makes this node run after "
                                                   "sampling. Not read."),
                io.Int.Input("step", default=DEFAULTS.step, min=-1, max=10000,
                             tooltip="Sampling step of the heat-map, 0-based; -1 = the last step that layer ran "
                                     "sparse. A step is a distinct sigma (cond and uncond share it)."),
                io.Int.Input("layer", default=DEFAULTS.layer, min=0, max=1000,
                             tooltip="Transformer block (0-based) of the heat-map."),
                io.Int.Input("head", default=DEFAULTS.head, min=0, max=1000,
                             tooltip="Attention head (0-based) of the heat-map; batch row 0."),
            ],
            outputs=[
                io.String.Output(display_name="report",
                                 tooltip="Table: one row per (step, layer) with sigma, kept queries %, kept KV "
                                         "cubes %, attention ms; then totals and a line about the heat-map."),
                io.Image.Output(display_name="heatmap",
                                tooltip="Kept KV cubes of the chosen step / layer / head: rows are query cubes, "
                                        "columns KV cubes, amber = attended. Grey with a cross when there is none."),
                # last: saved workflows link outputs by position
                io.Image.Output(display_name="kept_kv_plot",
                                tooltip="The table's kept KV cubes % as a picture: one cell per sampling step "
                                        "(columns) and layer (rows), dark = 0 %, amber = 100 %, grey = dense. Grey "
                                        "with a cross when nothing was recorded."),
            ],
            is_output_node=True,  # runs even when its outputs are unconnected, as the recording assumes
        )

    @classmethod
    def execute(cls, model, samples, step=DEFAULTS.step, layer=DEFAULTS.layer,
                head=DEFAULTS.head) -> io.NodeOutput:
        sampler = running_report_sampler()  # two samplers on one model: this Report's own sampler's run
        spec = ReportSpec(step, layer, head)
        remember_report_inputs(spec)  # widgets linked to computing nodes: recorded from the next run
        text, image = bsa_report(model, spec, sampler)
        return io.NodeOutput(text, image, kept_kv_plot(last_report(model, sampler)))
