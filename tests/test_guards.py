"""The offline step refuses a non-finite loss or gradient norm: training stops with a
DivergedError that names the step and the sign, and the refused step leaves the weights in
memory as the step before left them (DESIGN.md, "Bad input and faults").

Divergence reached through a huge lr (the guard's vanished / exploding signs, the checkpoints
moved aside) is tested in test_run_safety.py; here the step's own checks, reached directly."""

from __future__ import annotations

import math

import pytest
import torch
from run_helpers import nan_dpo_from_call, tiny_run_config

from preftune.losses import LOSSES
from preftune.train.guards import DivergedError
from preftune.train.loop import run
from preftune.train.trainer import Trainer

BAD_STEP = 2  # step 1 trains normally, so "the weights did not move" is not the trivial case


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    model = trainer.acc.unwrap_model(trainer.policy)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _run_until_refused(trainer: Trainer, monkeypatch) -> tuple[DivergedError, list[dict]]:
    """Run `trainer` to its DivergedError; returns it and the weights before each step taken."""
    before: list[dict] = []
    real_step = Trainer.train_step

    def step(self, batch_idx):
        before.append(_weights(self))
        return real_step(self, batch_idx)

    monkeypatch.setattr(Trainer, "train_step", step)
    with pytest.raises(DivergedError) as info:
        run(trainer)
    return info.value, before


def _assert_refused_at_bad_step(trainer: Trainer, err: DivergedError, before, sign: str) -> None:
    assert err.step == BAD_STEP and len(before) == BAD_STEP
    assert f"training diverged at step {BAD_STEP}: {sign}" in str(err)
    assert "step refused" in str(err)
    now = _weights(trainer)
    moved = [n for n in now if not torch.equal(now[n], before[0][n])]
    assert moved, "step 1 did not train: the check below would hold for any step"
    changed = [n for n in now if not torch.equal(now[n], before[-1][n])]
    assert not changed, f"the refused step {BAD_STEP} updated {changed[:5]}"


def _nan_loss_from_call(n: int, monkeypatch) -> None:
    """The registry's DPO returns NaN losses from its n-th call on (a loss the tiny model drives
    to NaN, through the public registry: the trainer finds it by name like any other)."""
    monkeypatch.setitem(LOSSES, "dpo", nan_dpo_from_call(n))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_non_finite_loss_stops_training_and_leaves_the_weights(
    tiny_dir, tmp_path, monkeypatch, grad_accum
):
    """grad_accum=2: the NaN comes in the second micro-batch, after the first one's backward
    has already written gradients; the step is still refused whole."""
    cfg = tiny_run_config(tiny_dir, tmp_path, "nan-loss", loss="dpo", grad_accum=grad_accum)
    trainer = Trainer(cfg)
    # calls: one per micro-batch of a step (no evaluation before or during the run)
    _nan_loss_from_call(grad_accum * BAD_STEP, monkeypatch)
    err, before = _run_until_refused(trainer, monkeypatch)
    _assert_refused_at_bad_step(trainer, err, before, "non-finite loss (nan)")
    assert f"micro-batch {grad_accum - 1}" in str(err)


def test_non_finite_gradient_norm_stops_training_and_leaves_the_weights(
    tiny_dir, tmp_path, monkeypatch
):
    """A finite loss whose backward puts inf into one gradient (a final-norm weight, which
    autograd accumulates; the hook is armed for the bad step only)."""
    trainer = Trainer(tiny_run_config(tiny_dir, tmp_path, "inf-grad", loss="dpo"))
    model = trainer.acc.unwrap_model(trainer.policy)
    target = model.model.norm.weight
    steps_started = []
    real_step = Trainer.train_step

    def counting_step(self, batch_idx):
        steps_started.append(1)
        return real_step(self, batch_idx)

    monkeypatch.setattr(Trainer, "train_step", counting_step)

    def poison(grad):
        if len(steps_started) < BAD_STEP:
            return grad
        grad = grad.clone()
        grad[0] = math.inf
        return grad

    target.register_hook(poison)
    err, before = _run_until_refused(trainer, monkeypatch)
    _assert_refused_at_bad_step(trainer, err, before, "non-finite gradient norm (inf)")
