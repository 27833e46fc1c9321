"""The entry points the CLI and Python users share: `train`, `train_online`, `train_reward`.

A new run is checked before its run directory is made or any model loads
(`preftune.train.setup.check_before_loading`, called by `prepare_trainer`): a wrong path fails in
a second, in one line, and leaves nothing behind. The trainers are imported on the first call, not with `preftune`: they
bring torch, transformers and accelerate, which `import preftune` and `preftune --help` do not
need.
"""

from __future__ import annotations


def train(config=None, overrides=None):
    """Train offline with `config` (a Config, a dict, a YAML path or None for the embedded
    default job) plus `overrides` (['key=value', ...] or a dict). Returns a TrainResult: the run
    directory and the final metrics. Call it as often as you like in one process."""
    from preftune.train import trainer

    return trainer.train(config, overrides)


def train_online(config=None, overrides=None):
    """Online DPO, RSO or ReMax (`method=`); see preftune.train.online."""
    from preftune.train.online import train_online as run

    return run(config, overrides)


def train_reward(config=None, overrides=None):
    """A Bradley-Terry reward model; see preftune.train.reward."""
    from preftune.train.reward import train_reward as run

    return run(config, overrides)
