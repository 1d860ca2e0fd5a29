"""Puts BSA on a ComfyUI model: an attention override on a clone, a token-layout wrapper, run stats.

Importable without ComfyUI: comfy.* is imported inside apply_bsa only.
"""
from __future__ import annotations

import logging
import math
import re
from collections import Counter

import torch

from .adapters import TokenLayout, token_layout
from .attention import attended_keys, bsa_attention_key_masked, bsa_attention_op, choose_backend, unsupported_reason
from .config import BSAConfig
from .report import ReportSpec, RunReport, render

log = logging.getLogger(__name__)

LOG_PREFIX = "[BSA]"
PATCH_KEY = "bsa_sparse_attention"
OVERRIDE_KEY = "optimized_attention_override"


def parse_block_list(text: str) -> frozenset[int]:
    """'0, 1, 28-29' -> {0, 1, 28, 29}; empty text -> no block. Anything else raises ValueError."""
    blocks = set()
    for part in filter(None, (p.strip() for p in str(text or "").split(","))):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if match is None:
            raise ValueError(f"dense_blocks must be block numbers or ranges like '0,1,28-29', got {text!r}")
        first, last = int(match[1]), int(match[2] or match[1])
        blocks.update(range(min(first, last), max(first, last) + 1))
    return frozenset(blocks)


class RunStats:
    """What one sampling run did: calls that went sparse, calls that stayed dense and why."""

    def __init__(self):
        self.sparse_calls = 0
        self.dense_reasons: Counter[str] = Counter()
        self._kept_query_sum = 0.0  # tensors on the attention's device once a call is recorded
        self._kept_kv_sum = 0.0

    @property
    def dense_calls(self) -> int:
        return sum(self.dense_reasons.values())

    def record_sparse(self, kept_query_fraction, kept_kv_fraction) -> None:
        """Accumulates 0-d tensors on the attention's device: reading a GPU number every call would stall it."""
        self.sparse_calls += 1
        self._kept_query_sum = self._kept_query_sum + kept_query_fraction
        self._kept_kv_sum = self._kept_kv_sum + kept_kv_fraction

    def as_dict(self) -> dict:
        """Mean kept percentages are over sparse calls (None without one)."""
        n = self.sparse_calls
        return {
            "sparse_calls": n,
            "dense_calls": self.dense_calls,
            "dense_reasons": dict(self.dense_reasons),
            "kept_query_pct": 100 * float(self._kept_query_sum) / n if n else None,
            "kept_kv_pct": 100 * float(self._kept_kv_sum) / n if n else None,
        }

    def summary(self) -> str:
        d = self.as_dict()
        reasons = ", ".join(f"{reason}: {count}" for reason, count in self.dense_reasons.most_common())
        kept = (f"kept queries {d['kept_query_pct']:.1f}%, kept KV cubes {d['kept_kv_pct']:.1f}%"
                if self.sparse_calls else "no sparse call")
        return f"{d['sparse_calls']} sparse / {d['dense_calls']} dense calls; {kept}" + (f" (dense: {reasons})" if reasons else "")


