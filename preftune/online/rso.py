"""RSO: statistical rejection sampling and first-round-rank pairing (METHODS.md §4).

Liu et al., "Statistical Rejection Sampling Improves Preference Optimization", ICLR 2024
(arXiv 2309.06657), Algorithm 1. There is no official code; the sampler follows the paper's
Python listing. Samples from pi_r(y|x) ∝ pi_sft(y|x) exp(r(x, y) / beta), with the candidates
drawn from pi_sft as the proposal and the bound M estimated from the candidate set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


def _as_floats(rewards: Sequence[float] | torch.Tensor) -> list[float]:
    values = rewards.tolist() if isinstance(rewards, torch.Tensor) else [float(r) for r in rewards]
    if isinstance(values, float) or any(isinstance(v, list) for v in values):
        raise ValueError("rewards must be one reward per candidate: a flat list or a (N,) tensor")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"rewards at candidate indices {bad} are not finite; fix the judge")
    return values


def acceptance_probabilities(rewards: Sequence[float] | torch.Tensor, beta: float) -> torch.Tensor:
    """One pass's acceptance probabilities exp((r - r_max) / beta), `(N,)` float64.

    `r_max` is the max over the rewards given (the not-yet-accepted candidates). beta == 0 is
    the best-of-N limit: probability 1 for the max reward(s), 0 for the rest.
    """
    r = torch.tensor(_as_floats(rewards), dtype=torch.float64)
    if beta < 0:
        raise ValueError(f"RSO sampling beta must be >= 0 (0 = best-of-N), got {beta}")
    if r.numel() == 0:
        return r
    if beta == 0:
        return (r == r.max()).to(torch.float64)
    return torch.exp((r - r.max()) / beta)


def conduct_rejection_sampling(
    rewards: Sequence[float] | torch.Tensor,
    num_samples: int,
    beta: float,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Indices of the accepted candidates, in acceptance order (Algorithm 1 of the RSO paper).

    Each pass recomputes `r_max` over the candidates not accepted yet and walks them in their
    original order, accepting candidate c when `u < exp((r_c - r_max) / beta)` with
    `u ~ U[0, 1)` drawn from `generator`; it stops as soon as `num_samples` are accepted.
    The best remaining candidate is always accepted, so every pass makes progress.

    Args:
        rewards: `(N,)` reward of each candidate (N = 64 in the paper).
        num_samples: how many to accept (8 in the paper); at most N.
        beta: KL coefficient of the target distribution (0.5 in the paper); it is not the loss
            temperature gamma. beta -> 0 gives best-of-N (top-k), beta -> inf accepts in order.
        generator: torch RNG for the uniforms; pass a seeded one for reproducible runs.
    """
    values = _as_floats(rewards)
    if num_samples < 0 or num_samples > len(values):
        raise ValueError(
            f"conduct_rejection_sampling: num_samples={num_samples} but there are only "
            f"{len(values)} candidates; sample more candidates per prompt or accept fewer"
        )
    remaining = list(range(len(values)))
    accepted: list[int] = []
    while len(accepted) < num_samples:
        probs = acceptance_probabilities([values[i] for i in remaining], beta)
        u = torch.rand(len(remaining), generator=generator, dtype=torch.float64)
        taken = []
        for pos, idx in enumerate(remaining):
            if u[pos] >= probs[pos]:
                continue
            accepted.append(idx)
            taken.append(idx)
            if len(accepted) == num_samples:
                break
        remaining = [i for i in remaining if i not in taken]
    return accepted


@dataclass
class RankedPairs(Generic[T]):
    """Pairs made by `rank_into_pairs`: `pairs[k] = (chosen, rejected)`."""

    pairs: list[tuple[T, T]]
    chosen_rewards: list[float]
    rejected_rewards: list[float]
    num_ties: int  # consecutive pairs with equal rewards (dropped unless keep_ties)
    num_unpaired: int  # 1 when an odd number of samples was given (the last is left out)


def rank_into_pairs(
    candidates: Sequence[T], rewards: Sequence[float] | torch.Tensor, keep_ties: bool = False
) -> RankedPairs[T]:
    """First-round-rank pairing (RSO paper §3, recipe step 3): samples (0,1), (2,3), ...

    Each consecutive pair is labelled by reward: the higher one is chosen. Equal rewards carry
    no preference, so a tied pair is dropped and counted; with `keep_ties=True` it is kept with
    the first sample chosen (the online-DPO convention, METHODS.md §13). The 8 accepted samples
    of the paper give 4 pairs.
    """
    values = _as_floats(rewards)
    if len(values) != len(candidates):
        raise ValueError(f"rank_into_pairs: {len(candidates)} candidates but {len(values)} rewards")
    out: RankedPairs[T] = RankedPairs([], [], [], 0, len(values) % 2)
    for i in range(0, len(values) - 1, 2):
        a, b = i, i + 1
        if values[a] == values[b]:
            out.num_ties += 1
            if not keep_ties:
                continue
        if values[b] > values[a]:
            a, b = b, a
        out.pairs.append((candidates[a], candidates[b]))
        out.chosen_rewards.append(values[a])
        out.rejected_rewards.append(values[b])
    return out
