"""Reward models: the Bradley–Terry loss and last-real-token pooling (METHODS.md §16)."""

from preftune.reward.loss import bradley_terry_loss, last_token_index, pool_last_token

__all__ = ["bradley_terry_loss", "last_token_index", "pool_last_token"]
