"""KTO: prospect-theoretic loss on unpaired desirable / undesirable examples (METHODS.md §12)."""

from __future__ import annotations

import torch

from .types import LossOutput, UnpairedLogps, scalar


def kto_loss(
    logps: UnpairedLogps, *, beta: float, desirable_weight: float, undesirable_weight: float
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306), as in HALOs' KTOTrainer.loss.

        r  = logp - ref                                   (summed log-probs, per example)
        z0 = sg( max(0, mean_M(kl_policy - kl_ref)) )     (mismatched prompt/completion pairs)
        desirable:   l = desirable_weight   * (1 - sigma(beta * (r - z0)))
        undesirable: l = undesirable_weight * (1 - sigma(beta * (z0 - r)))

    `losses` has one entry per example in input order; their mean is the KTO objective (the
    mean over the concatenated desirable + undesirable list). KTO is sigmoid-valued and
    bounded: 1 - sigma(x), not -logsig(x). z0 is detached and clamped at 0; no gradient flows
    through the KL inputs. Scope: z0 averages the KL pairs passed in; pass globally gathered
    KL log-probs for HALOs' global estimate. The mismatched pairs need a per-device batch > 1.
    The paper's guidance is desirable_weight * n_D / (undesirable_weight * n_U) in [1, 4/3].
    chosen_rewards / rejected_rewards: beta * r of the desirable / undesirable examples (either
    may be empty). Metric `kl`: z0.
    """
    labels = logps.labels.to(torch.bool)
    rewards = logps.policy_logps - logps.ref_logps
    kl = (logps.kl_policy_logps - logps.kl_ref_logps).detach()
    z0 = kl.mean().clamp(min=0) if kl.numel() > 0 else kl.new_zeros(())

    # 1 - sigma(x) == sigma(-x), which keeps precision when sigma(x) is close to 1.
    desirable = desirable_weight * torch.sigmoid(-beta * (rewards - z0))
    undesirable = undesirable_weight * torch.sigmoid(-beta * (z0 - rewards))
    losses = torch.where(labels, desirable, undesirable)

    scaled = (beta * rewards).detach()
    return LossOutput(losses, scaled[labels], scaled[~labels], {"kl": scalar(z0)})
