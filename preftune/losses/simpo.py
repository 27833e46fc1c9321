"""Losses without a reference in the logits: SimPO, ORPO, SLiC-HF, and α-DPO, whose reference
enters only through a detached margin (METHODS.md §3, §8, §10, §11).

Inputs are summed log-probs (B,); the losses that use per-token averages divide by the lengths
here, so the trainer always hands over sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .types import LossOutput, PreferenceLogps, batch_std, chosen_nll, per_token, scalar

# Below this EMA std, α-DPO's z-score is taken as 0 (policy == reference, or one pair).
STD_EPS = 1e-6


def simpo_loss(logps: PreferenceLogps, *, beta: float, gamma_beta_ratio: float) -> LossOutput:
    """SimPO (Meng, Xia, Chen 2024, arXiv 2405.14734), in its code's parametrisation.

        avg = logp / len   (per-sequence mean over completion tokens)
        L = -logsig(beta * (avg_w - avg_l - gamma_beta_ratio))
          = -logsig(beta * avg_w - beta * avg_l - gamma),   gamma = beta * gamma_beta_ratio

    beta: reward scale (2.0-2.5, or 10); gamma_beta_ratio: target margin over beta (the README
    recommends starting at 0.5 and searching [0, 1]). No reference model. Rewards: beta * avg.
    """
    chosen = per_token(logps.policy_chosen_logps, logps.chosen_lengths)
    rejected = per_token(logps.policy_rejected_logps, logps.rejected_lengths)
    losses = -F.logsigmoid(beta * (chosen - rejected - gamma_beta_ratio))
    return LossOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0; x is clamped just below 0 so avg = 0 gives a finite value."""
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.log(-torch.expm1(x))


