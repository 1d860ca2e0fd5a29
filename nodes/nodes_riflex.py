"""The "RIFLEx Extend" model patch node: maps its inputs onto bsa_core.riflex.apply_riflex."""
from comfy_api.latest import io

from ..bsa_core.riflex import SAFETY, apply_riflex, latent_length


class RIFLExExtend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RIFLExExtend",
            display_name="RIFLEx Extend",
            category="model_patches/video",
            description="RIFLEx (ICML 2025): lets a RoPE video model (Wan 2.1/2.2, HunyuanVideo) generate about 2x "
                        "its training length without the video starting over, by lowering the one temporal RoPE "
                        "frequency that would wrap within the target length. Does nothing when the target length "
                        "fits the training range.",
            inputs=[
                io.Model.Input("model", tooltip="The Wan or HunyuanVideo model to patch (a patched copy is returned)."),
                io.Int.Input("latent_frames", default=41, min=1, max=1024,
                             tooltip="Target video length in latent frames: (frames - 1) / 4 + 1, so 161 frames = 41. "
                                     "Ignored when a latent is connected."),
                io.Int.Input("k", default=0, min=0, max=64,
                             tooltip="Temporal RoPE component to lower (1-based, as in the paper). 0 = auto: the one "
                                     "with the shortest period at or above the training length (Wan 2.1: 4, "
                                     "HunyuanVideo: 4). Period and choice are logged as [RIFLEx]."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Empty video latent to read the target length from (its frame count)."),
                io.Int.Input("train_latent_frames", default=0, min=0, max=1024, optional=True,
                             tooltip="Length the model was trained at, in latent frames. 0 = the family's: Wan 2.1 and "
                                     "2.2 14B 21 (81 frames), Wan 2.2 5B 31, HunyuanVideo 33, HunyuanVideo 1.5 31."),
                io.Float.Input("safety", default=SAFETY, min=0.5, max=1.0, step=0.01, optional=True,
                               tooltip="Share of the new period the target length spans (0.5-1.0). Lower keeps the "
                                       "last frames further from repeating; 0.9 is the official value."),
            ],
            outputs=[io.Model.Output(tooltip="The model with its temporal RoPE extended (or the input model when "
                                             "nothing needs to change).")],
        )

    @classmethod
    def execute(cls, model, latent_frames, k, latent=None, train_latent_frames=0, safety=SAFETY) -> io.NodeOutput:
        if latent is not None:
            latent_frames = latent_length(latent["samples"])
        return io.NodeOutput(apply_riflex(model, latent_frames, k, train_latent_frames, safety)[0])
