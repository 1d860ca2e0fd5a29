"""The TDQ nodes: calibrate interval generators, and patch a model's linear layers to FP8 (compression.tdq)."""
import os

import comfy.samplers
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..compression.tdq import MODES, TDQCalibration, TDQConfig, apply_tdq, calibrate_tdq

TDQCalibrationType = io.Custom("TDQ_CALIBRATION")
CATEGORY = "model_patches/quantization"


class TDQCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TDQCalibrate",
            display_name="TDQ Calibrate (FP8)",
            category=CATEGORY,
            description="Samples the prompt a few times, records every transformer-block linear layer's input range "
                        "per timestep and fits TDQ's interval generators (one small MLP per layer). Saves them to "
                        "output/<filename_prefix>.safetensors, tied to this model's weights. Experimental.",
            inputs=[
                io.Model.Input("model", tooltip="The unpatched model to calibrate (connect before BSA / LoRA)."),
                io.Conditioning.Input("positive", tooltip="Calibration prompt."),
                io.Conditioning.Input("negative", tooltip="Negative prompt of the calibration runs."),
                io.Latent.Input("latent_image", tooltip="Empty latent of the size to calibrate at (smaller is "
                                                        "faster; ranges depend little on size)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="First calibration seed."),
                io.Int.Input("seeds", default=2, min=1, max=64,
                             tooltip="Sampling runs (seeds seed..seed+seeds-1). More runs: steadier intervals, "
                                     "proportionally longer calibration."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Sampling steps per run: the timesteps "
                                                                            "recorded (use the steps you sample with)."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, tooltip="CFG scale of the runs."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler of the calibration runs."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="Scheduler of the calibration runs."),
                io.String.Input("filename_prefix", default="tdq/calibration",
                                tooltip="File under ComfyUI's output folder, without .safetensors; empty = not saved."),
                io.Int.Input("fit_steps", default=400, min=1, max=100000, optional=True,
                             tooltip="Adam steps of the generator fit (all layers at once; ~1 ms each per 100 layers)."),
            ],
            outputs=[TDQCalibrationType.Output(display_name="calibration",
                                               tooltip="The fitted generators and recorded ranges, for TDQ FP8 Linear.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, seeds, steps, cfg, sampler_name, scheduler,
                filename_prefix, fit_steps=400) -> io.NodeOutput:
        bar = comfy.utils.ProgressBar(1)
        calibration = calibrate_tdq(model, [(positive, negative)], latent_image, steps, cfg, sampler_name, scheduler,
                                    seed, seeds, fit_steps,
                                    progress=lambda done, total: bar.update_absolute(done, total))
        if filename_prefix.strip():
            path = os.path.join(folder_paths.get_output_directory(), filename_prefix.strip() + ".safetensors")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            calibration.save(path)
        return io.NodeOutput(calibration)


class TDQQuantize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TDQQuantize",
            display_name="TDQ FP8 Linear Layers",
            category=CATEGORY,
            description="Runs the transformer-block linear layers in FP8 e4m3 (weights per output channel, "
                        "activations with a scale per timestep): torch._scaled_mm on sm89+ GPUs, the same numbers "
                        "through fake quantization elsewhere (float32: slower than without TDQ). Chains with BSA, "
                        "LoRA and TorchCompileModel. Experimental.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a patched copy is returned)."),
                io.Combo.Input("mode", options=list(MODES), default="tdq",
                               tooltip="Activation scale: tdq = calibrated generator per timestep; static = one "
                                       "calibrated max; table = calibrated max per timestep bin; dynamic = per-token "
                                       "absmax each call (no calibration, slower); off = unchanged."),
                TDQCalibrationType.Input("calibration", optional=True,
                                         tooltip="From TDQ Calibrate (static, table, tdq need it)."),
                io.String.Input("calibration_file", default="", optional=True,
                                tooltip="A saved calibration, relative to the output folder or absolute; used when "
                                        "no calibration is connected. It must be this model's (weights hash)."),
                io.Boolean.Input("fast_accumulation", default=False, optional=True,
                                 tooltip="Hopper/Ada FP8 matmuls without float32 promotion of partial sums: faster, "
                                         "less exact in wide layers. Off by default; no effect without _scaled_mm."),
            ],
            outputs=[io.Model.Output(tooltip="The model with FP8 linear layers.")],
        )

    @classmethod
    def fingerprint_inputs(cls, calibration_file="", **kwargs):
        """A calibration file written again under the same name (by TDQ Calibrate) is a new input: its time."""
        path = os.path.join(folder_paths.get_output_directory(), calibration_file.strip())
        return os.path.getmtime(path) if calibration_file.strip() and os.path.isfile(path) else ""

    @classmethod
    def execute(cls, model, mode, calibration=None, calibration_file="", fast_accumulation=False) -> io.NodeOutput:
        if calibration is None and calibration_file.strip() and mode in ("static", "table", "tdq"):
            path = os.path.join(folder_paths.get_output_directory(), calibration_file.strip())
            if not os.path.isfile(path):
                raise ValueError(f"calibration_file {path} does not exist")
            calibration = TDQCalibration.load(path)
        return io.NodeOutput(apply_tdq(model, TDQConfig(mode=mode, fast_accum=fast_accumulation), calibration))
