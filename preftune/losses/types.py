"""The data that goes into and comes out of every loss.

A loss sees per-sequence numbers only: log-probabilities *summed* over completion tokens, the
completion token counts, and (TDPO) the summed sequential KL. It never sees a model, a tokenizer
or a config. Losses that need per-token averages divide by the lengths themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class PreferenceLogps:
    """Sequence log-probabilities of a batch of B preference pairs; every tensor has shape (B,).

    policy_* carry gradient; ref_* are constants (computed under no_grad, or cached) and may be
    None for reference-free losses. Lengths are completion token counts (prompt and padding
    excluded). chosen_seq_kl / rejected_seq_kl are TDPO's sum over completion positions of
    KL(pi_ref(.|x, y_<t) || pi_theta(.|x, y_<t)); only TDPO reads them.
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor | None
    ref_rejected_logps: Tensor | None
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    chosen_seq_kl: Tensor | None = None
    rejected_seq_kl: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.policy_chosen_logps.shape[0]

    def select(self, index: Tensor) -> PreferenceLogps:
        """The pairs at `index` (a 1-D long tensor), every field indexed alike."""
        picked = {
            f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
            for f in fields(self)
        }
        return replace(self, **picked)


@dataclass(frozen=True)
class UnpairedLogps:
    """KTO inputs: N unpaired completions, each desirable or not, plus M mismatched KL pairs.

    policy_logps, ref_logps, labels: (N,), summed over completion tokens; labels is bool with
    True = desirable. kl_policy_logps, kl_ref_logps: (M,), the same sums for mismatched
    (prompt_i, completion_j) pairs, used only for the detached reference point z0.
    """

    policy_logps: Tensor
    ref_logps: Tensor
    labels: Tensor
    kl_policy_logps: Tensor
    kl_ref_logps: Tensor
    lengths: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.policy_logps.shape[0]


@dataclass
class LossOutput:
    """What a loss returns.

    losses: per-example values, NOT reduced; the trainer takes `losses.mean()` once. For batch
        objectives (Dr.DPO, filtered β-DPO) the entries are arranged so that `losses.mean()` is
        the batch objective with its exact gradient.
    chosen_rewards, rejected_rewards: detached implicit rewards for logging (KTO: the rewards of
        the desirable and of the undesirable examples, so their lengths may differ).
    metrics: loss-specific scalars (0-d detached tensors or floats), e.g. `nll`, `beta`.
    state: the updated state of a stateful loss (alpha_dpo, bco_pair); None otherwise.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Tensor] | None = None


# Small shared helpers. Kept here so every loss file reads the same way.


def logratios(logps: PreferenceLogps) -> tuple[Tensor, Tensor]:
    """(logp_w - ref_w, logp_l - ref_l): the per-response implicit rewards divided by beta."""
    return (
        logps.policy_chosen_logps - logps.ref_chosen_logps,
        logps.policy_rejected_logps - logps.ref_rejected_logps,
    )


def margin(logps: PreferenceLogps) -> Tensor:
    """h = (logp_w - ref_w) - (logp_l - ref_l), the DPO logit divided by beta (METHODS §0)."""
    chosen, rejected = logratios(logps)
    return chosen - rejected


def per_token(values: Tensor, lengths: Tensor) -> Tensor:
    """Sequence sums -> per-token averages; a zero length counts as 1, as in TRL."""
    return values / lengths.clamp(min=1).to(values.dtype)


def chosen_nll(logps: PreferenceLogps) -> Tensor:
    """Mean negative log-prob over the chosen completion tokens, -logp_w / len_w, shape (B,)."""
    return -per_token(logps.policy_chosen_logps, logps.chosen_lengths)


def dpo_rewards(logps: PreferenceLogps, beta: float) -> tuple[Tensor, Tensor]:
    """beta * (logp - ref) for chosen and rejected, detached (METHODS §0 rule 8)."""
    chosen, rejected = logratios(logps)
    return (beta * chosen).detach(), (beta * rejected).detach()


def scalar(value: Tensor) -> Tensor:
    """A metric: detached, 0-d. No .item() here, so logging never forces a device sync."""
    return value.detach().reshape(())


def batch_std(values: Tensor) -> Tensor:
    """Unbiased (N-1) standard deviation; 0 for fewer than two values instead of NaN."""
    if values.numel() < 2:
        return torch.zeros((), dtype=values.dtype, device=values.device)
    return values.std()
