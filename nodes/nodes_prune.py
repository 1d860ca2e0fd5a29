"""The "Prune Linears 2:4" and "Activation Sparsity (TEAL)" model patch nodes (experimental): map their inputs
onto compression.sparsity24.apply_sparsity24 and compression.activation_sparsity.apply_activation_sparsity."""
from comfy_api.latest import io

from ..compression.activation_sparsity import ActivationSparsityConfig, apply_activation_sparsity
from ..compression.linears import CalibrationSampling
from ..compression.sparsity24 import LAYER_RULES, METHODS, Sparsity24Config, apply_sparsity24

PRUNE_DEFAULTS = Sparsity24Config()
TEAL_DEFAULTS = ActivationSparsityConfig()
SAMPLING_DEFAULTS = CalibrationSampling(positive=[], negative=[], latent={})


def calibration_inputs() -> list:
    """The inputs both nodes calibrate with: the prompts and latent to sample, and how."""
    return [
        io.Conditioning.Input("positive", tooltip="Calibration prompt(s): the layers' inputs are recorded while "
                                                  "these are sampled."),
        io.Conditioning.Input("negative", tooltip="Negative prompt of the calibration sampling."),
        io.Latent.Input("latent", tooltip="Empty latent of the calibration sampling (its size sets the token "
                                          "count; use the size you will generate at). First batch entry only."),
        io.Int.Input("calibration_samples", default=SAMPLING_DEFAULTS.samples, min=1, max=64, optional=True,
                     tooltip="Seeds sampled for calibration (each a full sampling run; time grows linearly)."),
        io.Int.Input("calibration_steps", default=SAMPLING_DEFAULTS.steps, min=1, max=200, optional=True,
                     tooltip="Sampling steps of each calibration run (euler, simple schedule)."),
        io.Float.Input("calibration_cfg", default=SAMPLING_DEFAULTS.cfg, min=0.0, max=100.0, step=0.1, optional=True,
                       tooltip="CFG scale of the calibration sampling."),
        io.Int.Input("calibration_seed", default=SAMPLING_DEFAULTS.seed, min=0, max=2**31 - 1, optional=True,
                     tooltip="First calibration seed; the others follow it."),
    ]


def sampling_of(positive, negative, latent, calibration_samples, calibration_steps, calibration_cfg,
                calibration_seed) -> CalibrationSampling:
    return CalibrationSampling(positive, negative, latent, calibration_samples, calibration_steps,
                               calibration_cfg, seed=calibration_seed)


class PruneLinears24(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PruneLinears24",
            display_name="Prune Linears 2:4 (experimental)",
            category="model_patches/compression",
            description="2:4 semi-structured pruning of a Wan model's attention and FFN linears: in every 4 "
                        "weights along the input, 2 are zeroed (magnitude or Wanda, calibrated by sampling). "
                        "Layers whose relative output error exceeds max_error stay dense. On GPUs with 2:4 "
                        "sparse tensor cores the weights run through cuSPARSELt; elsewhere masked dense (no "
                        "speed-up). Quality drops without a recovery fine-tune.",
            inputs=[
                io.Model.Input("model", tooltip="The Wan model to prune (a patched copy is returned)."),
                *calibration_inputs()[:3],
                io.Combo.Input("method", options=list(METHODS), default=PRUNE_DEFAULTS.method,
                               tooltip="wanda: score |W| x input channel norm (keeps weights on loud inputs); "
                                       "magnitude: score |W|."),
                io.Combo.Input("layers", options=list(LAYER_RULES), default=PRUNE_DEFAULTS.layers,
                               tooltip="fast: only layer shapes where 2:4 beats dense (Wan 14B-sized layers on "
                                       "H100/H200); all: every attention / FFN linear (for quality tests)."),
                io.Float.Input("max_error", default=PRUNE_DEFAULTS.max_error, min=0.0, max=10.0, step=0.01,
                               tooltip="Largest relative output error of a pruned layer on calibration inputs "
                                       "(0.3 = 30%); layers above it stay dense. Measured on the small trained "
                                       "video model: 0.1 keeps samples >= 30 dB PSNR, 0.2 gave 23 dB."),
                *calibration_inputs()[3:],
            ],
            outputs=[io.Model.Output(tooltip="The model with the chosen layers 2:4-pruned."),
                     io.String.Output(display_name="report",
                                      tooltip="Per layer: shape, relative output error, pruned or why not.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, method, layers, max_error, **calibration) -> io.NodeOutput:
        config = Sparsity24Config(method=method, layers=layers, max_error=max_error)
        clone, result = apply_sparsity24(model, config, sampling_of(positive, negative, latent,
                                                                    **_with_defaults(calibration)))
        return io.NodeOutput(clone, result.to_text())


class ActivationSparsityTEAL(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActivationSparsityTEAL",
            display_name="Activation Sparsity TEAL (experimental)",
            category="model_patches/compression",
            description="Zeroes the small inputs of a Wan model's attention and FFN linears (TEAL): per layer "
                        "and sigma range, a magnitude threshold calibrated by sampling so that `target` of the "
                        "inputs fall below it. Measures the quality cost only: no kernel turns the zeros into "
                        "time yet.",
            inputs=[
                io.Model.Input("model", tooltip="The Wan model to patch (a patched copy is returned)."),
                *calibration_inputs()[:3],
                io.Float.Input("target", default=TEAL_DEFAULTS.target, min=0.0, max=0.95, step=0.01,
                               tooltip="Share of each layer's input entries to zero (0.4 = 40%). Measured on "
                                       "the small trained video model: 10% keeps 47 dB PSNR, 25% gave 25 dB, 40% "
                                       "18 dB. No kernel turns these zeros into time yet."),
                io.Int.Input("sigma_bins", default=TEAL_DEFAULTS.sigma_bins, min=1, max=64,
                             tooltip="Sigma ranges with their own thresholds (calibration steps split evenly)."),
                *calibration_inputs()[3:],
            ],
            outputs=[io.Model.Output(tooltip="The model with thresholded linear inputs."),
                     io.String.Output(display_name="report",
                                      tooltip="Per layer and sigma range: threshold and the sparsity it reaches on "
                                              "the calibration inputs. Each sampling run logs its achieved "
                                              "sparsity as [BSA compression].")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, target, sigma_bins, **calibration) -> io.NodeOutput:
        config = ActivationSparsityConfig(target=target, sigma_bins=sigma_bins)
        clone, thresholds, _ = apply_activation_sparsity(model, config, sampling_of(positive, negative, latent,
                                                                                    **_with_defaults(calibration)))
        return io.NodeOutput(clone, thresholds.to_text())


def _with_defaults(calibration: dict) -> dict:
    return {"calibration_samples": SAMPLING_DEFAULTS.samples, "calibration_steps": SAMPLING_DEFAULTS.steps,
            "calibration_cfg": SAMPLING_DEFAULTS.cfg, "calibration_seed": SAMPLING_DEFAULTS.seed, **calibration}
