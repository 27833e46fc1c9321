"""ReMax: REINFORCE with the greedy decode as baseline (METHODS.md §14).

Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for
Aligning Large Language Models" (arXiv 2310.10505). Reference code: `liziniu/ReMax`
`step3_rlhf_finetuning/remax_trainer.py` (`compute_returns`, `compute_loss`,
`actor_loss_fn`). Tensors are `(B, T)` over response positions; `mask` is 1 on response
tokens (including the first EOS) and 0 on prompt and padding.
"""

from __future__ import annotations

import torch


def remax_returns(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    reward: torch.Tensor,
    baseline_reward: torch.Tensor,
    kl_ctl: float = 0.1,
    gamma: float = 0.95,
    clip_reward_value: float = 5.0,
) -> torch.Tensor:
    """Per-token returns of the reference code, `(B, T)`, detached (METHODS.md §14 "Exact code")::

        A      = clip(r(y) - r(y_greedy), -clip_reward_value, clip_reward_value)  # clip AFTER
        kl_t   = -kl_ctl * (logp_t - ref_t)           # immediate per-token KL, not summed
        ret_t  = kl_t + gamma^(T - t + 1) * A         # t = 1..T; the last token gets gamma^1

    Args:
        logps, ref_logps: `(B, T)` per-token log-probs of the sampled response under the
            policy and the reference (the policy's are detached here).
        mask: `(B, T)` 1 on response tokens. Discounting counts real tokens from the end of
            each row, so padding on either side does not shift the powers of gamma.
        reward, baseline_reward: `(B,)` reward of the sample and of the greedy decode of the
            same current policy, scored by the same judge.
        kl_ctl, gamma, clip_reward_value: defaults from `liziniu/ReMax` main.py /
            remax_trainer.py (the Llama-2 script uses kl_ctl 0.05, gamma 0.99).
    """
    if not (logps.shape == ref_logps.shape == mask.shape) or logps.dim() != 2:
        raise ValueError(
            f"remax_returns: logps {tuple(logps.shape)}, ref_logps {tuple(ref_logps.shape)} "
            f"and mask {tuple(mask.shape)} must all be the same (B, T)"
        )
    if reward.shape != (logps.shape[0],) or baseline_reward.shape != reward.shape:
        raise ValueError(
            f"remax_returns: reward {tuple(reward.shape)} and baseline_reward "
            f"{tuple(baseline_reward.shape)} must be (B,) with B={logps.shape[0]}"
        )
    with torch.no_grad():
        m = mask.to(logps.dtype)
        advantage = (reward - baseline_reward).to(logps.dtype)
        advantage = advantage.clamp(-clip_reward_value, clip_reward_value)
        kl = -kl_ctl * (logps - ref_logps)
        steps_to_end = m.flip(1).cumsum(1).flip(1)  # 1 at the last real token, 2 before it, ...
        discount = torch.pow(torch.as_tensor(gamma, dtype=logps.dtype), steps_to_end)
        return (kl + discount * advantage[:, None]) * m


def remax_sequence_losses(
    logps: torch.Tensor, mask: torch.Tensor, returns: torch.Tensor
) -> torch.Tensor:
    """`(B,)` summed surrogate `-sum_t ret_t * logp_t * mask_t`, not yet normalised.

    The trainer divides the sum of these by the number of response tokens of the whole batch
    it steps on (summed over micro-batches under accumulation) to get `remax_loss`.
    """
    return -(returns.detach() * logps * mask.to(logps.dtype)).sum(dim=1)


def remax_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    reward: torch.Tensor,
    baseline_reward: torch.Tensor,
    kl_ctl: float = 0.1,
    gamma: float = 0.95,
    clip_reward_value: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference `actor_loss_fn`: `L = -sum(ret * logp * mask) / sum(mask)`, token-mean over
    the whole batch (not per sequence). Returns `(loss scalar, returns (B, T))`.

    Arguments as in `remax_returns`; gradients flow through `logps` only (baseline, rewards
    and the KL term are detached, METHODS.md §18 item 6).
    """
    returns = remax_returns(
        logps, ref_logps, mask, reward, baseline_reward, kl_ctl, gamma, clip_reward_value
    )
    n_tokens = mask.to(logps.dtype).sum().clamp(min=1.0)
    return remax_sequence_losses(logps, mask, returns).sum() / n_tokens, returns


def remax_paper_loss(
    policy_logps: torch.Tensor, reward: torch.Tensor, baseline_reward: torch.Tensor
) -> torch.Tensor:
    """Paper estimator (ReMax Algorithm 1): `-(r(y) - r(y_greedy)) * log pi(y|x)`, `(B,)`.

    `policy_logps` are summed over response tokens; no KL, no discount, no clipping. The
    advantage is detached, so the gradient is `-(r - r_greedy) * grad log pi(y|x)`.
    """
    advantage = (reward - baseline_reward).detach().to(policy_logps.dtype)
    return -advantage * policy_logps
