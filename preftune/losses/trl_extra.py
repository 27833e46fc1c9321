"""The rest of TRL's DPOTrainer objectives, so a TRL user finds every `loss_type` they know:
EXO, NCA, BCO, SPPO (hard), AOT (paired and unpaired), APO (zero and down) and DiscoPOP.

Formulas follow TRL's `DPOTrainer` (v0.24 `dpo_loss` and HEAD `_compute_loss`, which agree on
these) and `docs/source/dpo_trainer.md`; defaults are TRL's `DPOConfig` ones. All take summed
log-probs (B,) and need the reference; rewards are beta * (logp - ref), detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .types import LossOutput, PreferenceLogps, dpo_rewards, logratios, margin, scalar


def _output(logps: PreferenceLogps, beta: float, losses: Tensor, **metrics: Tensor) -> LossOutput:
    chosen_rewards, rejected_rewards = dpo_rewards(logps, beta)
    return LossOutput(losses, chosen_rewards, rejected_rewards, dict(metrics))


def exo_pair_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float) -> LossOutput:
    """EXO, pairwise form (Ji et al. 2024, arXiv 2402.00856, Eq. 16); TRL `exo_pair`.

        q_w = sigma(beta * h),  q_l = sigma(-beta * h)
        L   = q_w * (logsig(beta * h) - log(1 - eps)) + q_l * (logsig(-beta * h) - log eps)

    i.e. KL(q || p) between the model's pair distribution and the smoothed label (1-eps, eps),
    reverse-KL preference optimisation. eps = label_smoothing must be in (0, 0.5): log eps is
    needed, so TRL's default 1e-3 is the default here (TRL silently replaces 0 by 1e-3; here
    0 is rejected). The full method uses K > 2 completions per prompt.
    """
    logits = beta * margin(logps)
    chosen_term = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-label_smoothing))
    rejected_term = torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(label_smoothing))
    return _output(logps, beta, chosen_term + rejected_term)


def nca_pair_loss(logps: PreferenceLogps, *, beta: float) -> LossOutput:
    """NCA, pairwise form (Chen et al. 2024, arXiv 2402.05369); TRL `nca_pair`.

        r_w = beta * (logp_w - ref_w),  r_l = beta * (logp_l - ref_l)
        L   = -logsig(r_w) - 0.5 * logsig(-r_w) - 0.5 * logsig(-r_l)

    Optimises the absolute likelihood of each response rather than only their difference,
    so the chosen likelihood is not pushed down together with the rejected one.
    """
    chosen, rejected = logratios(logps)
    r_w, r_l = beta * chosen, beta * rejected
    losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    return _output(logps, beta, losses)


def bco_pair_init_state() -> dict[str, Tensor]:
    """Running mean of the batch-mean reward, and how many batches it has seen."""
    return {"reward_mean": torch.zeros(()), "count": torch.zeros(())}


def bco_pair_loss(logps: PreferenceLogps, *, state: dict[str, Tensor], beta: float) -> LossOutput:
    """BCO, pairwise form (Jung et al. 2024, arXiv 2404.04656); TRL v0.24 `bco_pair`.

        r_w = beta * (logp_w - ref_w),  r_l = beta * (logp_l - ref_l)
        delta <- running mean over calls of sg(mean_B [r_w ; r_l])    (updated first)
        L   = -logsig(r_w - delta) - logsig(-(r_l - delta))

    A binary classifier whose logit is the implicit reward: chosen -> 1, rejected -> 0, with
    delta shifting the decision boundary. delta is TRL's RunningMoments mean: a cumulative
    average of per-call batch means (each call weighs 1), detached. Scope: the batch passed
    in; pass globally gathered log-probs to match TRL across processes (TRL then weighs each
    process's mean once). State: {"reward_mean", "count"}; None -> bco_pair_init_state().
    """
    chosen, rejected = logratios(logps)
    r_w, r_l = beta * chosen, beta * rejected
    batch_mean = torch.cat((r_w, r_l)).mean().detach()
    count = state["count"].to(batch_mean) + 1
    delta = (
        state["reward_mean"].to(batch_mean)
        + (batch_mean - state["reward_mean"].to(batch_mean)) / count
    )
    losses = -F.logsigmoid(r_w - delta) - F.logsigmoid(-(r_l - delta))
    out = _output(logps, beta, losses, **{"bco/reward_mean": scalar(delta)})
    out.state = {"reward_mean": delta, "count": count}
    return out


def sppo_hard_loss(logps: PreferenceLogps, *, beta: float) -> LossOutput:
    """SPPO with hard labels (Wu et al. 2024, arXiv 2405.00675); TRL `sppo_hard`.

        L = (logp_w - ref_w - 1/(2 beta))^2 + (logp_l - ref_l + 1/(2 beta))^2

    Pushes the chosen reward beta * (logp_w - ref_w) towards +1/2 and the rejected one towards
    -1/2. The paper's soft probabilities (from PairRM) are replaced by 1 for the winner and 0
    for the loser, as in TRL.
    """
    chosen, rejected = logratios(logps)
    losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    return _output(logps, beta, losses)


def _aot(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(
        -beta * delta
    )


def aot_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float) -> LossOutput:
    """AOT, paired (Melnyk et al. 2024, arXiv 2406.05882); TRL `aot`.

        d = sort_B(logp_w - logp_l) - sort_B(ref_w - ref_l)        (both ascending)
        L_i = -(1 - eps) * logsig(beta * d_i) - eps * logsig(-beta * d_i)

    Distributional alignment by 1-D optimal transport: stochastic dominance of the policy's
    log-ratio quantiles over the reference's. A batch objective: entry i is the loss of the
    i-th quantile, not of pair i; larger batches give better quantiles. Scope: the batch passed in.
    """
    policy = logps.policy_chosen_logps - logps.policy_rejected_logps
    ref = logps.ref_chosen_logps - logps.ref_rejected_logps
    delta = torch.sort(policy).values - torch.sort(ref).values
    return _output(logps, beta, _aot(delta, beta, label_smoothing))


def aot_unpaired_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float) -> LossOutput:
    """AOT, unpaired (Melnyk et al. 2024, arXiv 2406.05882); TRL `aot_unpaired` (`aot_pair`
    in TRL <= 0.2x).

        d = sort_B(logp_w - ref_w) - sort_B(logp_l - ref_l)         (both ascending)
        L_i = -(1 - eps) * logsig(beta * d_i) - eps * logsig(-beta * d_i)

    Chosen and rejected rewards are matched by rank, not by pair, so the pairing in the data
    is ignored. Entry i is the i-th quantile's loss. Scope: the batch passed in.
    """
    chosen, rejected = logratios(logps)
    delta = torch.sort(chosen).values - torch.sort(rejected).values
    return _output(logps, beta, _aot(delta, beta, label_smoothing))


def apo_zero_loss(logps: PreferenceLogps, *, beta: float) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7); TRL `apo_zero`.

        L = (1 - sigma(beta * (logp_w - ref_w))) + sigma(beta * (logp_l - ref_l))

    Anchored: raises the chosen likelihood and lowers the rejected one, each against the
    reference. Use when the chosen outputs are better than the model's own.
    """
    chosen, rejected = logratios(logps)
    losses = torch.sigmoid(-beta * chosen) + torch.sigmoid(beta * rejected)
    return _output(logps, beta, losses)


def apo_down_loss(logps: PreferenceLogps, *, beta: float) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 8); TRL `apo_down`.

        L = sigma(beta * (logp_w - ref_w)) + (1 - sigma(beta * h))

    Lowers both likelihoods, the rejected one more. Use when the model already outperforms
    the chosen outputs.
    """
    chosen, _ = logratios(logps)
    losses = torch.sigmoid(beta * chosen) + torch.sigmoid(-beta * margin(logps))
    return _output(logps, beta, losses)


def discopop_loss(logps: PreferenceLogps, *, beta: float, discopop_tau: float) -> LossOutput:
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, arXiv 2406.08414); TRL
    `discopop`.

        x = beta * h,  m = sigma(x / tau)
        L = (1 - m) * (-logsig(x)) + m * exp(-x)

    Blends the logistic (DPO) loss with an exponential one as the margin grows. tau =
    discopop_tau (0.05, the paper's recommendation). m * exp(-x) is evaluated as
    exp(-x + logsig(x / tau)), which is the same number but finite for very negative x.
    """
    logits = beta * margin(logps)
    mix = torch.sigmoid(logits / discopop_tau)
    exponential = torch.exp(-logits + F.logsigmoid(logits / discopop_tau))
    losses = -F.logsigmoid(logits) * (1 - mix) + exponential
    return _output(logps, beta, losses)
