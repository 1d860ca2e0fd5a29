"""Puts BSA on a ComfyUI model: frozen options on a clone, and per sampling run an attention override with
its own state, installed on the sampler's copy of the model options and removed when the run ends.

The lifecycle is the one ComfyUI's EasyCache uses: an OUTER_SAMPLE wrapper swaps the guider's model
options for a copy, puts this run's override on top of whatever override the final model carries (a
node applied after BSA included), and restores the options in `finally`. Nothing is written into a
ModelPatcher's own options, so a patch never leaks into other clones, and every run starts fresh.

Training (ComfyUI's TrainLoraNode, or any run that calls the guider with gradients on; ComfyUI samples
under inference mode): the trainer passes placeholder sigmas and reports no steps, so each model call
decides the sigma window from its own sigmas (transformer_options["sigmas"]: sparse when every sigma of
the batch lies in the window), and dense_blocks counts the call's blocks as in sampling. A gradient
checkpoint recomputes blocks during backward, last block first: the call's decisions are kept in its
transformer_options (which the recompute gets again) and the recompute counts the blocks down, so it
runs exactly what the forward ran. Recomputes are not counted in the run's stats. ComfyUI's dpm_fast and
dpm_adaptive samplers number their callbacks by their own iterations, not by the schedule's steps: with
them, too, each model call decides the window from its own sigmas (one host read per call).

Importable without ComfyUI: comfy.* is imported inside functions only.
"""
from __future__ import annotations

import logging
import math
import re
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch

from .adapters import TokenLayout, token_layout
from .attention import (
    bsa_attention_key_masked,
    bsa_attention_op,
    choose_backend,
    key_mask_plan,
    threshold_tensor,
    unsupported_reason,
)
from .call_graphs import replaying_calls
from .config import RECOMMENDED_PATCH, BSAConfig
from .report import ReportSpec, RunReport, find_report_specs, remember_linked_values, render

log = logging.getLogger(__name__)

LOG_PREFIX = "[BSA]"
PATCH_KEY = "bsa_sparse_attention"
OVERRIDE_KEY = "optimized_attention_override"
FAILED = "BSA failed"
WARNING_REASONS = ("BSA kernels", FAILED)  # dense reasons logged as warnings (the others are choices)
RUN_KEY = "bsa_run"  # transformer_options key of the run in progress (only in the sampler's copy)
CALL_KEY = "bsa_call"  # transformer_options key of a training model call's CallPlan (one dict per call)

# comfy.samplers.ksampler's functions whose callback counts their own iterations, not the schedule's steps
CALLBACKS_NOT_PER_STEP = ("dpm_fast_function", "dpm_adaptive_function")
# A step is sparse when the schedule's sigma at its start lies in [sigma(end_percent), sigma(start_percent)],
# both ends included. The comparison allows this relative slack so that a step placed exactly on a boundary
# (e.g. step 2 of 10 at start_percent 0.2) counts as inside whatever float rounding the scheduler used.
WINDOW_TOLERANCE = 1e-4


@dataclass(frozen=True)
class BlockRanges:
    """Transformer blocks as inclusive (first, last) ranges, never expanded: '0-10000000' is one pair."""

    ranges: tuple[tuple[int, int], ...] = ()

    def __contains__(self, block: int) -> bool:
        return any(first <= block <= last for first, last in self.ranges)

    @property
    def last(self) -> int | None:
        return max((last for _, last in self.ranges), default=None)

    @classmethod
    def of(cls, value) -> BlockRanges:
        """From a text ('0, 1, 28-29'), a BlockRanges, or block numbers (Python callers)."""
        if isinstance(value, BlockRanges):
            return value
        if value is None or isinstance(value, str):
            return parse_block_ranges(value)
        blocks = sorted(set(value))
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in blocks):
            raise ValueError(f"dense_blocks must be block numbers >= 0, got {value!r}")
        return cls(tuple((b, b) for b in blocks))


def parse_block_ranges(text: str | None) -> BlockRanges:
    """'0, 1, 28-29' -> ranges (0,0), (1,1), (28,29); empty text -> no block. Anything else, a range that
    runs backwards ('5-3') included, raises ValueError naming dense_blocks."""
    ranges = []
    for part in filter(None, (p.strip() for p in str(text or "").split(","))):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if match is None:
            raise ValueError(f"dense_blocks must be block numbers or ranges like '0,1,28-29', got {text!r}")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise ValueError(f"dense_blocks range '{part}' runs backwards: write '{last}-{first}'")
        ranges.append((first, last))
    return BlockRanges(tuple(ranges))


