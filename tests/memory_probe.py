"""The largest tensor storage any torch op allocates inside a `with LargestTemporary() as probe:` block
(subprocess memory tests import it: a fresh process measures only what the code under test allocates)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTemporary(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > self.nbytes:
                self.nbytes, self.op = t.untyped_storage().nbytes(), f"{func} -> {tuple(t.shape)} {t.dtype}"
        return out
