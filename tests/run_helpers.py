"""Helpers for tests of whole training runs."""

from __future__ import annotations

import pytest

from preftune.config import build_config
from preftune.train import checkpoint as ckpt
from preftune.train.trainer import train


def tiny_run_args(tiny_dir, tmp_path, name: str, **extra) -> dict:
    """A few steps on the tiny model and the bundled edit pairs, quiet, no evaluation."""
    base = {
        "model": str(tiny_dir),
        "data": "arithmetic_edit",
        "output_dir": str(tmp_path),
        "run_name": name,
        "num_train": 16,
        "num_eval": 4,
        "batch_size": 4,
        "max_steps": 2,
        "num_task_eval": 0,
        "eval_before": False,
        "quiet": True,
        "report_to": "none",
        "lr": 1e-3,
    }
    return {**base, **extra}


def tiny_run_config(tiny_dir, tmp_path, name: str, **extra):
    """`tiny_run_args` as a DPO Config."""
    return build_config(tiny_run_args(tiny_dir, tmp_path, name, **extra))


def train_killed_while_saving(config, step: int, monkeypatch) -> None:
    """Train with `config` until the save of checkpoint `step` is interrupted, after its files
    are written and before the rename that publishes it, as a kill there would."""
    real = ckpt.fsync_tree

    def crash(path):
        real(path)
        if path.name == f".tmp-step-{step}":
            raise KeyboardInterrupt("simulated kill inside save_checkpoint")

    monkeypatch.setattr(ckpt, "fsync_tree", crash)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(ckpt, "fsync_tree", real)
