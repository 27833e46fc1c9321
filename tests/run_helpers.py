"""Helpers for tests of whole training runs."""

from __future__ import annotations

import dataclasses
import math

import pytest

from preftune.api import train
from preftune.config import build_config
from preftune.train import checkpoint as ckpt


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


def assert_final_weights_moved(run_dir, initial_dir) -> None:
    """`run_dir/final` loads with plain transformers, every weight is finite, and training moved
    the weights away from `initial_dir`'s (weight decay is 0 by default, so only gradients can)."""
    import torch
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(initial_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    assert before.keys() == after.keys()
    bad = [n for n, p in after.items() if not torch.isfinite(p).all()]
    assert not bad, f"non-finite weights in final/: {bad}"
    moved = [n for n in after if not torch.equal(before[n], after[n])]
    assert moved, "final/ holds the initial weights: the run trained nothing"


def assert_finite_metrics(line: dict, prefix: str = "") -> list[str]:
    """The numeric metrics of one metrics.jsonl line whose names start with `prefix`: at least
    one, all finite. Returns their names."""
    import math

    names = [k for k, v in line.items() if k.startswith(prefix) and isinstance(v, (int, float))]
    assert names, f"no metric starting with {prefix!r} in {sorted(line)}"
    bad = {k: line[k] for k in names if not math.isfinite(line[k])}
    assert not bad, f"non-finite metrics: {bad}"
    return names


def nan_dpo_from_call(n: int):
    """The registry's DPO entry, returning NaN losses from its n-th call on: a loss the tiny
    model drives to NaN, found by name like any other. Install it in `LOSSES["dpo"]`."""
    from preftune.losses import LOSSES

    spec, calls = LOSSES["dpo"], []

    def nan_dpo(logps, **hparams):
        out = spec.fn(logps, **hparams)
        calls.append(1)
        if len(calls) >= n:
            out.losses = out.losses * math.nan
        return out

    return dataclasses.replace(spec, fn=nan_dpo)
