"""RSO's selection step on judged candidates (Liu et al., ICLR 2024; METHODS.md §4): per prompt,
keep `rso_num_samples` of the `rso_num_candidates` candidates with the statistical rejection
sampler (Algorithm 1) and pair the accepted ones first-round-rank. Pure functions; the online
loop (`preftune online method=rso`) and the data builder (`preftune data rso`,
preftune/data/build_rso.py) call them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from preftune.generation import Completion
from preftune.online.rso import conduct_rejection_sampling, rank_into_pairs


def apply_eos_penalty(
    scores: torch.Tensor, comps: list[Completion], penalty: float | None
) -> torch.Tensor:
    """Scores minus `penalty` for completions cut off before EOS (TRL `missing_eos_penalty`)."""
    if penalty is None:
        return scores
    has_eos = torch.tensor([c.has_eos for c in comps])
    return torch.where(has_eos, scores, scores - penalty)


@dataclass
class RSOSelection:
    """Pairs chosen from every prompt's candidates, with their (penalised) judge scores."""

    pairs: list[tuple[Completion, Completion]] = field(default_factory=list)
    chosen_scores: list[float] = field(default_factory=list)
    rejected_scores: list[float] = field(default_factory=list)
    num_ties: int = 0
    accepted: list[list[int]] = field(default_factory=list)  # per prompt, candidate indices


def select_rso_pairs(
    candidates: list[Completion],
    scores: torch.Tensor,
    num_candidates: int,
    num_samples: int,
    beta: float,
    generator: torch.Generator | None,
    keep_ties: bool = False,
) -> RSOSelection:
    """Rejection-sample `num_samples` of each prompt's `num_candidates` candidates (prompt-major,
    as `generate` returns them) and rank the accepted ones into pairs (RSO Algorithm 1 and
    first-round-rank). Tied pairs are dropped and counted unless `keep_ties`."""
    if len(candidates) % num_candidates:
        raise ValueError(f"{len(candidates)} candidates are not {num_candidates} per prompt")
    out = RSOSelection()
    values = scores.tolist()
    for s in range(0, len(candidates), num_candidates):
        group, rewards = candidates[s : s + num_candidates], values[s : s + num_candidates]
        accepted = conduct_rejection_sampling(rewards, num_samples, beta, generator=generator)
        ranked = rank_into_pairs(
            [group[j] for j in accepted], [rewards[j] for j in accepted], keep_ties=keep_ties
        )
        out.accepted.append(accepted)
        out.pairs += ranked.pairs
        out.chosen_scores += ranked.chosen_rewards
        out.rejected_scores += ranked.rejected_rewards
        out.num_ties += ranked.num_ties
    return out


def as_record(prompt, chosen: str, rejected: str, sc: float, sr: float) -> dict:
    if isinstance(prompt, str):
        c, r = chosen, rejected
    else:
        c = [{"role": "assistant", "content": chosen}]
        r = [{"role": "assistant", "content": rejected}]
    return {"prompt": prompt, "chosen": c, "rejected": r, "chosen_score": sc, "rejected_score": sr}
