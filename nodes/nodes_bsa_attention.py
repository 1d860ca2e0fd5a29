"""The "BSA Sparse Attention" model patch node: maps its inputs onto bsa_core.patch.apply_bsa.

Widget order (what a saved UI workflow stores by position): threshold_mode first, the sparsity control of
each mode right under it, then the rest. Workflows saved before this order load through the migration in
web/bsa_migrate.js (OLD_WIDGET_ORDER there); web/bsa_mode_controls.js shows only the selected mode's sparsity
control.
"""
from comfy_api.latest import io

from ..bsa_core.config import CUBE_SIZES, RECOMMENDED, RECOMMENDED_PATCH, THRESHOLD_MODES, BSAConfig, node_cube_size
from ..bsa_core.patch import apply_bsa, parse_block_ranges

DEFAULT, PATCH = RECOMMENDED, RECOMMENDED_PATCH  # one source: bsa_core/config.py
DEFAULT_CUBE_SIZE = "x".join(map(str, DEFAULT.cube_size))


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
                io.Combo.Input("threshold_mode", options=list(THRESHOLD_MODES), default=DEFAULT.threshold_mode,
                               tooltip="How each query cube picks its KV cubes. statistical (default): cubes whose "
                                       "score is >= mean + stat_lambda x std of the row; adapts to each head. "
                                       "cumulative: cubes until kv_threshold of the estimated attention mass."),
                io.Float.Input("stat_lambda", default=DEFAULT.stat_lambda, min=-4.0, max=4.0, step=0.05,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="statistical mode only: threshold in standard deviations above the row's "
                                       "mean block score. Higher keeps fewer KV cubes (faster): 1.0 kept ~15 % of "
                                       "them on video-like attention, 2.0 ~2 %. Ignored in cumulative mode."),
                io.Float.Input("kv_threshold", default=DEFAULT.kv_threshold, min=0.05, max=1.0, step=0.01,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="cumulative mode only: share of estimated attention mass (0.05-1.0) whose "
                                       "KV cubes each query cube attends. Lower is sparser and faster; 1.0 attends "
                                       "all. Ignored in statistical mode."),
                io.Float.Input("keep_ratio", default=DEFAULT.keep_ratio, min=0.05, max=1.0, step=0.05,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="Both modes: share of queries computed in each cube (0.05-1.0). Lower is "
                                       "faster; dropped queries copy the output of their most similar kept query. "
                                       "1.0 computes all (default: on video-like attention, dropping queries costs "
                                       "far more accuracy than skipping KV cubes)."),
                io.Combo.Input("cube_size", options=list(CUBE_SIZES), default=DEFAULT_CUBE_SIZE,
                               tooltip="Both modes: cube of latent tokens, frames x height x width (after patchify). "
                                       "Selection works per cube; 64-token cubes by default, 128 tokens fill GPU "
                                       "tiles better."),
                io.Float.Input("start_percent", default=PATCH.start_percent, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress (0-1) where BSA starts; earlier steps stay dense, which "
                                       "protects the layout the first steps decide. A step exactly on it is sparse."),
                io.Float.Input("end_percent", default=PATCH.end_percent, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress (0-1) where BSA ends; later steps stay dense. A step "
                                       "exactly on it is sparse."),
                io.Int.Input("min_blocks", default=DEFAULT.min_blocks, min=1, max=4096, optional=True,
                             tooltip="Both modes: fewest KV cubes (count) each query cube attends, its own cube "
                                     "included. Higher is safer and slower."),
                io.String.Input("dense_blocks", default=PATCH.dense_blocks, optional=True,
                                tooltip="Transformer blocks (0-based numbers or ranges) that always run dense, "
                                        "e.g. '0,1,29' or '0-1'. Empty: none. Blocks past the model's last one are "
                                        "reported in the log."),
                io.Int.Input("min_tokens", default=PATCH.min_tokens, min=0, max=1 << 20, step=256, optional=True,
                             tooltip="Sequences shorter than this many tokens stay dense: there a BSA call's launch "
                                     "work can outweigh what sparsity saves (Wan 1.3B on an H200 breaks even at "
                                     "~8k tokens, Wan 14B pays from ~3k). Wan 480p has 1560 tokens a latent frame: 81 "
                                     "frames 32760, 21 frames 9360."),
                io.Boolean.Input("pooled_remainder", default=DEFAULT.pooled_remainder, optional=True,
                                 tooltip="Both modes: fold every KV cube a query cube skips into its attention as "
                                         "one pooled key (the cube's mean key and value, weighted by its size): the "
                                         "skipped attention mass is approximated instead of dropped. Roughly halves "
                                         "the error for about one extra key per cube."),
            ],
            outputs=[io.Model.Output(tooltip="The model with BSA on its video self-attention.")],
            hidden=[io.Hidden.unique_id],  # each run looks for BSA Reports of this node in the running prompt
        )

    @classmethod
    def execute(cls, model, threshold_mode=DEFAULT.threshold_mode, stat_lambda=DEFAULT.stat_lambda,
                kv_threshold=DEFAULT.kv_threshold, keep_ratio=DEFAULT.keep_ratio, cube_size=DEFAULT_CUBE_SIZE,
                start_percent=PATCH.start_percent, end_percent=PATCH.end_percent, min_blocks=DEFAULT.min_blocks,
                dense_blocks=PATCH.dense_blocks, min_tokens=PATCH.min_tokens,
                pooled_remainder=DEFAULT.pooled_remainder) -> io.NodeOutput:
        config = BSAConfig(cube_size=node_cube_size(cube_size), keep_ratio=keep_ratio, kv_threshold=kv_threshold,
                           threshold_mode=threshold_mode, stat_lambda=stat_lambda, min_blocks=min_blocks,
                           pooled_remainder=pooled_remainder)
        return io.NodeOutput(apply_bsa(model, config, start_percent, end_percent, parse_block_ranges(dense_blocks),
                                       min_tokens, node_id=getattr(cls.hidden, "unique_id", None)))
