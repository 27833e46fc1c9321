"""Divergence: training that has gone wrong is stopped and said, never carried on quietly.

Three signs, each checked on every optimizer step:
- non-finite: a loss or gradient norm that is inf or NaN (raised by the step itself, before the
  optimizer would write it into the weights);
- vanished: a gradient norm of exactly 0 with a non-zero loss for `VANISH_STEPS` steps in a row
  (weights blown up until the loss saturates: nothing can move them back);
- exploding: a gradient norm above `factor` times the median of the last `WINDOW` steps.

The weights of the step before the sign was seen may already be bad (one update of lr 1e4 blows
them up, the next gradient is 0), so on divergence at step s the checkpoints from step s - 1 on
are moved to `checkpoints/diverged/` and the run's newest checkpoint is one taken before it.
"""

from __future__ import annotations

import math
import shutil
import statistics
from pathlib import Path

from preftune.train import checkpoint as ckpt
from preftune.train.setup import TrainingError

WINDOW = 20
MIN_HISTORY = 5
VANISH_STEPS = 2


class DivergedError(TrainingError):
    """Training stopped at `step` because `reason`."""

    def __init__(self, step: int, reason: str):
        self.step, self.reason = step, reason
        super().__init__(f"training diverged at step {step}: {reason}")


class DivergenceGuard:
    """Watches each step's mean loss and gradient norm (before clipping)."""

    def __init__(self, factor: float | None, history: list[float] | None = None):
        self.factor = factor
        self.history = list(history or [])  # recent healthy gradient norms, in checkpoints
        self.zero_steps = 0

    def check(self, step: int, loss: float, grad_norm: float) -> None:
        if not math.isfinite(grad_norm):
            raise DivergedError(step, f"gradient norm {grad_norm}")
        if not math.isfinite(loss):
            return  # a trained non-finite loss is refused in the step; NaN here = nothing trained
        if grad_norm == 0.0 and loss != 0.0:
            self.zero_steps += 1
            if self.zero_steps >= VANISH_STEPS:
                raise DivergedError(
                    step,
                    f"the gradient norm has been exactly 0 for {self.zero_steps} steps while the "
                    f"loss is {loss:.4g}: the weights have saturated (lr too high?)",
                )
            return
        self.zero_steps = 0
        if self.factor and len(self.history) >= MIN_HISTORY:
            median = statistics.median(self.history)
            if median > 0 and grad_norm > self.factor * median:
                raise DivergedError(
                    step,
                    f"gradient norm {grad_norm:.4g} is {grad_norm / median:.0f}x the median "
                    f"{median:.4g} of the last {len(self.history)} steps "
                    f"(divergence_factor={self.factor:g})",
                )
        self.history = (self.history + [grad_norm])[-WINDOW:]


def quarantine(ckpt_root: Path, step: int) -> tuple[list[str], Path | None]:
    """Move the checkpoints from step `step - 1` on into `ckpt_root/diverged/`; returns the
    names moved and the newest checkpoint left."""
    moved = []
    for path in ckpt.list_checkpoints(ckpt_root):
        if int(path.name.split("-")[1]) >= step - 1:
            target = ckpt_root / "diverged" / path.name
            target.parent.mkdir(exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            path.rename(target)
            moved.append(path.name)
    left = ckpt.list_checkpoints(ckpt_root)
    return moved, (left[-1] if left else None)
