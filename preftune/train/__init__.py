"""The offline trainer, the online loops and the reward-model trainer.

Its names load with their modules on first use: `import preftune` imports this package (see
preftune/__init__.py) and should not pay for torch and transformers then.
"""

import importlib

_HOME = {
    "Trainer": "preftune.train.trainer",
    "TrainResult": "preftune.train.trainer",
    "TrainingError": "preftune.train.setup",
    "train": "preftune.train.trainer",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'preftune.train' has no attribute {name!r}")


__all__ = ["Trainer", "TrainResult", "TrainingError", "train"]
