"""Replaying captured BSA calls from CUDA graphs.

On short videos a sampling step runs at the pace of the host's launch work (~1 ms a BSA call: five Triton /
Gluon launches and ~25 torch ops), not the GPU's (bench/NOTES_speed.md, session 22). Inside `replaying_calls()`
(the BSA patch opens it around each inference sampling run) the first call of each shape is captured into a
CUDA graph, and every later call of that shape copies its q, k, v into the graph's inputs, replays it and copies
the outputs out: one launch instead of hundreds. A call never reads the GPU on the host (tests/test_gpu_sync.py)
and every host-side decision follows from the shapes and settings in the key, so replaying another call's inputs
does exactly what launching it would.

Only where it pays and is safe: CUDA inputs no bigger than MAX_INPUT_BYTES each (past that the call's GPU work
hides the launches, and the copies would cost more than they save), not inside another capture, and within a
memory budget (MEMORY_SHARE of the device's memory for all of a run's graphs, at most MAX_GRAPHS shapes, least
recently used dropped first). The graphs go when the run ends. The outputs are fresh tensors, so what autograd
saves of a call is that call's own; the patch's training runs launch all the same (they are not sampling runs).
BSA_CUDA_GRAPHS=0 in the environment turns replay off.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Largest q (k, v) replayed: Wan 1.3B up to 10,922 tokens at batch 1 (14B: 3,276). On an H200 (bench/e2e_wan.py
# --launched, bench/NOTES_speed.md session 23) replay made Wan 1.3B's steps x1.93-2.34 faster at 3,120-6,240 tokens
# and x1.26 at 10,920; with a 64 MiB cap it ran x0.96-0.99 of launched at 14,040-20,280 tokens, where the copies
# cost more than the launches they save.
MAX_INPUT_BYTES = 32 << 20
MEMORY_SHARE = 0.03  # of the device's memory, for all the graphs of a run
MAX_GRAPHS = 4  # shapes a run replays (cond and uncond batches, a second model)

_active: contextvars.ContextVar[CallGraphs | None] = contextvars.ContextVar("bsa_call_graphs", default=None)


@contextlib.contextmanager
def replaying_calls(enabled: bool = True):
    """Calls of `bsa_attention_op` inside the block replay from CUDA graphs where they can; the graphs are
    freed on exit. Yields the CallGraphs (None when disabled: `enabled` false or BSA_CUDA_GRAPHS=0)."""
    if not enabled or os.environ.get("BSA_CUDA_GRAPHS", "1") == "0":
        yield None
        return
    graphs = CallGraphs()
    token = _active.set(graphs)
    try:
        yield graphs
    finally:
        _active.reset(token)
        graphs.clear()


def active_call_graphs() -> CallGraphs | None:
    """The CallGraphs of the innermost `replaying_calls` block, None outside one."""
    return _active.get()


@dataclass
class _CapturedCall:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # the graph reads these: each call copies its own into them
    outputs: tuple[torch.Tensor, ...]  # the graph writes these: each call gets copies
    bytes: int


class CallGraphs:
    """The captured calls of one run, by key; see the module docstring."""

    def __init__(self, memory_share: float = MEMORY_SHARE, max_graphs: int = MAX_GRAPHS,
                 max_input_bytes: int = MAX_INPUT_BYTES):
        self.memory_share, self.max_graphs, self.max_input_bytes = memory_share, max_graphs, max_input_bytes
        self.calls: OrderedDict = OrderedDict()
        self.refused: dict = {}  # key -> why it runs launched (a capture failed or does not fit)
        self.captures = self.replays = 0

    @property
    def bytes(self) -> int:
        return sum(call.bytes for call in self.calls.values())

    def skip_reason(self, inputs: tuple[torch.Tensor, ...]) -> str | None:
        """Why these inputs are launched rather than replayed (None: they can be replayed)."""
        if not all(t.is_cuda for t in inputs):
            return "not CUDA"
        if torch.cuda.is_current_stream_capturing():
            return "inside another CUDA graph capture"
        if max(t.numel() * t.element_size() for t in inputs) > self.max_input_bytes:
            return "inputs large enough to hide the launches"
        return None

    def run(self, fn, inputs: tuple[torch.Tensor, ...], key,
            outputs: int | None = None) -> tuple[torch.Tensor, ...] | None:
        """fn(*inputs)'s outputs (fresh tensors; the first `outputs` of them where given) from the graph of `key`
        (captured on the first call), or None where the caller should launch fn itself. `key`: everything
        besides the inputs' shapes, dtypes and device that decides what fn launches."""
        if self.skip_reason(inputs) is not None:
            return None
        key = (key, inputs[0].get_device(), tuple((t.shape, t.dtype) for t in inputs))
        if key in self.refused:
            return None
        call = self.calls.get(key)
        if call is None:
            call = self._capture(fn, inputs, key)
            if call is None:
                return None
        else:
            self.calls.move_to_end(key)
            for static, t in zip(call.inputs, inputs):
                static.copy_(t)
            self.replays += 1
        call.graph.replay()
        return tuple(t.clone() for t in call.outputs[:outputs])

    def _capture(self, fn, inputs, key) -> _CapturedCall | None:
        device = inputs[0].device
        input_bytes = sum(t.numel() * t.element_size() for t in inputs)
        budget = int(self.memory_share * torch.cuda.get_device_properties(device).total_memory)
        while self.calls and (len(self.calls) >= self.max_graphs or self.bytes + 2 * input_bytes > budget):
            self.calls.popitem(last=False)  # least recently used first
        if 2 * input_bytes > budget:
            return self._refuse(key, f"inputs of {input_bytes >> 20} MiB past the graphs' budget of {budget >> 20} MiB")
        statics = tuple(torch.empty_like(t) for t in inputs)  # the caller's strides where dense
        for static, t in zip(statics, inputs):
            static.copy_(t)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream):
                fn(*statics)  # warm-up: compiles and tunes the kernels, fills the layout caches, outside the capture
                torch.cuda.synchronize(device)
                reserved = torch.cuda.memory_reserved(device)
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    outputs = fn(*statics)
                finally:
                    graph.capture_end()
            pool_bytes = torch.cuda.memory_reserved(device) - reserved
        except Exception as error:  # e.g. out of memory, or a launch a graph cannot hold: the call launches
            return self._refuse(key, f"capture failed ({type(error).__name__}: {error})")
        finally:
            torch.cuda.current_stream(device).wait_stream(stream)
        call = _CapturedCall(graph, statics, tuple(outputs), input_bytes + pool_bytes)
        if self.bytes + call.bytes > budget:
            return self._refuse(key, f"its graph holds {call.bytes >> 20} MiB, past the budget of {budget >> 20} MiB")
        self.calls[key] = call
        self.captures += 1
        return call

    def _refuse(self, key, why: str) -> None:
        """That shape launches for the rest of the run; said once, in the log."""
        self.refused[key] = why
        log.info(f"[BSA] a call shape runs without CUDA graph replay: {why}")

    def clear(self) -> None:
        """Frees the graphs (their memory returns to torch's caching allocator)."""
        if self.captures:
            log.info(f"[BSA] {self.replays} attention calls replayed from {self.captures} CUDA graph(s)")
        self.calls.clear()
