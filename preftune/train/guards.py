"""Divergence: training that has gone wrong is stopped and said, never carried on quietly.

Three signs, each checked on every optimizer step:
- non-finite: a loss or gradient norm that is inf or NaN (raised by the step itself, before the
  optimizer would write it into the weights);
- vanished: a gradient norm of exactly 0 with a loss above `LIVE_LOSS` for `VANISH_STEPS`
  steps in a row (weights blown up until the loss saturates: nothing can move them back);
- exploding: a gradient norm above `factor` times the median of the last `WINDOW` non-zero
  norms.

The weights of the step before the first sign may already be bad (one update of lr 1e4 blows
them up, the next gradient is 0), so when the first sign came at step s the checkpoints from
step s - 1 on are moved to `checkpoints/diverged/`, and the run's newest checkpoint is one
taken before it.
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
LIVE_LOSS = 1e-6  # below it a zero gradient is a loss that has converged, not one that died


class DivergedError(TrainingError):
    """Training stopped at `step` because `reason`; the first sign of it came at `first`."""

    def __init__(self, step: int, reason: str, first: int | None = None):
        self.step, self.reason, self.first = step, reason, first or step
        super().__init__(f"training diverged at step {step}: {reason}")


class DivergenceGuard:
    """Watches each step's mean loss and gradient norm (before clipping)."""

    def __init__(self, factor: float | None):
        self.factor = factor
        self.history: list[float] = []  # recent non-zero gradient norms
        self.zero_steps = 0

    def state_dict(self) -> dict:
        return {"history": self.history, "zero_steps": self.zero_steps}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        self.zero_steps = int(state.get("zero_steps", 0))

    def check(self, step: int, loss: float, grad_norm: float) -> None:
        if not math.isfinite(grad_norm):
            raise DivergedError(step, f"gradient norm {grad_norm}")
        if not math.isfinite(loss):
            return  # a trained non-finite loss is refused in the step; NaN here = nothing trained
        if grad_norm == 0.0:
            self.zero_steps = self.zero_steps + 1 if abs(loss) > LIVE_LOSS else 0
            if self.zero_steps >= VANISH_STEPS:
                raise DivergedError(
                    step,
                    f"the gradient norm has been exactly 0 for {self.zero_steps} steps while the "
                    f"loss is {loss:.4g}: the weights have saturated (lr too high?)",
                    first=step - self.zero_steps + 1,
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


def quarantine(
    ckpt_root: Path, first: int, into: str = "diverged"
) -> tuple[list[str], Path | None]:
    """Move the checkpoints from step `first - 1` on into `ckpt_root/into/`; returns the
    names moved and the newest checkpoint left."""
    moved = []
    for path in ckpt.list_checkpoints(ckpt_root):
        if ckpt.step_of(path) >= first - 1:
            target = ckpt_root / into / path.name
            target.parent.mkdir(exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            path.rename(target)
            moved.append(path.name)
    left = ckpt.list_checkpoints(ckpt_root)
    return moved, (left[-1] if left else None)
