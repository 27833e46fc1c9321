"""Group-baseline policy gradients: RLOO and GRPO (METHODS.md §17b), pure tensor maths.

k completions y_1..y_k of each prompt, scored r_1..r_k, are laid out prompt-major: rows
`[g*k, (g+1)*k)` of a `(B*k,)` tensor are the group of prompt g (the order `generate` returns).

- RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
  Learning from Human Feedback in LLMs", arXiv 2402.14740, Eq. 6): the baseline of sample i is
  the mean reward of the *other* k-1 samples of its prompt; the KL to the reference enters the
  reward, per sequence (`r_i = R_i - beta * sg(log pi(y_i) - log pi_ref(y_i))`).
- GRPO (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, Eq. 3 and §4.1.2): the advantage is
  the reward standardised within its group, the same for every token of y_i; a clipped
  token-level importance ratio; the k3 estimator of KL(pi || pi_ref) added per token.

Where the papers and TRL 1.16 differ (each a named option; defaults in docs/online.md):
- `scale_rewards`: divide by the group's std (GRPO paper, TRL `scale_rewards="group"`) or not
  (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783; TRL `scale_rewards="none"`). The std is the
  *sample* std (Bessel, k-1) as in TRL's `nanstd`, and `eps` = 1e-4 is TRL's.
- `aggregation` (how per-token losses become one number; TRL `loss_type`):
  `sequence` mean over each sequence's tokens, then over sequences (GRPO paper; TRL "grpo"),
  `token`    sum over all tokens / number of tokens of the step (DAPO; TRL "dapo"/"bnpo"),
  `constant` sum over all tokens / (number of sequences * max_new_tokens) (TRL "dr_grpo"),
  `sum`      sum over each sequence's tokens, then mean over sequences (RLOO's REINFORCE
             estimator on sequence log-probs).
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("sequence", "token", "constant", "sum")


def _groups(rewards: torch.Tensor, k: int) -> torch.Tensor:
    if rewards.dim() != 1 or k < 2 or rewards.numel() % k:
        raise ValueError(
            f"group advantages: rewards {tuple(rewards.shape)} must be (B*k,) with k={k} >= 2 "
            f"samples per prompt, prompt-major"
        )
    return rewards.view(-1, k)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out advantages `A_i = r_i - (1/(k-1)) sum_{j != i} r_j`, `(B*k,)`.

    Equal to `k/(k-1) * (r_i - mean_j r_j)`. METHODS.md §17b vector: k=4, r=[1,0,0,1] ->
    [2/3, -2/3, -2/3, 2/3]. `rewards` already carry the KL penalty when the method uses one.
    """
    g = _groups(rewards, k)
    baseline = (g.sum(1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


def grpo_advantages(
    rewards: torch.Tensor, k: int, scale_rewards: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Group-normalised advantages `A_i = (r_i - mean(r)) / (std(r) + eps)`, `(B*k,)`.

    `std` is the sample std of the group (k-1 in the denominator, TRL `nanstd`); with
    `scale_rewards=False` (Dr. GRPO) the division is skipped. METHODS.md §17b vector:
    r=[1,0,0,0], eps=0 -> mean 0.25, std 0.5, A = [1.5, -0.5, -0.5, -0.5]. A group whose
    rewards are all equal gets A = 0.
    """
    g = _groups(rewards, k)
    centred = (g - g.mean(1, keepdim=True)).reshape(-1)
    return scale_by_group_std(centred, rewards, k, eps) if scale_rewards else centred


def scale_by_group_std(
    advantages: torch.Tensor, rewards: torch.Tensor, k: int, eps: float = 1e-4
) -> torch.Tensor:
    """`advantages / (std(r) + eps)`, each by its group's sample std of `rewards` (k-1 in the
    denominator, TRL `nanstd`; eps TRL's): GRPO's scaling, and RLOO's with scale_rewards."""
    std = _groups(rewards, k).std(1, unbiased=True, keepdim=True) + eps
    return (_groups(advantages, k) / std).reshape(-1)


def all_equal_groups(rewards: torch.Tensor, k: int) -> int:
    """Groups whose k rewards are all equal: zero advantage, no policy-gradient signal."""
    g = _groups(rewards, k)
    return int((g == g[:, :1]).all(1).sum())


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) (Schulman 2020; GRPO Eq. 4):
    `exp(ref - logp) - (ref - logp) - 1`, >= 0, unbiased on samples of pi; differentiable in
    `logps`."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def group_token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
    beta: float = 0.0,
) -> torch.Tensor:
    """Per-token losses `(B, T)` of the clipped surrogate plus the k3 KL term, zero on padding::

        rho_t = exp(logp_t - old_t)
        l_t   = -min(rho_t * A, clip(rho_t, 1 - epsilon, 1 + epsilon) * A) + beta * k3_t

    Args:
        logps: `(B, T)` per-token log-probs of the sampled tokens under the policy, with grad.
        old_logps: `(B, T)` the same under the policy that sampled them (detached). With one
            optimizer step per generation batch pass `logps.detach()`: rho is 1 in value and
            carries the REINFORCE gradient `A * grad logp_t`, and the clip never binds.
        ref_logps: `(B, T)` reference log-probs, or None when `beta` is 0.
        advantages: `(B,)` one advantage per sequence (detached), broadcast over its tokens.
        mask: `(B, T)` 1 on completion tokens (the first EOS included).
        epsilon: the PPO clip range (GRPO paper 0.2). beta: the k3 KL weight (paper 0.04).
    """
    if not (logps.shape == old_logps.shape == mask.shape) or logps.dim() != 2:
        raise ValueError(
            f"group_token_losses: logps {tuple(logps.shape)}, old_logps "
            f"{tuple(old_logps.shape)} and mask {tuple(mask.shape)} must be the same (B, T)"
        )
    a = advantages.detach().to(logps.dtype)[:, None]
    rho = torch.exp(logps - old_logps.detach())
    surrogate = torch.minimum(rho * a, rho.clamp(1 - epsilon, 1 + epsilon) * a)
    losses = -surrogate
    if beta:
        if ref_logps is None:
            raise ValueError("group_token_losses: beta > 0 needs ref_logps")
        losses = losses + beta * k3_kl(logps, ref_logps.detach())
    return losses * mask.to(logps.dtype)


def sequence_values(token_losses: torch.Tensor, mask: torch.Tensor, aggregation: str):
    """`(B,)` per-sequence values whose sum, divided by `aggregation_denominator`, is the loss:
    the mean over the sequence's own tokens for `sequence`, their sum otherwise."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    summed = token_losses.sum(1)
    if aggregation == "sequence":
        return summed / mask.to(token_losses.dtype).sum(1).clamp(min=1)
    return summed


def aggregation_denominator(
    aggregation: str, num_sequences: int, num_tokens: int, max_new_tokens: int
) -> int:
    """What the summed `sequence_values` of a whole step (every micro-batch and process) are
    divided by, so that gradient accumulation does not change the update."""
    if aggregation == "token":
        return max(num_tokens, 1)
    if aggregation == "constant":
        return max(num_sequences * max_new_tokens, 1)
    return max(num_sequences, 1)


def group_loss(
    token_losses: torch.Tensor, mask: torch.Tensor, aggregation: str, max_new_tokens: int
) -> torch.Tensor:
    """The scalar loss of one whole batch: `sequence_values` summed over the denominator."""
    values = sequence_values(token_losses, mask, aggregation)
    n_tok = int(mask.sum())
    return values.sum() / aggregation_denominator(
        aggregation, token_losses.shape[0], n_tok, max_new_tokens
    )
