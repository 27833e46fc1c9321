"""Online DPO labelling: two samples per prompt -> (chosen, rejected) (METHODS.md §13).

Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback" (OAIF). Reference
code: TRL `trl/experimental/online_dpo/online_dpo_trainer.py::OnlineDPOTrainer.training_step`
(`missing_eos_penalty`, `mask = first_half >= second_half`, `chosen_indices`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PairLabels:
    """Result of `label_online_pairs`, all `(B,)` tensors.

    `chosen_index` / `rejected_index` index the concatenation `[first; second]` of length 2B
    (TRL's layout): `i` for the first sample of prompt i, `B + i` for the second.
    """

    first_is_chosen: torch.Tensor  # bool
    chosen_index: torch.Tensor  # long, into [first; second]
    rejected_index: torch.Tensor  # long
    keep: torch.Tensor  # bool; False for ties when skip_ties, else all True
    chosen_scores: torch.Tensor  # after the missing-EOS penalty
    rejected_scores: torch.Tensor
    num_ties: int


def label_online_pairs(
    first_scores: torch.Tensor,
    second_scores: torch.Tensor,
    first_has_eos: torch.Tensor | None = None,
    second_has_eos: torch.Tensor | None = None,
    missing_eos_penalty: float | None = None,
    skip_ties: bool = False,
) -> PairLabels:
    """Label each prompt's two completions by score (METHODS.md §13 (a), steps 3-4).

    Args:
        first_scores, second_scores: `(B,)` judge scores of the two samples of each prompt.
        first_has_eos, second_has_eos: `(B,)` bool, whether each sample ended with EOS
            (`Completion.has_eos`); required when `missing_eos_penalty` is set.
        missing_eos_penalty: subtracted from the score of every sample without EOS (TRL
            `missing_eos_penalty`, default None = off) before comparing.
        skip_ties: equal scores carry no preference; mark those prompts `keep=False` (they
            are still labelled, first sample chosen, so the indices stay usable).

    The chosen sample is the first when `first >= second`: ties go to the first sample.
    """
    if first_scores.dim() != 1 or first_scores.shape != second_scores.shape:
        raise ValueError(
            f"label_online_pairs: first_scores {tuple(first_scores.shape)} and second_scores "
            f"{tuple(second_scores.shape)} must both be (B,)"
        )
    first, second = first_scores.detach().clone(), second_scores.detach().clone()
    if missing_eos_penalty is not None:
        if first_has_eos is None or second_has_eos is None:
            raise ValueError("missing_eos_penalty needs first_has_eos and second_has_eos flags")
        first[~first_has_eos.bool()] -= missing_eos_penalty
        second[~second_has_eos.bool()] -= missing_eos_penalty
    first_is_chosen = first >= second
    ties = first == second
    batch = torch.arange(first.shape[0], device=first.device)
    offset = first.shape[0]
    return PairLabels(
        first_is_chosen=first_is_chosen,
        chosen_index=batch + (~first_is_chosen).long() * offset,
        rejected_index=batch + first_is_chosen.long() * offset,
        keep=~ties if skip_ties else torch.ones_like(ties),
        chosen_scores=torch.where(first_is_chosen, first, second),
        rejected_scores=torch.where(first_is_chosen, second, first),
        num_ties=int(ties.sum()),
    )