class RunStats:
    """What one sampling run did: calls that went sparse, calls that stayed dense and why."""

    def __init__(self):
        self.sparse_calls = 0
        self.backend_why: tuple[str, str] | None = None  # (backend, why) of the sparse calls
        self.dense_reasons: Counter[str] = Counter()
        self._kept_query_sum = 0.0  # tensors on the attention's device once a call is recorded
        self._kept_kv_sum = 0.0

    @property
    def dense_calls(self) -> int:
        return sum(self.dense_reasons.values())

    def add(self, other: RunStats) -> None:
        """Adds `other`'s counts to these."""
        self.sparse_calls += other.sparse_calls
        self.backend_why = other.backend_why or self.backend_why
        self.dense_reasons.update(other.dense_reasons)
        self._kept_query_sum = self._kept_query_sum + other._kept_query_sum
        self._kept_kv_sum = self._kept_kv_sum + other._kept_kv_sum

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


@dataclass(frozen=True, eq=False)
class BSAOptions:
    """What one BSA node asked for; shared (by identity) by every clone of the patched model, never changed.

    record:  heat-maps to record in every run (Python callers of apply_bsa).
    node_id: the BSA node's id in the prompt; each run then records for the BSA Reports that the running
             prompt has on that sampler's branch, and nothing without one.
    """

    config: BSAConfig
    start_percent: float
    end_percent: float
    dense_blocks: BlockRanges
    min_tokens: int
    record: tuple[ReportSpec, ...] = ()
    node_id: str | None = None
    thresholds: torch.Tensor = field(init=False, repr=False)  # the config's, as bsa_attention_op takes them

    def __post_init__(self):
        object.__setattr__(self, "thresholds", threshold_tensor(self.config))


@dataclass
class CallPlan:
    """What one model call of a training run decided for all its attention calls; a checkpoint recompute of
    its blocks reads it back from the call's transformer_options. `blocks`: self-attention blocks the forward
    has counted, counted down again by the recompute."""

    layout: TokenLayout
    cross_tokens: int | None
    in_window: bool
    blocks: int = 0


