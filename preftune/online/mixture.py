"""The geometric mixture of policy and reference, token by token (IPO-MD; METHODS.md §17).

Calandriello et al. 2024, "Human Alignment of Large Language Models through Online Preference
Optimisation" (arXiv 2403.08635): IPO-MD learns from pairs drawn from

    pi_mix(y_t | x, y_<t)  ∝  pi_theta(y_t | x, y_<t)^(1 - b) * pi_ref(y_t | x, y_<t)^b

with b = `mixture_beta` (b = 0: the policy itself, i.e. online IPO; b = 1: the reference), the
sampling distribution of Nash-MD's mirror-descent step (Munos et al. 2023). As in TRL's Nash-MD
(`trl/trainer/nash_md_trainer.py` in TRL 0.x; TRL 1.16 no longer ships it), the mixture is built per token, each step renormalised; the
sequence-level mixture of the paper would need a normaliser over all sequences.

Order of operations (documented in docs/online.md): the mixture is taken of the two models'
untempered next-token distributions, then temperature, top-k and top-p filter the *mixture*,
and the result is renormalised. At temperature 1 with no filters the sampler draws exactly
from the normalised geometric mixture (tested against the closed form).
"""

from __future__ import annotations

import torch


def mixture_logprobs(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, mixture_beta: float
) -> torch.Tensor:
    """`log pi_mix` over the vocabulary, `(..., V)`, normalised in fp32 (or the inputs' fp64).

    `(1-b) log_softmax(z_theta) + b log_softmax(z_ref)`, renormalised with a log_softmax: the
    per-token normalisers of the two models cancel in the renormalisation, so this equals
    `log_softmax((1-b) z_theta + b z_ref)` (TRL's form), written through the log-probs so each
    model's normalisation is visible.
    """
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"mixture_logprobs: policy logits {tuple(policy_logits.shape)} and reference "
            f"logits {tuple(ref_logits.shape)} differ (the two models need one vocabulary)"
        )
    if not 0 <= mixture_beta <= 1:
        raise ValueError(f"mixture_beta must be in [0, 1], got {mixture_beta}")
    dtype = torch.float64 if policy_logits.dtype == torch.float64 else torch.float32
    lp = torch.log_softmax(policy_logits.to(dtype), -1)
    lr = torch.log_softmax(ref_logits.to(dtype), -1)
    return torch.log_softmax((1 - mixture_beta) * lp + mixture_beta * lr, -1)


def filter_logprobs(
    logprobs: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on normalised log-probs `(..., V)`,
    renormalised; filtered tokens get -inf. `top_k=0` and `top_p=1` are off. Top-p keeps the
    smallest set of most likely tokens whose mass reaches `top_p` (at least one token)."""
    out = torch.log_softmax(logprobs / temperature, -1)
    if top_k and top_k < out.shape[-1]:
        kth = out.topk(top_k, -1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1:
        sorted_lp, order = out.sort(-1, descending=True)
        before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()  # mass of the more likely tokens
        drop_sorted = before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return torch.log_softmax(out, -1)
