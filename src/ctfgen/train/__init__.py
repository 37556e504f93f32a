"""Training: the shared loop, checkpoints, multi-process helpers, and the ar/aux/baseline stages."""

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .loop import NonFiniteLossError, TrainConfig, TrainingInterrupted, TrainResult, train

__all__ = ["CheckpointError", "NonFiniteLossError", "TrainConfig", "TrainResult", "TrainingInterrupted",
           "latest_checkpoint", "load_checkpoint", "save_checkpoint", "train"]
