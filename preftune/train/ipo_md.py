"""IPO-MD: online IPO on pairs drawn from the geometric mixture of the policy and the reference.

Calandriello et al. 2024, "Human Alignment of Large Language Models through Online Preference
Optimisation" (arXiv 2403.08635; METHODS.md §17): per prompt two completions of

    pi_mix ∝ pi_theta^(1 - b) * pi_ref^b,    b = `mixture_beta`,

built token by token with both models' KV caches (preftune/generation_mixture.py), judged and
labelled as online DPO labels them, and trained with the IPO loss `(h - 1/(2 tau))^2`
(`loss=ipo`, `beta` = tau). The paper shows this is a self-play route to the Nash equilibrium
of the preference game (Nash-MD's mixture with IPO's loss); b = 0 is online IPO
(`method=online_dpo loss=ipo`) and samples exactly what it samples under the same seed.
"""

from __future__ import annotations

import contextlib

from preftune.generation import Completion, SamplingConfig
from preftune.generation_mixture import generate_mixture
from preftune.train.online_dpo import OnlineDPOTrainer


class IPOMDTrainer(OnlineDPOTrainer):
    """Online DPO's step (labels, missing-EOS penalty, ties, the registry's IPO loss) on pairs
    sampled from the mixture instead of the policy."""

    method = "ipo_md"

    def needs_reference(self) -> bool:
        return True  # the sampler draws from it

    def _generate(
        self, prompts: list[dict], cfg: SamplingConfig, from_reference: bool = False
    ) -> list[Completion]:
        if from_reference:
            return super()._generate(prompts, cfg, from_reference=True)
        if self.reference.mode == "lora":  # the reference is the policy with its adapter off
            ref, ctx = None, self.policy.disable_adapter
        else:
            ref, ctx = self.reference.model, contextlib.nullcontext
        with self.sharding.gathered(), self.acc.autocast():  # as OnlineTrainer._generate
            return generate_mixture(
                self.policy,
                ref,
                self.tokenizer,
                [p["text"] for p in prompts],
                cfg,
                self.cfg.online.mixture_beta,
                batch_size=self.cfg.online.generation_batch_size,
                reference_context=ctx,
            )
