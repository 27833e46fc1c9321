"""Building blocks of the online methods: RSO sampling, ReMax returns, online-DPO labels.

Pure functions on tensors and lists; the online trainer loops call them (METHODS.md §4, §13, §14).
"""

from preftune.online.labels import PairLabels, label_online_pairs
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
    "label_online_pairs",
    "rank_into_pairs",
    "remax_loss",
    "remax_paper_loss",
    "remax_returns",
    "remax_sequence_losses",
]
