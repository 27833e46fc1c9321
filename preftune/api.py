"""The entry points Python users call: `train`, `train_online`, `train_reward` (the CLI calls the
same ones). Each forwards to preftune/train/entry.py, imported on the first call: it brings
torch, transformers and accelerate, which `import preftune` (and `preftune --help`) should not
wait for — the one reason a preftune module imports inside a function
(tests/test_layers.py names each such place)."""

from __future__ import annotations

from preftune.config import build_config


def _check_keys(config, overrides) -> None:
    """A wrong key or value is said before the seconds that importing the trainers takes."""
    build_config(config, overrides)


def train(config=None, overrides=None):
    """Train offline with `config` (a Config, a dict, a YAML path or None for the embedded
    default job) plus `overrides` (['key=value', ...] or a dict). Returns a TrainResult: the run
    directory and the final metrics. Call it as often as you like in one process."""
    _check_keys(config, overrides)
    from preftune.train import entry

    return entry.train(config, overrides)


def train_online(config=None, overrides=None):
    """An online method (`method=` online_dpo, ipo_md, rso, remax, rloo or grpo); see
    preftune/train/entry.py."""
    _check_keys(config, overrides)
    from preftune.train import entry

    return entry.train_online(config, overrides)


def train_reward(config=None, overrides=None):
    """A Bradley-Terry reward model; see preftune/train/reward.py."""
    _check_keys(config, overrides)
    from preftune.train import entry

    return entry.train_reward(config, overrides)
