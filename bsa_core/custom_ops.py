"""The pack's torch custom ops (`bsa::<name>`), each defined once per process: ComfyUI (or a test) may import
the pack a second time under another module name, and defining an op again there replaced the first
registration under the first module's feet (intermittent crashes), so later imports reuse the first
definition, its fake and autograd formula included."""
from __future__ import annotations

import sys
import types

import torch


def custom_op_once(name: str, impl, fake, autograd=None, setup_context=None):
    """torch.library.custom_op `bsa::<name>` of `impl` (no mutated inputs) with its fake (and, when given, its
    autograd formula), or the definition an earlier import of the pack made."""
    registry = sys.modules.setdefault("_bsa_custom_ops", types.ModuleType("_bsa_custom_ops"))
    if not hasattr(registry, name):
        op = torch.library.custom_op(f"bsa::{name}", impl, mutates_args=())
        op.register_fake(fake)
        if autograd is not None:
            op.register_autograd(autograd, setup_context=setup_context)
        setattr(registry, name, op)
    return getattr(registry, name)
