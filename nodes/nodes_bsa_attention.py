"""The "BSA Sparse Attention" model patch node: maps its inputs onto bsa_core.patch.apply_bsa."""
from comfy_api.latest import io

from ..bsa_core.config import RECOMMENDED, THRESHOLD_MODES, BSAConfig, parse_cube_size
from ..bsa_core.patch import apply_bsa, parse_block_list
from ..bsa_core.report import find_report_spec

CUBE_SIZES = ("4x4x4", "2x8x8", "4x4x8", "4x8x8")
DEFAULT = RECOMMENDED  # chosen from the Pareto sweep: see bsa_core/config.py


class BSASparseAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BSASparseAttention",
            display_name="BSA Sparse Attention",
            category="model_patches/attention",
            description="Bidirectional Sparse Attention for video models (Wan 2.1/2.2, HunyuanVideo, LTX-Video, Cosmos "
                        "predict2, Mochi): in each cube of video tokens "
                        "only the least redundant queries are computed, and each cube attends only the KV cubes that "
                        "carry most of its attention mass. Calls it cannot take (cross-attention, masks, short "
                        "sequences, steps outside start/end, dense_blocks) run the normal attention; text and reference "
                        "tokens in joint attention are always computed and attended.",
            inputs=[
                io.Model.Input("model", tooltip="The video diffusion model to patch (a patched copy is returned)."),
                io.Float.Input("keep_ratio", default=DEFAULT.keep_ratio, min=0.05, max=1.0, step=0.05,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="Share of queries computed in each cube (0.05-1.0). Lower is faster; dropped "
                                       "queries copy the output of their most similar kept query. 1.0 computes all "
                                       "(default: on video-like attention, dropping queries costs far more accuracy "
                                       "than skipping KV cubes)."),
                io.Float.Input("kv_threshold", default=DEFAULT.kv_threshold, min=0.05, max=1.0, step=0.01,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="Share of estimated attention mass (0.05-1.0) whose KV cubes each query cube "
                                       "attends (cumulative mode only). Lower is sparser and faster; 1.0 attends all."),
                io.Combo.Input("cube_size", options=list(CUBE_SIZES), default=CUBE_SIZES[0],
                               tooltip="Cube of latent tokens, frames x height x width (after patchify). Selection "
                                       "works per cube; 64-token cubes by default, 128 tokens fill GPU tiles better."),
                io.Combo.Input("threshold_mode", options=list(THRESHOLD_MODES), default=DEFAULT.threshold_mode,
                               tooltip="statistical (default): keep KV cubes whose score is >= mean + stat_lambda x "
                                       "std of the row; adapts to each head, kv_threshold unused. cumulative: keep "
                                       "KV cubes until kv_threshold of the estimated mass is reached."),
                io.Float.Input("start_percent", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress (0-1) where BSA starts; earlier steps stay dense, which "
                                       "protects the layout the first steps decide."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress (0-1) where BSA ends; later steps stay dense."),
                io.Float.Input("stat_lambda", default=DEFAULT.stat_lambda, min=-4.0, max=4.0, step=0.05, optional=True,
                               tooltip="statistical mode only: threshold in standard deviations above the row's "
                                       "mean block score. Higher keeps fewer KV cubes: 1.0 kept ~15 % of them, 2.0 ~2 %."),
                io.Int.Input("min_blocks", default=1, min=1, max=4096, optional=True,
                             tooltip="Fewest KV cubes (count) each query cube attends, its own cube included. "
                                     "Higher is safer and slower."),
                io.String.Input("dense_blocks", default="", optional=True,
                                tooltip="Transformer blocks (0-based numbers or ranges) that always run dense, "
                                        "e.g. '0,1,29' or '0-1'. Empty: none."),
                io.Int.Input("min_tokens", default=12288, min=0, max=1 << 20, step=256, optional=True,
                             tooltip="Sequences shorter than this many tokens stay dense, where dense attention is "
                                     "already fast. Wan 480p 81 frames has 32760 tokens."),
                io.Boolean.Input("pooled_remainder", default=DEFAULT.pooled_remainder, optional=True,
                                 tooltip="Fold every KV cube a query cube skips into its attention as one pooled "
                                         "key (the cube's mean key and value, weighted by its size): the skipped "
                                         "attention mass is approximated instead of dropped. Roughly halves the "
                                         "error for about one extra key per cube."),
            ],
            outputs=[io.Model.Output(tooltip="The model with BSA on its video self-attention.")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],  # a BSA Report downstream turns recording on
        )

    @classmethod
    def execute(cls, model, keep_ratio, kv_threshold, cube_size, threshold_mode, start_percent, end_percent,
                stat_lambda=DEFAULT.stat_lambda, min_blocks=1, dense_blocks="", min_tokens=12288,
                pooled_remainder=DEFAULT.pooled_remainder) -> io.NodeOutput:
        config = BSAConfig(cube_size=parse_cube_size(cube_size), keep_ratio=keep_ratio, kv_threshold=kv_threshold,
                           threshold_mode=threshold_mode, stat_lambda=stat_lambda, min_blocks=min_blocks,
                           pooled_remainder=pooled_remainder)
        record = find_report_spec(getattr(cls.hidden, "prompt", None), getattr(cls.hidden, "unique_id", None))
        return io.NodeOutput(apply_bsa(model, config, start_percent, end_percent,
                                       parse_block_list(dense_blocks), min_tokens, record=record))
