"""Training a small ComfyUI Wan 2.1 T2V on synthetic videos, dense or with BSA ramped in (issue 15).

Needs ComfyUI importable (tools/train.py sets it up). `train(TrainConfig(...))` runs or resumes a run folder.
"""
from .config import TrainConfig
from .loop import train

__all__ = ["TrainConfig", "train"]
