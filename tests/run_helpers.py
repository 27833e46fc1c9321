"""Helpers for tests of whole training runs."""

from __future__ import annotations

import pytest

from preftune.train import checkpoint as ckpt
from preftune.train.trainer import train


def train_killed_while_saving(config, step: int, monkeypatch) -> None:
    """Train with `config` until the save of checkpoint `step` is interrupted, after its files
    are written and before the rename that publishes it, as a kill there would."""
    real = ckpt._fsync_dir

    def crash(path):
        real(path)
        if path.name == f".tmp-step-{step}":
            raise KeyboardInterrupt("simulated kill inside save_checkpoint")

    monkeypatch.setattr(ckpt, "_fsync_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(ckpt, "_fsync_dir", real)
