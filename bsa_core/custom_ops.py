"""The pack's torch custom ops (`bsa::<name>`), each defined once per process: ComfyUI (or a test) may import
the pack a second time under another module name, and defining an op again there replaced the first
registration under the first module's feet (intermittent crashes), so later imports reuse the first
definition, its fake and autograd formula included."""
from __future__ import annotations

import sys
import types

import torch

# Kept out of CUDA graphs (torch.compile's reduce-overhead / max-autotune modes): the op reads settings on the
# host from its CPU tensor inputs, which a graph replay would not read again. torch without the tag (before
# graph partitioning) already skips CUDA graphs for graphs with CPU inputs.
CUDAGRAPH_UNSAFE = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def custom_op_once(name: str, impl, fake, autograd=None, setup_context=None, tags=()):
    """torch.library.custom_op `bsa::<name>` of `impl` (no mutated inputs) with its fake (and, when given, its
    autograd formula and tags), or the definition an earlier import of the pack made."""
    registry = sys.modules.setdefault("_bsa_custom_ops", types.ModuleType("_bsa_custom_ops"))
    if not hasattr(registry, name):
        op = torch.library.custom_op(f"bsa::{name}", impl, mutates_args=(), **({"tags": tags} if tags else {}))
        op.register_fake(fake)
        if autograd is not None:
            op.register_autograd(autograd, setup_context=setup_context)
        setattr(registry, name, op)
    return getattr(registry, name)