def orpo_loss(logps: PreferenceLogps, *, orpo_lambda: float) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv 2403.07691).

        avg       = logp / len                     (geometric-mean token likelihood, in logs)
        log odds  = avg - log(1 - exp(avg))
        LOR       = log odds(y_w) - log odds(y_l)
        L         = NLL(y_w) - orpo_lambda * logsig(LOR),   NLL(y_w) = -logp_w / len_w

    orpo_lambda (the paper's lambda, TRL's ORPOConfig.beta) weighs the odds-ratio term.
    Decision: the NLL covers the chosen *completion* tokens only, like every other NLL term
    here; xfactlab/TRL include the prompt tokens by default, so their NLL differs when the
    prompt is long. log(1 - exp) is computed as log(-expm1(.)). No reference model.
    Rewards: orpo_lambda * avg (TRL's convention).
    """
    chosen = per_token(logps.policy_chosen_logps, logps.chosen_lengths)
    rejected = per_token(logps.policy_rejected_logps, logps.rejected_lengths)
    log_odds = (chosen - _log1mexp(chosen)) - (rejected - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = chosen_nll(logps)
    losses = nll - orpo_lambda * ratio
    metrics = {"nll": scalar(nll.mean()), "log_odds_ratio": scalar(log_odds.mean())}
    return LossOutput(
        losses, (orpo_lambda * chosen).detach(), (orpo_lambda * rejected).detach(), metrics
    )


def slic_loss(logps: PreferenceLogps, *, delta: float, nll_weight: float) -> LossOutput:
    """SLiC-HF (Zhao et al. 2023, arXiv 2305.10425), as quoted in RSO's Eq. 1.

        L = relu(delta - (logp_w - logp_l)) + nll_weight * NLL(y_w),   NLL(y_w) = -logp_w / len_w

    delta: ranking margin on summed log-probs (1.0, paper §3.2 via a secondary source).
    nll_weight: the regulariser lambda; the paper's value is unverified, 0.1 follows HALOs.
    No reference model and no sigmoid; the hinge gradient is 0 once logp_w - logp_l >= delta.
    Open point (METHODS §3): the NLL normalisation. Decision: per-token mean over the chosen
    completion (a sequence-sum NLL dwarfs a hinge of about 1), on y_ref = y_w.
    Rewards: the summed policy log-probs (no beta, no reference).
    """
    chosen, rejected = logps.policy_chosen_logps, logps.policy_rejected_logps
    nll = chosen_nll(logps)
    losses = F.relu(delta - (chosen - rejected)) + nll_weight * nll
    return LossOutput(losses, chosen.detach(), rejected.detach(), {"nll": scalar(nll.mean())})


def alpha_dpo_init_state() -> dict[str, Tensor]:
    """EMA statistics of the length-normalised DPO gap: mean `mu` and std `s`, both from 0."""
    return {"mu": torch.zeros(()), "s": torch.zeros(())}


def alpha_dpo_margin(
    gap: Tensor, mu: Tensor, s: Tensor, *, alpha: float, gamma_beta_ratio: float, z_score: bool
) -> Tensor:
    """α-DPO's detached per-pair margin from the gaps M and the (already updated) EMAs."""
    if z_score:
        # A spread below STD_EPS (one pair on the first step) carries no scale: no adaptive term.
        z = torch.where(s > STD_EPS, (gap - mu) / s.clamp(min=STD_EPS), torch.zeros_like(gap))
        adaptive = alpha * z
    else:
        adaptive = alpha * gap
    return (adaptive + gamma_beta_ratio).detach()


def alpha_dpo_loss(
    logps: PreferenceLogps,
    *,
    state: dict[str, Tensor],
    beta: float,
    gamma_beta_ratio: float,
    alpha: float,
    momentum: float,
    z_score: bool,
) -> LossOutput:
    """α-DPO (Wu et al. 2025, AlphaDPO, arXiv 2410.10148), exactly as the authors' code
    (`AlphaDPOTrainer.dpo_loss`, `ln: true`).

        avg   = logp / len,  ref_avg = ref / len
        pi_lr = avg_w - avg_l
        M     = (avg_w - ref_avg_w) - (avg_l - ref_avg_l)        # length-normalised DPO gap
        mu   <- momentum * mu + (1 - momentum) * mean_B(M)        # EMA, from 0, no bias fix
        s    <- momentum * s  + (1 - momentum) * std_B(M)         # unbiased std; 0 if B == 1
        margin = sg(alpha * (M - mu) / s + gamma_beta_ratio)      # z := 0 while s <= 1e-6
        L     = -logsig(beta * (pi_lr - margin))

    Guard (the code has none): while s <= 1e-6 (policy == reference, or a single pair on the
    first step) the z-score is set to 0 instead of dividing by ~0, so the margin is just
    gamma_beta_ratio until the EMA has seen some spread.
    The reference enters only through the detached margin; the logits are SimPO's. The EMA is
    updated on every call (eval batches included, as in the code), before the margin.
    Open point (METHODS §19): z-scoring is in the code; the paper writes the margin without
    it. Decision: `z_score=True` follows the code; `z_score=False` gives the paper form
    margin = sg(alpha * M) + gamma_beta_ratio (the EMA is still tracked).
    Scope: mean/std are over the batch passed in; pass the globally gathered batch to match
    the code's all_gather. State: {"mu", "s"} 0-d tensors; None -> alpha_dpo_init_state().
    Rewards (not the DPO reward): beta * (avg - alpha * (avg - ref_avg)), detached.
    """
    chosen = per_token(logps.policy_chosen_logps, logps.chosen_lengths)
    rejected = per_token(logps.policy_rejected_logps, logps.rejected_lengths)
    ref_chosen = per_token(logps.ref_chosen_logps, logps.chosen_lengths)
    ref_rejected = per_token(logps.ref_rejected_logps, logps.rejected_lengths)

    gap = ((chosen - ref_chosen) - (rejected - ref_rejected)).detach()
    mu = momentum * state["mu"].to(gap) + (1 - momentum) * gap.mean()
    s = momentum * state["s"].to(gap) + (1 - momentum) * batch_std(gap)
    margin = alpha_dpo_margin(
        gap, mu, s, alpha=alpha, gamma_beta_ratio=gamma_beta_ratio, z_score=z_score
    )

    losses = -F.logsigmoid(beta * (chosen - rejected - margin))
    chosen_rewards = (beta * (chosen - alpha * (chosen - ref_chosen))).detach()
    rejected_rewards = (beta * (rejected - alpha * (rejected - ref_rejected))).detach()
    metrics = {
        "alpha_dpo/mu": scalar(mu),
        "alpha_dpo/s": scalar(s),
        "margin": scalar(margin.mean()),
    }
    new_state = {"mu": mu.detach(), "s": s.detach()}
    return LossOutput(losses, chosen_rewards, rejected_rewards, metrics, new_state)
