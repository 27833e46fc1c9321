"""β-DPO: batch-level dynamic β and β-guided filtering, for any registry loss with a `beta`.

Wu et al. 2024, "β-DPO: Direct Preference Optimization with Dynamic β" (arXiv 2407.08639),
as implemented in `junkangwu/beta-DPO` trainers.py (METHODS.md §6). One step:

    h_i    = sg((logp_w - ref_w) - (logp_l - ref_l))            # NOT multiplied by beta
    A      = gather(h)                                           # all processes' gaps
    M0    <- momentum * M0    + (1 - momentum) * mean(A)         # EMAs from 0, no bias fix,
    sigma <- momentum * sigma + (1 - momentum) * std(A)          # unbiased std; 0 if |A| = 1
    w_i    = exp(-0.5 * ((A_i - M0) / max(sigma, eps))^2)        # unnormalised Gaussian
    idx    = n draws without replacement, prob ~ w, n = max(1, int(N * (1 - filter_ratio)))
    beta   = sg(max(beta0 * (1 + alpha * (mean(A[idx]) - M0)), 1e-3))
    L      = mean over kept pairs of base_loss(beta)

Decisions on the open points:
* The gap is the raw log-ratio margin, as in the code (the paper's discrepancy may include
  beta; unverified). Losses without a reference use the policy log-ratio logp_w - logp_l
  (the margin under a uniform reference).
* eps guards sigma = 0 (policy == reference on the first step, where the original code gives
  NaN weights); weights are floored at the smallest positive double so sampling never fails
  when outliers underflow.
* Sampling uses a private, seeded CPU generator, so every process draws the same mask from the
  same gathered vector (no broadcast needed) and a resumed run draws what an uninterrupted
  one would. With filter_ratio = 0 nothing is drawn at all.
* The kept count is int(N * (1 - filter_ratio)), truncated, as in the code: with batch 8 and
  ratio 0.2, 6 pairs are kept and `filtered_fraction` is 0.25 every step, not 0.2 (the
  expected fraction equals the ratio only when N * ratio is an integer). Kept exact to the
  paper's code rather than sampled so that it averages to the ratio; `calibration/kept` logs
  the count, and the report draws the ratio next to the logged fraction.
* The base loss is evaluated on the kept pairs only, so batch objectives (Dr.DPO, AOT) see
  the filtered batch. Logged rewards come from the full batch at beta0, as in the code.
* The statistics update on every call, eval batches included (as in the code); save and
  restore `state_dict()` around evaluation if that is not wanted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .losses import LOSSES, LossOutput, PreferenceLogps, compute, get_spec, validate_hparams
from .losses.types import batch_std

BETA_MIN = 1e-3
Selector = Callable[[Tensor, int], Tensor]


def gaps_of(logps: PreferenceLogps) -> Tensor:
    """Detached per-pair gaps h (B,); the policy log-ratio when there is no reference."""
    gap = logps.policy_chosen_logps - logps.policy_rejected_logps
    if logps.ref_chosen_logps is not None and logps.ref_rejected_logps is not None:
        gap = gap - (logps.ref_chosen_logps - logps.ref_rejected_logps)
    return gap.detach()


def update_statistics(
    gaps: Tensor, M0: float, sigma: float, momentum: float
) -> tuple[float, float]:
    """EMA of the batch mean and unbiased std of `gaps`. Reads them to the host (a sync)."""
    mean, std = float(gaps.mean()), float(batch_std(gaps))
    return momentum * M0 + (1 - momentum) * mean, momentum * sigma + (1 - momentum) * std


def gaussian_weights(gaps: Tensor, M0: float, sigma: float, eps: float) -> Tensor:
    """w_i = exp(-0.5 * ((h_i - M0) / max(sigma, eps))^2), in float64 on the CPU."""
    z = (gaps.detach().to("cpu", torch.float64) - M0) / max(sigma, eps)
    return torch.exp(-0.5 * z**2)


def dynamic_beta(beta0: float, alpha: float, kept_gaps: Tensor, M0: float) -> float:
    """beta0 * (1 + alpha * (mean kept gap - M0)), clamped at 1e-3; a float, so no gradient."""
    return max(beta0 * (1 + alpha * (float(kept_gaps.mean()) - M0)), BETA_MIN)


def calibrated_step(
    name: str,
    logps: PreferenceLogps,
    hparams: dict[str, Any],
    *,
    M0: float,
    sigma: float,
    alpha: float,
    momentum: float,
    filter_ratio: float,
    eps: float,
    select: Selector,
    gather: Callable[[Tensor], Tensor] | None = None,
    process_index: int | None = None,
    state: dict[str, Tensor] | None = None,
) -> tuple[LossOutput, float, float]:
    """One β-DPO step with the pair selection given by `select(weights, n) -> global indices`.

    Pure apart from `select`: returns (output, new M0, new sigma). BetaCalibration passes a
    seeded multinomial sampler; tests pass a fixed index set (see `fixed_selection`).
    process_index: where this process's pairs sit in the gathered vector; None means the
    torch.distributed rank when a `gather` is given and a process group is up, else 0.
    """
    hparams = _checked(name, hparams)
    local = gaps_of(logps)
    everyone = local if gather is None else gather(local).detach()
    size, total = local.shape[0], everyone.shape[0]
    if process_index is None:
        process_index = _rank() if gather is not None else 0
    offset = process_index * size
    if offset + size > total:
        raise ValueError(
            f"gather returned {total} gaps, too few for process {process_index} with {size} "
            f"pairs; every process must pass the same batch size (pad first)."
        )

    M0, sigma = update_statistics(everyone, M0, sigma, momentum)
    weights = gaussian_weights(everyone, M0, sigma, eps)
    kept_total = max(1, int(total * (1 - filter_ratio)))
    keep = select(weights, kept_total).to("cpu").sort().values
    beta = dynamic_beta(hparams["beta"], alpha, everyone[keep.to(everyone.device)], M0)

    local_keep = (keep[(keep >= offset) & (keep < offset + size)] - offset).to(local.device)
    calibrated = {**hparams, "beta": beta}
    # scaled so that losses.mean(), and its average over processes, is sum_kept l_i / n_kept
    losses, new_state, metrics = _kept_losses(
        name, logps, local_keep, size, total / keep.numel(), state, calibrated
    )
    with torch.no_grad():  # logged rewards: every pair, at beta0 (the state update is dropped)
        logged = compute(name, logps, state=state, **hparams)
    kept = keep.numel()
    metrics.update(beta=beta, filtered_fraction=1 - kept / total, **{"calibration/kept": kept})
    metrics.update({"calibration/M0": M0, "calibration/sigma": sigma})
    output = LossOutput(losses, logged.chosen_rewards, logged.rejected_rewards, metrics, new_state)
    return output, M0, sigma


def _checked(name: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """`hparams` validated for `name`, which must be a paired loss with a beta."""
    spec = get_spec(name)
    if not spec.has_beta or spec.unpaired:
        raise ValueError(
            f"β-DPO calibration needs a paired loss with a 'beta'; loss {name!r} "
            + ("is unpaired." if spec.unpaired else "has none.")
            + f" Losses it applies to: {', '.join(calibratable())}."
        )
    return validate_hparams(name, hparams)


def _kept_losses(name, logps, local_keep, size: int, scale: float, state, hparams):
    """(per-pair losses of this process, new loss state, metrics): the kept pairs' losses times
    `scale`, zeros for the dropped ones; a zero that still reaches the parameters when nothing
    of this process was kept."""
    if local_keep.numel() == size:
        out = compute(name, logps, state=state, **hparams)
        return out.losses * scale, out.state, dict(out.metrics)
    if local_keep.numel() > 0:
        out = compute(name, logps.select(local_keep), state=state, **hparams)
        losses = torch.zeros(size, dtype=out.losses.dtype, device=out.losses.device)
        return losses.index_put((local_keep,), out.losses * scale), out.state, dict(out.metrics)
    return 0.0 * (logps.policy_chosen_logps + logps.policy_rejected_logps), state, {}


def _rank() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


def fixed_selection(index: Tensor | list[int]) -> Selector:
    """A selector that always keeps `index` (for tests and the METHODS vectors)."""
    kept = torch.as_tensor(index, dtype=torch.long)
    return lambda weights, n: kept


def calibratable() -> list[str]:
    """Registry losses β-DPO calibration applies to: paired, with a beta."""
    return [k for k, s in LOSSES.items() if s.has_beta and not s.unpaired]


class BetaCalibration:
    """β-DPO's dynamic β and β-guided filtering, wrapped around any paired registry loss.

    alpha: strength of the β adaptation (0 keeps beta0; README example 0.6).
    filter_ratio: fraction of pairs DROPPED each step (rho; 0.2 keeps 80%; 0 keeps all).
    momentum: EMA decay of M0 and sigma (0.9, hard-coded in the original).
    seed: seeds the private sampling generator. eps: floor on sigma in the Gaussian weights.

    Call it in place of `compute`: `out = calib("dpo", logps, {"beta": 0.1})`. Pass
    `gather=accelerator.gather` under several processes (each with the same batch size):
    statistics and the mask are then global, and each process keeps its own slice, found from
    the torch.distributed rank (or pass `process_index=accelerator.process_index`). Its
    `state_dict()` belongs in every checkpoint.
    """

    def __init__(
        self,
        alpha: float = 0.6,
        filter_ratio: float = 0.2,
        momentum: float = 0.9,
        seed: int = 0,
        eps: float = 1e-6,
    ) -> None:
        for label, value, ok, need in (
            ("alpha", alpha, alpha >= 0, ">= 0"),
            ("filter_ratio", filter_ratio, 0 <= filter_ratio < 1, "in [0, 1)"),
            ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            ("eps", eps, eps > 0, "> 0"),
        ):
            if not (math.isfinite(value) and ok):
                raise ValueError(f"β-DPO calibration: {label} must be {need}, got {value!r}.")
        self.alpha, self.filter_ratio, self.momentum, self.eps = alpha, filter_ratio, momentum, eps
        self.seed = seed
        self.M0 = 0.0
        self.sigma = 0.0
        self.step = 0
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def _sample(self, weights: Tensor, n: int) -> Tensor:
        if n >= weights.numel():  # keep everything without touching the generator
            return torch.arange(weights.numel())
        # Outliers can underflow to exactly 0; a positive floor keeps multinomial defined and
        # only draws them once every other pair is taken.
        weights = weights.clamp(min=torch.finfo(torch.float64).tiny)
        return torch.multinomial(weights, n, replacement=False, generator=self.generator)

    def __call__(
        self,
        name: str,
        logps: PreferenceLogps,
        hparams: dict[str, Any],
        *,
        gather: Callable[[Tensor], Tensor] | None = None,
        state: dict[str, Tensor] | None = None,
        process_index: int | None = None,
    ) -> LossOutput:
        """The calibrated loss: `losses.mean()` is the mean base loss over the kept pairs.

        gather: Tensor -> Tensor concatenating every process's gaps (accelerate's `gather`);
        None means this process's batch is the whole batch. state: the base loss's state
        when it is stateful (returned updated in `LossOutput.state`).
        """
        out, self.M0, self.sigma = calibrated_step(
            name,
            logps,
            hparams,
            M0=self.M0,
            sigma=self.sigma,
            alpha=self.alpha,
            momentum=self.momentum,
            filter_ratio=self.filter_ratio,
            eps=self.eps,
            select=self._sample,
            gather=gather,
            process_index=process_index,
            state=state,
        )
        self.step += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        """M0, sigma, step and the generator state: what a resumed run needs to continue."""
        return {
            "M0": self.M0,
            "sigma": self.sigma,
            "step": self.step,
            "rng_state": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.M0 = float(state["M0"])
        self.sigma = float(state["sigma"])
        self.step = int(state["step"])
        self.generator.set_state(state["rng_state"])