class BSAPatch:
    """Options of one patched model plus the state of the sampling run in progress.

    The token layout and the block counter are per model call (set by the apply-model wrapper); the stats
    and the set of already-logged reasons live until ON_CLEANUP, which logs the summary and resets.
    With `record` (a BSA Report node is connected) each run also fills a RunReport, kept after the run
    as `last_report` for the report node; without it nothing is timed or stored.
    """

    def __init__(self, config: BSAConfig, start_percent: float, end_percent: float,
                 dense_blocks=frozenset(), min_tokens: int = 0, record: ReportSpec | None = None):
        self.config = config
        self.start_percent = start_percent
        self.end_percent = end_percent
        self.dense_blocks = frozenset(dense_blocks)
        self.min_tokens = min_tokens
        self.sigma_start = math.inf  # sparse while sigma_end <= sigma <= sigma_start
        self.sigma_end = 0.0
        self._installed = []  # the overrides this patch has put on the hook
        self.record = record
        self.last_report: RunReport | None = None
        self.reset()

    def reset(self) -> None:
        """End of a run: log what it did, forget everything per run."""
        stats = getattr(self, "stats", None)
        if stats is not None and (stats.sparse_calls or stats.dense_calls):
            log.info(f"{LOG_PREFIX} run: {stats.summary()}", extra={"bsa_run": stats.as_dict()})
        report = getattr(self, "report", None)
        if report is not None and report.rows:
            self.last_report = report
        self.report: RunReport | None = None  # created by the first model call of a recorded run
        self.stats = RunStats()
        self.layout = TokenLayout("none", reason="unknown video grid")
        self.block = 0
        self.call_block = None  # transformer block of the attention call in progress (None: not a block)
        self.cross_tokens = None
        self._self_attention_pending_cross = False
        self._logged = set()

    def set_sigma_window(self, model_sampling) -> None:
        """percent -> sigma with the model's own sampling (its shift included)."""
        self.sigma_start = float(model_sampling.percent_to_sigma(self.start_percent))
        self.sigma_end = float(model_sampling.percent_to_sigma(self.end_percent))

    def begin_forward(self, layout: TokenLayout, cross_tokens: int | None = None, sigma=None) -> None:
        """A new model call: where its video tokens sit and how long its cross-attention context is;
        restart the block count. `sigma` (the call's timestep) numbers the steps of a recorded run."""
        self.block = 0
        self.layout = layout
        self.cross_tokens = cross_tokens
        self._self_attention_pending_cross = False
        if self.record is not None:
            if self.report is None:
                self.report = RunReport(self.record)
            self.report.begin_forward(sigma)

    def is_cross_attention(self, q, k) -> bool:
        """Cross-attention has its own key length, except when the text is exactly as long as the video
        (a 512-token video and umT5's 512 padded tokens): then the block order decides, since a block's
        cross-attention always follows its self-attention."""
        if q.shape[-2] != k.shape[-2]:
            return True
        if q.shape[-2] == self.cross_tokens and self._self_attention_pending_cross:
            self._self_attention_pending_cross = False
            return True
        return False

    def install(self, transformer_options: dict) -> None:
        """Put this patch's override on top of the hook, chaining whatever was there. Idempotent."""
        current = transformer_options.get(OVERRIDE_KEY)
        if any(current is mine for mine in self._installed):
            return
        override = _make_override(self, current)
        self._installed.append(override)
        transformer_options[OVERRIDE_KEY] = override

    def dense_reason(self, q, k, v, tokens: int, sigmas) -> str | None:
        """Why this call runs dense, or None when BSA takes it. q/k/v are [B, H, L, D].
        Counts self-attention calls as it goes: the k-th one of a forward is block k."""
        self.call_block = None
        if self.is_cross_attention(q, k):
            return "cross-attention"
        grid = self.layout.grid
        if grid is not None and tokens < self.layout.n_prefix + math.prod(grid):
            return "shorter than the video (e.g. text refiner)"  # not a transformer block: not counted
        self._self_attention_pending_cross = True  # a block's self-attention: its cross-attention may follow
        block = self.call_block = self.block
        self.block += 1
        if self.layout.reason is not None:
            return self.layout.reason
        if tokens < self.min_tokens:
            return f"fewer than min_tokens={self.min_tokens} tokens"
        if sigmas is not None and not (self.sigma_end <= float(sigmas.reshape(-1)[0]) <= self.sigma_start):
            return "sigma outside start_percent..end_percent"
        if block in self.dense_blocks:
            return "block listed in dense_blocks"
        return unsupported_reason(q, k, v, self.layout.grid, *self.layout.extra_tokens(tokens))

    def log_once(self, reason: str, warning: bool = False) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            (log.warning if warning else log.info)(f"{LOG_PREFIX} dense: {reason}")

    def backend(self, q) -> str:
        """Triton kernels on CUDA, the reference elsewhere; says which once per run."""
        name, why = choose_backend(q)
        if ("backend", name) not in self._logged:
            self._logged.add(("backend", name))
            log.info(f"{LOG_PREFIX} attention backend: {name} ({why})")
        return name


def _make_override(patch: BSAPatch, previous):
    """The attention override. Dense calls go to `previous` (the override that was on the hook before)
    or else to `func`, the backend ComfyUI would have used, with every argument forwarded."""

    def bsa_override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                     skip_output_reshape=False, **kwargs):
        transformer_options = kwargs.get("transformer_options") or {}
        report = patch.report  # None unless a BSA Report node is connected
        if report is not None and torch.compiler.is_compiling():
            report = None  # timers and python-side tables do not trace
        if skip_reshape:  # [B, H, L, D]
            qh, kh, vh = q, k, v
        else:  # [B, L, H*D]
            qh, kh, vh = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))

        def dense(reason: str, warning: bool = False):
            patch.stats.dense_reasons[reason] += 1
            patch.log_once(reason, warning)
            call = func if previous is None else lambda *a, **kw: previous(func, *a, **kw)
            block = patch.call_block
            timer = None if report is None or block is None else report.start_timer(q)
            out = call(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                       skip_output_reshape=skip_output_reshape, **kwargs)
            if timer is not None:
                report.record_dense(block, timer, reason)
            return out

        tokens = qh.shape[-2]
        reason = patch.dense_reason(qh, kh, vh, tokens, transformer_options.get("sigmas"))
        if reason is not None:
            return dense(reason)
        n_prefix, n_suffix = patch.layout.extra_tokens(tokens)
        keys = None
        if mask is not None:
            keys, reason = attended_keys(mask, qh.shape[0], tokens, n_prefix, n_suffix)
            if reason is not None:
                return dense(reason)
        args = dict(n_prefix=n_prefix, n_suffix=n_suffix, scale=kwargs.get("scale"), backend=patch.backend(qh))
        timer = None if report is None else report.start_timer(qh)
        try:
            if keys is None:
                out, kept_queries, kept_kv = bsa_attention_op(qh, kh, vh, patch.layout.grid, patch.config, **args)
            else:
                out, kept_queries, kept_kv = bsa_attention_key_masked(qh, kh, vh, patch.layout.grid, patch.config,
                                                                      keys, **args)
        except Exception as error:  # a failing sparse call must not kill a long render: run it dense
            return dense(f"BSA failed ({type(error).__name__}: {error})", warning=True)
        patch.stats.record_sparse(kept_queries, kept_kv)
        if report is not None:
            report.record_sparse(patch.call_block, timer, kept_queries, kept_kv)
            if report.wants_selection(patch.call_block):
                report.capture_selection(patch.call_block, qh, kh, patch.layout.grid, patch.config, n_prefix,
                                         args["scale"], args["backend"])
        if skip_output_reshape:
            return out
        return out.transpose(1, 2).flatten(-2)

    return bsa_override


