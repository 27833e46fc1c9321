"""Bradley–Terry reward-model loss and last-real-token pooling (METHODS.md §16).

Reference code: TRL `trl/trainer/reward_trainer.py::RewardTrainer.compute_loss`, OpenRLHF
`openrlhf/models/loss.py::PairWiseLoss`, HALOs `BradleyTerryTrainer.loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coef: float | None = None,
) -> torch.Tensor:
    """Per-pair Bradley–Terry loss, METHODS.md §16 (a)::

        L_i = -logsig(r_w,i - r_l,i - m_i) + c * (r_w,i + r_l,i)^2

    Args:
        chosen_rewards, rejected_rewards: `(B,)` scalar rewards r_theta(x, y_w), r_theta(x, y_l),
            read at the last real token (see `pool_last_token`).
        margin: optional `(B,)` tensor or float m (Llama 2's margin; Llama 3 dropped it).
        center_coef: optional c (Eisenstein et al. centering; TRL `center_rewards_coefficient`,
            0.01 recommended). TRL adds `c * mean_B((r_w + r_l)^2)` to the batch mean; adding
            `c * (r_w + r_l)^2` per pair gives the same value once the trainer takes the mean.

    Returns:
        `(B,)` losses; the trainer reduces. `-logsigmoid` is the stable form of log(1 + e^-x).
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"bradley_terry_loss: chosen_rewards {tuple(chosen_rewards.shape)} and "
            f"rejected_rewards {tuple(rejected_rewards.shape)} must have the same (B,) shape"
        )
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    losses = -F.logsigmoid(logits)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return losses


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask == 1) position of each row, `(B, T) -> (B,)` long.

    Works for right padding, left padding and `pad_token == eos_token` alike because it reads
    only the attention mask, never token ids (the pitfall in METHODS.md §16 (d): HF's
    sequence-classification head pools at the last token that is not `pad_token_id`, which
    skips a trailing EOS when pad == eos).
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    empty = ~real.any(dim=1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {rows} have no real tokens; nothing to pool")
    positions = torch.arange(real.shape[1], device=real.device).expand_as(real)
    # Padding positions become -1, so the max is the last real position in any padding layout.
    return torch.where(real, positions, -1).max(dim=1).values


def pool_last_token(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Read per-token scores at the last real token: `(B, T)` -> `(B,)`, `(B, T, K)` -> `(B, K)`."""
    if scores.shape[:2] != attention_mask.shape:
        raise ValueError(
            f"pool_last_token: scores {tuple(scores.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} disagree on (B, T)"
        )
    idx = last_token_index(attention_mask)
    return scores[torch.arange(scores.shape[0], device=scores.device), idx]
