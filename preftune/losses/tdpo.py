"""TDPO: token-level DPO with a sequential KL term (METHODS.md §9)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .types import LossOutput, PreferenceLogps, margin, scalar


def seq_kl_from_logits(policy_logits: Tensor, ref_logits: Tensor, mask: Tensor) -> Tensor:
    """SeqKL(y) = sum_t mask_t * KL(pi_ref(.|x, y_<t) || pi_theta(.|x, y_<t)), shape (B,).

    policy_logits, ref_logits: (B, T, V), already shifted so position t predicts token t+1;
    mask: (B, T), 1 on completion tokens. The reference is the first argument (forward KL,
    p_ref as weights). Log-softmax in float32 at least. This materialises full-vocabulary
    logits, so it is the reference version for tests; a chunked trainer path must match it.
    """
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)
    policy = policy_logits.to(dtype).log_softmax(-1)
    ref = ref_logits.to(dtype).log_softmax(-1)
    per_position = (ref.exp() * (ref - policy)).sum(-1)
    return (per_position * mask.to(dtype)).sum(-1)


def _tdpo(logps: PreferenceLogps, beta: float, alpha: float, detach_chosen: bool) -> LossOutput:
    kl_chosen, kl_rejected = logps.chosen_seq_kl, logps.rejected_seq_kl
    if detach_chosen:
        values = margin(logps) - alpha * (kl_rejected - kl_chosen.detach())
    else:
        values = margin(logps) - (kl_rejected - kl_chosen)
    losses = -F.logsigmoid(beta * values)
    chosen_rewards = (
        beta * (logps.policy_chosen_logps - logps.ref_chosen_logps + kl_chosen)
    ).detach()
    rejected_rewards = (
        beta * (logps.policy_rejected_logps - logps.ref_rejected_logps + kl_rejected)
    ).detach()
    metrics = {"kl/chosen": scalar(kl_chosen.mean()), "kl/rejected": scalar(kl_rejected.mean())}
    return LossOutput(losses, chosen_rewards, rejected_rewards, metrics)


def tdpo1_loss(logps: PreferenceLogps, *, beta: float, alpha: float) -> LossOutput:
    """TDPO1 (Zeng et al. 2024, Token-level DPO, arXiv 2404.11999).

        u = (logp_w - ref_w) - (logp_l - ref_l)
        L = -logsig(beta * (u - (SeqKL(y_l) - SeqKL(y_w))))

    Needs chosen_seq_kl / rejected_seq_kl (B,): the summed forward KL(ref || policy) over the
    completion positions (see seq_kl_from_logits), which requires the full-vocabulary
    reference logits, so scalar reference caches are not enough. Gradients flow through both
    SeqKL terms. `alpha` is unused by TDPO1: it is accepted so one config switches between
    tdpo1 and tdpo2, as the reference tdpo.yaml does (its `if_tdpo2` flag; note the flag's
    default drifted between the code and the yaml, here the variant is the loss name).
    Rewards: beta * ((logp - ref) + SeqKL), detached.
    """
    del alpha  # documented above: TDPO1 weighs the SeqKL difference by 1
    return _tdpo(logps, beta, 1.0, detach_chosen=False)


def tdpo2_loss(logps: PreferenceLogps, *, beta: float, alpha: float) -> LossOutput:
    """TDPO2 (Zeng et al. 2024, arXiv 2404.11999).

        L = -logsig(beta * (u - alpha * (SeqKL(y_l) - sg(SeqKL(y_w)))))

    alpha weighs the SeqKL difference (0.5 in the README's recommended command); the chosen
    SeqKL is detached, the rejected one is not. The README prefers TDPO2 at higher learning
    rates. Inputs and rewards as in tdpo1.
    """
    return _tdpo(logps, beta, alpha, detach_chosen=True)