def apply_bsa(model, config: BSAConfig, start_percent: float = 0.0, end_percent: float = 1.0,
              dense_blocks=frozenset(), min_tokens: int = 0, record: ReportSpec | None = None):
    """A clone of `model` (a ComfyUI ModelPatcher) whose self-attention runs BSA; `model` is untouched.
    `record`: keep per-step numbers of each run for the BSA Report node (see find_patch)."""
    import comfy.patcher_extension as pe

    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) and end_percent ({end_percent}) must satisfy "
                         "0 <= start_percent <= end_percent <= 1")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"min_tokens must be an integer >= 0, got {min_tokens!r}")
    patch = BSAPatch(config, start_percent, end_percent, dense_blocks, min_tokens, record)
    patch.set_sigma_window(model.get_model_object("model_sampling"))

    patched = model.clone()
    # own dict: the original model's transformer_options must never see the override
    options = patched.model_options["transformer_options"] = dict(patched.model_options.get("transformer_options", {}))
    patch.install(options)

    def on_prepare_state(patcher, timestep, model_options=None):
        # a node applied later (e.g. ModelSamplingSD3, another attention patch) may have changed the
        # model's sampling or replaced the override. ComfyUI 0.3.64-0.3.75 call callback(patcher, timestep);
        # model_options is taken in case a later version passes the live options
        patch.set_sigma_window(patcher.get_model_object("model_sampling"))
        patch.install((model_options if model_options is not None else patcher.model_options)["transformer_options"])

    def learn_token_layout(executor, x, *args, **kwargs):
        # apply_model wraps every family's diffusion model (Mochi's has no wrapper of its own);
        # x is the noisy latent, kwargs the model's extra conds (reference / guide latents)
        # apply_model(x, t, c_concat, c_crossattn, ...): the text context, for is_cross_attention
        context = kwargs.get("c_crossattn", args[2] if len(args) > 2 else None)
        patch.begin_forward(token_layout(executor.class_obj.diffusion_model, x.shape, kwargs),
                            context.shape[1] if isinstance(context, torch.Tensor) and context.dim() >= 2 else None,
                            sigma=args[0] if args else kwargs.get("t"))
        return executor(x, *args, **kwargs)

    def on_cleanup(patcher):
        patch.reset()

    on_cleanup.bsa_patch = patch  # find_patch: clones (LoRA, other patches) keep the callback, not a copy

    patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, PATCH_KEY, learn_token_layout)
    patched.add_callback_with_key(pe.CallbacksMP.ON_PREPARE_STATE, PATCH_KEY, on_prepare_state)
    patched.add_callback_with_key(pe.CallbacksMP.ON_CLEANUP, PATCH_KEY, on_cleanup)
    return patched


def find_patch(model) -> BSAPatch | None:
    """The BSAPatch of the last apply_bsa on `model` or on a model it was cloned from, else None. Read from
    the cleanup callback: ModelPatcher.clone deep-copies model_options (a patch stored there would be a
    copy) and a later node may cover our attention override until sampling re-installs it."""
    callbacks = getattr(model, "callbacks", None) or {}
    patches = [getattr(c, "bsa_patch", None) for c in callbacks.get("on_cleanup", {}).get(PATCH_KEY, [])]
    patches = [p for p in patches if p is not None]
    return patches[-1] if patches else None


def bsa_report(model, spec: ReportSpec) -> tuple[str, torch.Tensor]:
    """(table, heat-map image) of the last finished sampling run of `model`'s BSA patch. Asks the patch to
    record `spec` from its next run on: a cached BSA node is not executed again to learn of the report."""
    patch = find_patch(model)
    if patch is None:
        return render(None, spec, "No BSA patch on this model: connect the MODEL output of BSA Sparse "
                                  "Attention (directly or through other model nodes).")
    was_recording, patch.record = patch.record is not None, spec
    if was_recording:
        message = ("Nothing recorded: this model has not finished a sampling run with BSA since recording "
                   "started (change the seed or any sampler input and queue again).")
    else:
        message = ("Nothing recorded: the BSA Sparse Attention node came from ComfyUI's cache of a run "
                   "without this report. Recording is on from the next sampling run: change the seed or any "
                   "sampler input and queue again.")
    return render(patch.last_report, spec, message)
