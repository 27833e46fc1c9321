"""The offline trainer (and, in later modules, the online loops and the reward-model trainer)."""

from preftune.train.trainer import Trainer, TrainingError, TrainResult, train

__all__ = ["Trainer", "TrainResult", "TrainingError", "train"]
