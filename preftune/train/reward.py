"""`preftune reward`: train a Bradley–Terry reward model on preference pairs (METHODS.md §16).

    L = -logsig(r(x, y_w) - r(x, y_l) - m) + c * (r_w + r_l)^2

r is a one-output `AutoModelForSequenceClassification` built from the same base models as
`preftune train` (including 'default'), read at the last real token; m is the record's optional
`margin` (Llama 2), c is `center_rewards_coefficient` (Eisenstein et al.). Reference code: TRL
`RewardTrainer.compute_loss`, OpenRLHF `PairWiseLoss`.

The trainer is the offline `Trainer` with another model and another `_loss`: same data formats,
batching, accumulation, accelerate, checkpoints and run directory (config.yaml, metrics.jsonl,
summary.json, final/ loadable by `AutoModelForSequenceClassification`). `eval/rewards/accuracies`
(also `eval/accuracy`) is the held-out pairwise accuracy: the fraction of pairs with r_w > r_l.
"""

from __future__ import annotations

import torch

from preftune.config import Config
from preftune.losses import LossOutput
from preftune.models import load_tokenizer, progress_bars, resolve_model_path
from preftune.reward.loss import bradley_terry_loss
from preftune.reward.model import load_reward_model, pad_right, sequence_rewards
from preftune.train.base import BaseTrainer
from preftune.train.setup import Datasets, load_datasets, prepare_model


def _load_model(cfg: Config):
    m = cfg.model
    tokenizer = load_tokenizer(m.model, trust_remote_code=m.trust_remote_code)
    with progress_bars(not cfg.train.quiet):
        model = load_reward_model(
            m.model, tokenizer.pad_token_id, getattr(torch, m.dtype), m.trust_remote_code
        )
    # peft's SEQ_CLS task keeps the new score head fully trainable under LoRA
    model = prepare_model(cfg, model, "SEQ_CLS")
    return model, tokenizer, resolve_model_path(m.model, m.trust_remote_code)


class RewardTrainer(BaseTrainer):
    """Bradley–Terry reward-model training; every step, eval and checkpoint is `BaseTrainer`'s."""

    method = "reward"
    reference_mode = "none"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.log_line("reward model: one score read at the last real token (no reference)")

    def load_model(self) -> tuple:
        return _load_model(self.cfg)

    def load_data(self, tokenizer) -> Datasets:
        return load_datasets(self.cfg, tokenizer, unpaired=False)

    def _loss(self, examples, idx, reference, train: bool, context=None):
        """Per-pair Bradley–Terry losses of examples[idx]: one forward over [chosen; rejected]."""
        exs = [examples[i] for i in idx]
        rows = [e["prompt_ids"] + e["chosen_ids"] for e in exs]
        rows += [e["prompt_ids"] + e["rejected_ids"] for e in exs]
        ids, mask = pad_right(rows, self.tokenizer.pad_token_id)
        with self.acc.autocast():
            rewards = self.run_policy(
                sequence_rewards, ids.to(self.acc.device), mask.to(self.acc.device)
            )
        n = len(exs)
        chosen, rejected = rewards[:n], rewards[n:]
        margin = None
        if self.cfg.reward.use_margin and all("margin" in e for e in exs):
            margin = torch.tensor([e["margin"] for e in exs], dtype=chosen.dtype).to(chosen.device)
        losses = bradley_terry_loss(
            chosen, rejected, margin, self.cfg.reward.center_rewards_coefficient
        )
        accuracy = (chosen > rejected).float().detach()
        out = LossOutput(losses, chosen.detach(), rejected.detach(), {"accuracy": accuracy})
        return out, None, int(mask.sum())

    def task_accuracy(self, tag: str):
        return None, []  # a reward model does not generate