def _in_backward() -> bool:
    """True while autograd runs a backward pass: an attention call then is a gradient checkpoint's recompute.
    Never inside torch.compile: a compiled region's recompute runs in its backward graph, not through this
    Python (and asking autograd is a graph break per attention call)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class BSARun:
    """The state of one sampling run of one patched model: made by the OUTER_SAMPLE wrapper, dropped when
    the run ends. The token layout and the block counter are per model call (set by the APPLY_MODEL
    wrapper); the step and its sigma-window decision per sampler step (set from the sampler's callback);
    stats, logged reasons and the optional RunReport for the whole run.

    model_sampling and schedule (the run's sigmas as host numbers) give the sigma window; without them
    (a test driving the override directly) every step is inside it. training: each model call decides the
    window from its own sigmas and keeps its decisions for checkpoint recomputes (see the module docstring).
    """

    def __init__(self, options: BSAOptions, model_sampling=None, schedule=(), record=(), training: bool = False,
                 window_per_call: bool = False):
        self.options = options
        self.training = training
        self.window_per_call = training or window_per_call  # each model call decides from its own sigmas
        self.plan = None  # training: the CallPlan of the model call in progress
        self.schedule = [float(s) for s in schedule]
        self.sigma_start, self.sigma_end = math.inf, 0.0
        if model_sampling is not None:
            self.sigma_start = float(model_sampling.percent_to_sigma(options.start_percent))
            self.sigma_end = float(model_sampling.percent_to_sigma(options.end_percent))
        self.report = RunReport(record) if record else None
        self._stats = RunStats()
        self.call_stats = RunStats()  # the model call in progress: attention calls count here (see stats)
        self.layout = TokenLayout("none", reason="unknown video grid")
        self.block = 0
        self.blocks_per_forward = 0  # most self-attention blocks seen in one model call
        self.call_block = None  # transformer block of the attention call in progress (None: not a block)
        self.outside_blocks = 0  # > 0 inside a block the model does not number (OutsideBlocks)
        self.cross_tokens = None
        self._self_attention_pending_cross = False
        self._logged = set()
        self._mask = None  # (weakref to the last mask tensor, its shape key, its plan, reason)
        self.steps_reported = 0
        self.begin_step(0)

    # ---- per step (host only) ---------------------------------------------------------------------
    def window_contains(self, sigma: float) -> bool:
        """The stated rule: sigma(end_percent) <= sigma <= sigma(start_percent), both with WINDOW_TOLERANCE."""
        return (self.sigma_end * (1 - WINDOW_TOLERANCE) <= sigma
                <= self.sigma_start * (1 + WINDOW_TOLERANCE))

    def begin_step(self, step: int) -> None:
        """Sampler step `step` starts: its sigma comes from the schedule, decided here once for all its calls."""
        self.step = step
        self.sigma = self.schedule[min(step, len(self.schedule) - 1)] if self.schedule else None
        self.in_window = self.sigma is None or self.window_contains(self.sigma)

    def step_done(self, step: int) -> None:
        """The sampler's callback: step `step` finished, the next one starts."""
        self.steps_reported += 1
        self.begin_step(step + 1)

    # ---- per model call ---------------------------------------------------------------------------
    @property
    def stats(self) -> RunStats:
        """The run's counts so far, the model call in progress included."""
        self._end_call()
        return self._stats

    def _end_call(self) -> None:
        """Adds the model call's counts (call_stats, blocks) to the run's, outside the graph: inside torch.compile
        every model call then starts from the same counts (0), where run totals read and grown by the graph made
        Dynamo compile the whole model a second time."""
        self.blocks_per_forward = max(self.blocks_per_forward, self.block)
        if self.call_stats.sparse_calls or self.call_stats.dense_reasons:
            self._stats.add(self.call_stats)
            self.call_stats = RunStats()

    def begin_forward(self, layout: TokenLayout, cross_tokens: int | None = None, sigmas=None) -> CallPlan | None:
        """A new model call: where its video tokens sit and how long its cross-attention context is;
        restart the block count. Training: the call's sigmas (host numbers) decide the window; returns
        the call's CallPlan."""
        self._end_call()  # the previous call's; this one counts from zero
        self.block = 0
        self.layout = layout
        self.cross_tokens = cross_tokens
        self._self_attention_pending_cross = False
        if self.window_per_call and sigmas:
            self.sigma = max(sigmas)
            self.in_window = all(self.window_contains(s) for s in sigmas)
        if self.training:
            self.plan = CallPlan(layout, cross_tokens, self.in_window)
        if self.report is not None:
            self.report.begin_forward(self.step, self.sigma)
        return self.plan

    def recompute_plan(self, transformer_options) -> CallPlan | None:
        """The CallPlan of the training call whose block a gradient checkpoint is recomputing now, else None;
        the run takes the plan's layout and window back for it."""
        plan = (transformer_options or {}).get(CALL_KEY) if self.training and _in_backward() else None
        if isinstance(plan, CallPlan):
            self.layout, self.cross_tokens, self.in_window = plan.layout, plan.cross_tokens, plan.in_window
            return plan
        return None

    def is_cross_attention(self, q, k) -> bool:
        """Cross-attention has its own key length, except when the text is exactly as long as the video
        (a 512-token video and umT5's 512 padded tokens): then the block order decides, since a block's
        cross-attention always follows its self-attention. The first check of every call (it has no block
        number then), made on the tensors as ComfyUI passes them: the tokens are dim -2 in [B, L, H*D] and
        in [B, H, L, D], so the dense calls skip the reshape."""
        self.call_block = None
        if q.shape[-2] != k.shape[-2]:
            return True
        if q.shape[-2] == self.cross_tokens and self._self_attention_pending_cross:
            self._self_attention_pending_cross = False
            return True
        return False

    def dense_reason(self, q, k, v, tokens: int, recompute: CallPlan | None = None) -> str | None:
        """Why this call, not cross-attention (is_cross_attention comes first), runs dense, or None when BSA
        takes it. q/k/v are [B, H, L, D].
        Counts self-attention calls as it goes: the k-th one of a forward is block k; a checkpoint
        recompute (`recompute`: its call's plan) counts them down, last block first."""
        grid = self.layout.grid
        if grid is not None and tokens < self.layout.n_prefix + math.prod(grid):
            return "shorter than the video (e.g. text refiner)"  # not a transformer block: not counted
        self._self_attention_pending_cross = True  # a block's self-attention: its cross-attention may follow
        if self.outside_blocks:  # e.g. Wan VACE's blocks: no number of the model's own blocks
            block = None
        elif recompute is not None:
            recompute.blocks -= 1
            block = self.call_block = recompute.blocks
        else:
            block = self.call_block = self.block
            self.block += 1
            if self.plan is not None:
                self.plan.blocks = self.block
        if self.layout.reason is not None:
            return self.layout.reason
        if tokens < self.options.min_tokens:
            return f"fewer than min_tokens={self.options.min_tokens} tokens"
        if not self.in_window:
            return "sigma outside start_percent..end_percent"
        if block is not None and block in self.options.dense_blocks:
            return "block listed in dense_blocks"
        reason = unsupported_reason(q, k, v, self.layout.grid, *self.layout.extra_tokens(tokens))
        if reason is None and q.is_cuda:
            backend, why = choose_backend(q)
            if backend != "triton":  # the fp32 reference on a GPU is slower than dense attention
                return f"BSA kernels cannot run here ({why}): dense attention"
        return reason

    def key_mask(self, mask, batch: int, tokens: int, n_prefix: int, n_suffix: int):
        """key_mask_plan of `mask`, worked out (with its host reads) once per mask tensor: a model passes
        the same mask object to every block of one call."""
        key = (tuple(mask.shape), batch, tokens, n_prefix, n_suffix)
        if self._mask is not None and self._mask[0]() is mask and self._mask[1] == key:
            return self._mask[2], self._mask[3]
        plan, reason = key_mask_plan(mask, batch, tokens, n_prefix, n_suffix)
        self._mask = (weakref.ref(mask), key, plan, reason)
        return plan, reason

    # ---- logging ------------------------------------------------------------------------------------
    def log_once(self, reason: str, warning: bool = False) -> None:
        """Logs `reason` the first time a run meets it. Not inside torch.compile: a logging call breaks the
        graph (in every block, and Dynamo then recompiles a block's frame per layer past its limit); finish()
        logs those reasons."""
        if torch.compiler.is_compiling():
            return
        if reason not in self._logged:
            self._logged.add(reason)
            (log.warning if warning else log.info)(f"{LOG_PREFIX} dense: {reason}")

    def backend(self, q) -> str:
        """Triton kernels on CUDA, the reference elsewhere; says which once per run, and that the kernels
        compute fp32 inputs in bf16."""
        name, why = choose_backend(q)
        if torch.compiler.is_compiling():  # no logging call inside the graph (log_once): finish() says it
            self.call_stats.backend_why = (name, why)
            return name
        self._log_backend(name, why)
        if name == "triton" and q.dtype == torch.float32 and "fp32" not in self._logged:
            self._logged.add("fp32")
            log.info(f"{LOG_PREFIX} float32 inputs: the kernels compute them in bfloat16 (rel. error ~1e-2)")
        return name

    def _log_backend(self, name: str, why: str) -> None:
        if ("backend", name) not in self._logged:
            self._logged.add(("backend", name))
            log.info(f"{LOG_PREFIX} attention backend: {name} ({why})")

    def finish(self) -> None:
        """End of the run: the one-line summary, and what the run showed about the settings."""
        stats = self.stats
        for reason in stats.dense_reasons:  # those met inside torch.compile only
            self.log_once(reason, warning=reason.startswith(WARNING_REASONS))
        if stats.backend_why is not None:
            self._log_backend(*stats.backend_why)
        if stats.sparse_calls or stats.dense_calls:
            log.info(f"{LOG_PREFIX} run: {stats.summary()}", extra={"bsa_run": stats.as_dict()})
        last = self.options.dense_blocks.last
        if last is not None and self.blocks_per_forward and last >= self.blocks_per_forward:
            log.warning(f"{LOG_PREFIX} dense_blocks lists block {last}, but this model has {self.blocks_per_forward} "
                        f"blocks (0-{self.blocks_per_forward - 1}): blocks past the last one are ignored")
        decisions = {self.window_contains(s) for s in self.schedule[:-1]}
        if len(decisions) > 1 and not self.steps_reported and not self.window_per_call:
            log.warning(f"{LOG_PREFIX} the sampler reported no finished step: every step used the first step's "
                        "start_percent..end_percent decision")


class OutsideBlocks:
    """forward of a block that is not one of the model's numbered transformer blocks (Wan VACE's vace_blocks,
    which run between them on the control latents): its attention calls take no block number, so dense_blocks
    and the report's layers count the model's own blocks. An object patch on the BSA clone."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        run = (kwargs.get("transformer_options") or {}).get(RUN_KEY)
        if not isinstance(run, BSARun):
            return type(self.module).forward(self.module, *args, **kwargs)
        run.outside_blocks += 1
        try:
            return type(self.module).forward(self.module, *args, **kwargs)
        finally:
            run.outside_blocks -= 1


def make_override(run: BSARun, previous):
    """The attention override of one run. Dense calls go to `previous` (the override that was on the hook
    before) or else to `func`, the backend ComfyUI would have used, with every argument forwarded."""

    def bsa_override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                     skip_output_reshape=False, **kwargs):
        recompute = run.recompute_plan(kwargs.get("transformer_options"))
        stats = RunStats() if recompute is not None else run.call_stats  # a recompute repeats counted calls
        report = run.report  # None unless a BSA Report is on this run's branch
        if report is not None and (torch.compiler.is_compiling() or recompute is not None):
            report = None  # timers and python-side tables do not trace; a recompute is no new call

        def dense(reason: str, warning: bool = False):
            stats.dense_reasons[reason] += 1
            run.log_once(reason, warning)
            call = func if previous is None else lambda *a, **kw: previous(func, *a, **kw)
            block = run.call_block
            timer = None if report is None or block is None else report.start_timer(q)
            out = call(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                       skip_output_reshape=skip_output_reshape, **kwargs)
            if timer is not None:
                report.record_dense(block, timer, reason)
            return out

        if run.is_cross_attention(q, k):
            return dense("cross-attention")
        if skip_reshape:  # [B, H, L, D]
            qh, kh, vh = q, k, v
        else:  # [B, L, H*D]
            qh, kh, vh = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        tokens = qh.shape[-2]
        reason = run.dense_reason(qh, kh, vh, tokens, recompute)
        if reason is not None:
            return dense(reason, warning=reason.startswith(WARNING_REASONS))
        n_prefix, n_suffix = run.layout.extra_tokens(tokens)
        plan = None
        if mask is not None:
            plan, reason = run.key_mask(mask, qh.shape[0], tokens, n_prefix, n_suffix)
            if reason is not None:
                return dense(reason)
        args = dict(n_prefix=n_prefix, n_suffix=n_suffix, scale=kwargs.get("scale"), backend=run.backend(qh),
                    thresholds=run.options.thresholds)
        timer = None if report is None else report.start_timer(qh)
        config = run.options.config
        try:
            if plan is None:
                out, kept_queries, kept_kv = bsa_attention_op(qh, kh, vh, run.layout.grid, config, **args)
            else:
                out, kept_queries, kept_kv = bsa_attention_key_masked(qh, kh, vh, run.layout.grid, config, plan,
                                                                      **args)
        except Exception as error:  # a failing sparse call must not kill a long render: run it dense
            return dense(f"{FAILED} ({type(error).__name__}: {error})", warning=True)
        stats.record_sparse(kept_queries, kept_kv)
        if report is not None and run.call_block is not None:
            report.record_sparse(run.call_block, timer, kept_queries, kept_kv)
            for spec in report.wanted_selections(run.call_block):
                report.capture_selection(spec, run.call_block, qh, kh, run.layout.grid, config, n_prefix,
                                         args["scale"], args["backend"])
        if skip_output_reshape:
            return out
        return out.transpose(1, 2).flatten(-2)

    return bsa_override


# Finished recorded runs, by the model object the sampler got and by the BSA options behind it (for a report
# whose model is an upstream clone of the sampler's). Weak: a model ComfyUI drops takes its report along.
_last_report_of_model = weakref.WeakKeyDictionary()
_last_report_of_options = weakref.WeakKeyDictionary()
# and by the sampler node that ran them: (options, report), for a Report whose `samples` come from that sampler
# (two samplers on one model: each Report shows its own sampler's run)
_last_report_of_sampler: dict[str, tuple] = {}


def _running_prompt():
    """(API prompt, id of the node executing now) while ComfyUI's executor runs a prompt, else (None, None).
    comfy_execution.progress / .utils exist in ComfyUI 0.3.64 and later."""
    try:
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None, None
    context = get_executing_context()
    registry = get_progress_state()
    dynprompt = getattr(registry, "dynprompt", None)
    if context is None or dynprompt is None or registry.prompt_id != context.prompt_id:
        return None, None
    node_id = context.node_id
    if hasattr(dynprompt, "get_real_node_id"):
        node_id = dynprompt.get_real_node_id(node_id)
    return dynprompt.get_original_prompt(), node_id


def _specs_to_record(options: BSAOptions) -> tuple[ReportSpec, ...]:
    if options.node_id is None:
        return options.record
    prompt, sampler_id = _running_prompt()
    return options.record + tuple(s for s in find_report_specs(prompt, options.node_id, sampler_id)
                                  if s not in options.record)


def _sample_args(args, kwargs, name: str, index: int):
    return kwargs[name] if name in kwargs else args[index] if len(args) > index else None


def _with_sample_arg(args, kwargs, name: str, index: int, value):
    if name in kwargs or len(args) <= index:
        return args, {**kwargs, name: value}
    return (*args[:index], value, *args[index + 1:]), kwargs


def apply_bsa(model, config: BSAConfig, start_percent: float = RECOMMENDED_PATCH.start_percent,
              end_percent: float = RECOMMENDED_PATCH.end_percent, dense_blocks=RECOMMENDED_PATCH.dense_blocks,
              min_tokens: int = RECOMMENDED_PATCH.min_tokens, record=(), node_id=None):
    """A clone of `model` (a ComfyUI ModelPatcher) whose self-attention runs BSA in every sampling run;
    `model` is untouched. dense_blocks: a text like '0,1,28-29' or block numbers. record: ReportSpecs to
    record in every run (see bsa_report); node_id: the BSA node's prompt id, to record for the BSA Reports
    of the running prompt. A model that already has BSA gets this one instead, with a warning."""
    import comfy.model_patcher
    import comfy.patcher_extension as pe

    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) and end_percent ({end_percent}) must satisfy "
                         "0 <= start_percent <= end_percent <= 1")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"min_tokens must be an integer >= 0, got {min_tokens!r}")
    if not isinstance(config, BSAConfig):
        raise ValueError(f"config must be a BSAConfig, got {type(config).__name__}")
    record = (record,) if isinstance(record, ReportSpec) else tuple(record or ())
    options = BSAOptions(config, float(start_percent), float(end_percent), BlockRanges.of(dense_blocks), min_tokens,
                         record, None if node_id is None else str(node_id))

    patched = model.clone()
    for i, block in enumerate(getattr(patched.get_model_object("diffusion_model"), "vace_blocks", None) or ()):
        patched.add_object_patch(f"diffusion_model.vace_blocks.{i}.forward", OutsideBlocks(block))
    if find_options(patched) is not None:
        log.warning(f"{LOG_PREFIX} this model already has BSA (two BSA Sparse Attention nodes in a row): the one "
                    "nearer the sampler runs, the earlier one is removed")
        for wrapper_type in (pe.WrappersMP.OUTER_SAMPLE, pe.WrappersMP.APPLY_MODEL):
            patched.remove_wrappers_with_key(wrapper_type, PATCH_KEY)

    def bsa_sample(executor, *args, **kwargs):
        """OUTER_SAMPLE (noise, latent, sampler, sigmas, denoise_mask, callback, ...): one run."""
        guider = executor.class_obj
        original_options = guider.model_options
        sigmas = _sample_args(args, kwargs, "sigmas", 3)
        callback = _sample_args(args, kwargs, "callback", 5)
        sampler_function = getattr(_sample_args(args, kwargs, "sampler", 2), "sampler_function", None)
        run = BSARun(options, guider.model_patcher.get_model_object("model_sampling"),
                     [] if sigmas is None else sigmas.tolist(), _specs_to_record(options),
                     training=torch.is_grad_enabled(),  # ComfyUI samples in inference mode; trainers do not
                     window_per_call=getattr(sampler_function, "__name__", "") in CALLBACKS_NOT_PER_STEP)

        def step_done(step, *rest):
            run.step_done(step)
            if callback is not None:
                return callback(step, *rest)

        args, kwargs = _with_sample_arg(args, kwargs, "callback", 5, step_done)
        try:
            guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
            transformer_options = guider.model_options.setdefault("transformer_options", {})
            transformer_options[RUN_KEY] = run
            transformer_options[OVERRIDE_KEY] = make_override(run, transformer_options.get(OVERRIDE_KEY))
            with replaying_calls(enabled=not run.training):  # short videos: a call's launches cost more than it
                return executor(*args, **kwargs)
        finally:
            guider.model_options = original_options
            run.finish()
            sampler_id = _running_prompt()[1]
            if run.report is not None and run.report.rows:
                _last_report_of_model[guider.model_patcher] = run.report
                _last_report_of_options[options] = run.report
                if sampler_id is not None:
                    if len(_last_report_of_sampler) > 64:
                        _last_report_of_sampler.clear()
                    _last_report_of_sampler[str(sampler_id)] = (options, run.report)
            else:  # a later run recorded nothing: a Report must not show an older run's numbers as this one's
                _last_report_of_model.pop(guider.model_patcher, None)
                _last_report_of_options.pop(options, None)
                _last_report_of_sampler.pop(str(sampler_id), None)

    def learn_token_layout(executor, x, *args, **kwargs):
        """APPLY_MODEL (x, t, c_concat, c_crossattn, control, transformer_options): x is the noisy latent,
        kwargs the model's extra conds (reference / guide latents); wraps every family's model."""
        transformer_options = kwargs.get("transformer_options", args[4] if len(args) > 4 else None) or {}
        run = transformer_options.get(RUN_KEY)
        if isinstance(run, BSARun) and run.options is options:
            context = kwargs.get("c_crossattn", args[2] if len(args) > 2 else None)
            sigmas = transformer_options.get("sigmas") if run.window_per_call else None
            plan = run.begin_forward(token_layout(executor.class_obj.diffusion_model, x.shape, kwargs),
                                     context.shape[1] if isinstance(context, torch.Tensor) and context.dim() >= 2
                                     else None,
                                     sigmas.tolist() if isinstance(sigmas, torch.Tensor) else None)
            if plan is not None:
                transformer_options[CALL_KEY] = plan
        return executor(x, *args, **kwargs)

    bsa_sample.bsa_options = options  # find_options: clones share the wrapper function, not a copy
    patched.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, PATCH_KEY, bsa_sample)
    patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, PATCH_KEY, learn_token_layout)
    return patched


def find_options(model) -> BSAOptions | None:
    """The BSAOptions of the BSA patch on `model` or on a model it was cloned from, else None."""
    wrappers = (getattr(model, "wrappers", None) or {}).get("outer_sample", {}).get(PATCH_KEY, [])
    options = [getattr(w, "bsa_options", None) for w in wrappers]
    options = [o for o in options if o is not None]
    return options[-1] if options else None


def last_report(model, sampler_id=None) -> RunReport | None:
    """The RunReport of the last finished recorded sampling run of sampler node `sampler_id` with this BSA
    patch, or else of `model` (the model the sampler got), or else of any model carrying the same BSA patch;
    None without a patch or such a run."""
    options = find_options(model)
    if options is None:
        return None
    of_sampler = _last_report_of_sampler.get(str(sampler_id)) if sampler_id is not None else None
    if of_sampler is not None and of_sampler[0] is options:
        return of_sampler[1]
    return _last_report_of_model.get(model) or _last_report_of_options.get(options)


def remember_report_inputs(spec: ReportSpec) -> None:
    """The BSA Report executing now was given `spec`: its widgets linked to computing nodes are known only now,
    and the next sampling run records them (report.remember_linked_values)."""
    prompt, node_id = _running_prompt()
    if prompt is not None and node_id is not None:
        remember_linked_values(prompt, node_id, spec)


def running_report_sampler() -> str | None:
    """The node whose output feeds the `samples` input of the BSA Report executing now (its sampler), or None
    outside ComfyUI's executor."""
    prompt, node_id = _running_prompt()
    link = (((prompt or {}).get(str(node_id)) or {}).get("inputs") or {}).get("samples")
    return str(link[0]) if isinstance(link, (list, tuple)) and len(link) == 2 else None


def bsa_report(model, spec: ReportSpec, sampler_id=None) -> tuple[str, torch.Tensor]:
    """(table, heat-map image) of last_report(model, sampler_id), or a message and a placeholder without one."""
    if find_options(model) is None:
        return render(None, spec, "No BSA patch on this model: connect the MODEL output of BSA Sparse "
                                  "Attention (directly or through other model nodes).")
    report = last_report(model, sampler_id)
    message = ("Nothing recorded: no sampling run of this model has finished with a BSA Report on its branch. "
               "ComfyUI reuses a cached sampler output without sampling again: change the seed or any sampler "
               "input and queue again.")
    return render(report, spec, message)
