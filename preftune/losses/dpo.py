"""DPO and its direct relatives: cDPO, robust DPO, reference-free DPO, IPO, length-normalised
DPO, RSO hinge-norm, DPOP and RPO (METHODS.md §1-5, §15).

Every function takes a PreferenceLogps whose tensors are (B,) sums over completion tokens and
returns per-example losses (B,) with detached rewards. Hyper-parameters have no defaults here:
the registry (`preftune.losses.LOSSES`) holds them, so there is one place to read them.
"""

from __future__ import annotations

import torch.nn.functional as F

from .types import (
    LossOutput,
    PreferenceLogps,
    chosen_nll,
    dpo_rewards,
    logratios,
    margin,
    per_token,
    scalar,
)


def dpo_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float) -> LossOutput:
    """DPO (Rafailov et al. 2023, Eq. 7), and conservative DPO when label_smoothing > 0.

        h = (logp_w - ref_w) - (logp_l - ref_l)
        L = -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)

    eps = label_smoothing in [0, 0.5) is the assumed probability that a label is flipped
    (cDPO, Mitchell 2023); eps = 0 is plain DPO. Unlike TRL HEAD's "sigmoid", smoothing is
    honoured here. Inputs are summed log-probs, (B,). Rewards: beta * (logp - ref).
    """
    logits = beta * margin(logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    chosen_rewards, rejected_rewards = dpo_rewards(logps, beta)
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def robust_dpo_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), unbiased under label noise.

        L = [ -(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h) ] / (1 - 2 * eps)

    eps = label_smoothing in [0, 0.5) is the label-flip rate. Note the + sign on the flipped
    term and the 1/(1 - 2 eps) factor: this is not cDPO. eps = 0 is plain DPO.
    """
    logits = beta * margin(logps)
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = label_smoothing * F.logsigmoid(-logits)
    losses = (clean + flipped) / (1 - 2 * label_smoothing)
    chosen_rewards, rejected_rewards = dpo_rewards(logps, beta)
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def dpo_ref_free_loss(logps: PreferenceLogps, *, beta: float) -> LossOutput:
    """Reference-free DPO (Rafailov et al. 2023, `reference_free=True` in the authors' code).

        L = -logsig(beta * (logp_w - logp_l))

    The reference is the uniform distribution, so its log-ratio is 0. Log-probs stay summed
    (this is SimPO only without length normalisation and with gamma = 0). Reference fields
    may be None. Rewards: beta * logp (the implicit reward under a uniform reference).
    """
    chosen, rejected = logps.policy_chosen_logps, logps.policy_rejected_logps
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return LossOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


def ipo_loss(logps: PreferenceLogps, *, beta: float, length_normalized: bool) -> LossOutput:
    """IPO (Azar et al. 2023, Eq. 17); beta plays the role of tau.

        length_normalized=True:   h = (logp_w - ref_w)/len_w - (logp_l - ref_l)/len_l
        length_normalized=False:  h = (logp_w - ref_w) - (logp_l - ref_l)
        L = (h - 1/(2 * beta))^2

    Open point (METHODS §2): sum vs per-token average. Decision: the average is the default,
    as in TRL's DPOTrainer and HALOs, whose authors confirmed it with the IPO authors; with
    sums, 1/(2 tau) is negligible next to h on long responses. `length_normalized=False`
    gives the sum form of the DPO reference code, OpenRLHF and TRL's online DPO. Policy and
    reference are divided by the same per-sequence length. No sigmoid, no beta inside the
    square. Rewards: beta * (the log-ratio the loss uses, averaged or summed).
    """
    chosen, rejected = logratios(logps)
    if length_normalized:
        chosen = per_token(chosen, logps.chosen_lengths)
        rejected = per_token(rejected, logps.rejected_lengths)
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return LossOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


def sigmoid_norm_loss(logps: PreferenceLogps, *, beta: float) -> LossOutput:
    """Length-normalised DPO: TRL's `loss_type="sigmoid_norm"` (TRL cites SimPO for it).

        h_avg = (logp_w - ref_w)/len_w - (logp_l - ref_l)/len_l
        L = -logsig(beta * h_avg)

    Naming trap (METHODS §4): RSO's "sigmoid-norm" means normalised *by the reference*, which
    is plain DPO (`dpo` with beta = gamma). This entry follows TRL's meaning, because a TRL
    user who writes `sigmoid_norm` expects TRL's loss. Rewards: beta * averaged log-ratio.
    """
    chosen, rejected = logratios(logps)
    chosen = per_token(chosen, logps.chosen_lengths)
    rejected = per_token(rejected, logps.rejected_lengths)
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return LossOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


def hinge_loss(logps: PreferenceLogps, *, beta: float) -> LossOutput:
    """RSO hinge-norm (Liu et al. 2024, ICLR), which is TRL's `loss_type="hinge"`.

        L = relu(1 - beta * h),   h = (logp_w - ref_w) - (logp_l - ref_l)

    beta is RSO's loss temperature gamma (default 0.05, the paper's best), the reciprocal of
    the margin in log-ratio units. This is NOT SLiC-HF (see `slic`), which has no reference.
    The gradient is exactly 0 once beta * h >= 1.
    """
    losses = F.relu(1 - beta * margin(logps))
    chosen_rewards, rejected_rewards = dpo_rewards(logps, beta)
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def dpop_loss(logps: PreferenceLogps, *, beta: float, dpop_lambda: float) -> LossOutput:
    """DPO-Positive (Pal et al. 2024, Smaug, arXiv 2402.13228).

        pen = relu(ref_w - logp_w)             # > 0 once the chosen likelihood falls below ref
        L   = -logsig(beta * (h - dpop_lambda * pen))

    The penalty sits inside the sigmoid and is scaled by beta with the margin; it is
    per-sequence (summed log-probs) and not detached: the gradient through logp_w is the
    point. Putting it outside the sigmoid is a different loss with an unbounded gradient.
    Provenance is secondary (PaddleNLP's dpo_criterion; the authors released no code);
    defaults beta=0.3, lambda=50 follow it. dpop_lambda = 0 is plain DPO.
    """
    penalty = F.relu(logps.ref_chosen_logps - logps.policy_chosen_logps)
    losses = -F.logsigmoid(beta * (margin(logps) - dpop_lambda * penalty))
    chosen_rewards, rejected_rewards = dpo_rewards(logps, beta)
    return LossOutput(
        losses, chosen_rewards, rejected_rewards, {"dpop/penalty": scalar(penalty.mean())}
    )


def rpo_loss(logps: PreferenceLogps, *, beta: float, nll_weight: float) -> LossOutput:
    """RPO / DPO + NLL (Pang et al. 2024, Iterative RPO; Llama 3 uses nll_weight = 0.2).

        L = -logsig(beta * h) + nll_weight * NLL(y_w),   NLL(y_w) = -logp_w / len_w

    Open point (METHODS §15, §19): the NLL denominator. Decision: the per-sequence mean over
    the chosen completion tokens (the paper's per-sequence normalisation), added per example
    before the batch mean. TRL instead takes a token mean over the whole batch and OpenRLHF a
    mean of per-sequence means. Prompt tokens are excluded. nll_weight = 0 is plain DPO.
    """
    nll = chosen_nll(logps)
    losses = -F.logsigmoid(beta * margin(logps)) + nll_weight * nll
    chosen_rewards, rejected_rewards = dpo_rewards(logps, beta)
    return LossOutput(losses, chosen_rewards, rejected_rewards, {"nll": scalar(nll.mean())})
