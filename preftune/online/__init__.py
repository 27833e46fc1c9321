"""Building blocks of the online methods: RSO sampling, ReMax returns, online-DPO labels,
RLOO/GRPO advantages and losses, the IPO-MD mixture.

Pure functions on tensors and lists; the online trainer loops call them (METHODS.md §4, §13,
§14, §17, §17b).
"""

from preftune.online.group import (
    group_loss,
    group_token_losses,
    grpo_advantages,
    k3_kl,
    rloo_advantages,
)
from preftune.online.labels import PairLabels, label_online_pairs
from preftune.online.mixture import filter_logprobs, mixture_logprobs
from preftune.online.remax import (
    remax_loss,
    remax_paper_loss,
    remax_returns,
    remax_sequence_losses,
)
from preftune.online.rso import (
    RankedPairs,
    acceptance_probabilities,
    conduct_rejection_sampling,
    rank_into_pairs,
)

__all__ = [
    "PairLabels",
    "RankedPairs",
    "acceptance_probabilities",
    "conduct_rejection_sampling",
    "filter_logprobs",
    "group_loss",
    "group_token_losses",
    "grpo_advantages",
    "k3_kl",
    "label_online_pairs",
    "mixture_logprobs",
    "rank_into_pairs",
    "remax_loss",
    "remax_paper_loss",
    "remax_returns",
    "remax_sequence_losses",
    "rloo_advantages",
]
