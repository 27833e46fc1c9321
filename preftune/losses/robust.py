"""Dr. DPO: distributionally robust DPO over the pairs of a batch (METHODS.md §7)."""

from __future__ import annotations

import math

import torch

from .dpo import dpo_loss
from .types import LossOutput, PreferenceLogps


def dr_dpo_loss(
    logps: PreferenceLogps, *, beta: float, beta_prime: float, label_smoothing: float
) -> LossOutput:
    """Dr. DPO (Wu et al. 2024, arXiv 2407.07880), as in `junkangwu/Dr_DPO` get_batch_metrics.

        l_i = -(1 - eps) * logsig(beta * h_i) - eps * logsig(-beta * h_i)     # per-pair (c)DPO
        L   = -beta_prime * log( mean_B exp(-l_i / beta_prime) )
            = -beta_prime * ( logsumexp(-l / beta_prime) - log B )

    A batch objective: the gradient weights pair i by softmax_i(-l_i / beta_prime), which
    down-weights high-loss (likely mislabelled) pairs. beta_prime -> inf recovers mean DPO;
    beta_prime -> 0 tends to min_i l_i. beta is the KL temperature, beta_prime the robustness.
    Computed with logsumexp (the original's log(mean(exp)) underflows).
    Scope: the batch passed in (the original uses the per-GPU microbatch), so the value depends
    on the microbatch size. Every entry of `losses` holds L, so `losses.mean()` is L with its
    exact gradient. Rewards: beta * (logp - ref); the per-pair losses go to metrics as their mean.
    """
    pair = dpo_loss(logps, beta=beta, label_smoothing=label_smoothing)
    n = pair.losses.shape[0]
    objective = -beta_prime * (torch.logsumexp(-pair.losses / beta_prime, dim=0) - math.log(n))
    losses = objective.expand(n)
    metrics = {"dr_dpo/pair_loss": pair.losses.detach().mean()}
    return LossOutput(losses, pair.chosen_rewards, pair.rejected_rewards, metrics)
