"""RLOO and GRPO: policy gradients with the other samples of the same prompt as baseline.

ReMax's relatives on ReMax's step engine (METHODS.md §17b; the maths in
preftune/online/group.py): per prompt `num_generations` = k samples of the current policy
(one prefill per prompt, `generation.generate`), scored by the judge, then one optimizer step.

- `rloo` (Ahmadian et al. 2024): r_i = R_i - kl_coef * sg(sum_t logp_t - ref_t); leave-one-out
  advantage; loss -A_i * sum_t logp_t, mean over sequences (`loss_aggregation=sum`).
- `grpo` (Shao et al. 2024): group mean/std advantage (`scale_rewards`), clipped token ratio
  (`clip_epsilon`), k3 KL per token (`kl_coef`), mean over each sequence's tokens then over
  sequences (`loss_aggregation=sequence`).

Micro-batches hold whole groups (the prompts are split, then expanded to their k samples), so
each micro-batch computes its own advantages, RLOO's KL-in-reward included, without a second
pass; the summed per-sequence values are divided by the whole step's denominator (sequences,
tokens, or sequences * max_new_tokens), so `grad_accum` does not change the update. By default
one optimizer step per generation batch: the ratio is 1 in value (`old = sg(logp)`) and the clip
never binds; GRPO's `num_iterations` (mu) takes mu updates on one batch, clipping against the
log-probs of the first (`_group_step`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from preftune.online.base import split_even
from preftune.online.group import (
    aggregation_denominator,
    all_equal_groups,
    group_token_losses,
    grpo_advantages,
    rloo_advantages,
    scale_by_group_std,
    sequence_values,
)
from preftune.online.rso_data import apply_eos_penalty
from preftune.train.remax import ReMaxTrainer

# what the papers do where `scale_rewards` / `loss_aggregation` are left null
METHOD_DEFAULTS = {
    "grpo": {"scale_rewards": True, "loss_aggregation": "sequence"},
    "rloo": {"scale_rewards": False, "loss_aggregation": "sum"},
}


def group_settings(method: str, scale_rewards: bool | None, aggregation: str | None):
    """`(scale_rewards, loss_aggregation)` with the method's paper filling what is null."""
    d = METHOD_DEFAULTS[method]
    return (
        d["scale_rewards"] if scale_rewards is None else scale_rewards,
        d["loss_aggregation"] if aggregation is None else aggregation,
    )


class GroupTrainer(ReMaxTrainer):
    """RLOO (`method=rloo`) or GRPO (`method=grpo`); `self.method` is set from the config."""

    method = "grpo"

    def __init__(self, cfg):
        self.method = cfg.online.method
        super().__init__(cfg)
        o = cfg.online
        self.scale_rewards, self.aggregation = group_settings(
            self.method, o.scale_rewards, o.loss_aggregation
        )
        self.log_line(
            f"{self.method}: {o.num_generations} samples per prompt, kl_coef {o.kl_coef}, "
            f"scale_rewards {self.scale_rewards}, loss_aggregation {self.aggregation}"
        )

    def needs_reference(self) -> bool:
        return self.cfg.online.kl_coef > 0

    def train_step(self, batch_idx: list[int]) -> dict:
        start = time.perf_counter()
        o, k = self.cfg.online, self.cfg.online.num_generations
        prompts = self._my_prompts(batch_idx)
        samples = self._generate(
            prompts, dataclasses.replace(self.sampling, num_return_sequences=k)
        )
        raw = self._score(prompts, samples)
        reward = apply_eos_penalty(raw, samples, o.missing_eos_penalty)
        gen_time = time.perf_counter() - start
        metrics = self._group_step(samples, reward, len(prompts))
        metrics.update(self._generation_metrics(samples, raw))
        equal = all_equal_groups(reward, k) if len(prompts) else 0
        metrics["groups/all_equal"] = sum(self._gather_list([equal]))
        metrics["pairs/ties"] = metrics["groups/all_equal"]
        metrics["generation_time"] = gen_time
        metrics["step_time"] = time.perf_counter() - start
        rows = [
            self._sample_row(prompts[i], samples[i * k + j], raw[i * k + j], f"sample{j}")
            for i in range(min(o.log_samples, len(prompts)))
            for j in range(k)
        ]
        self._log_samples(rows)
        return metrics

    def _advantages(self, reward, logps, ref_logps, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """`(advantages, sequence KL sum_t logp_t - ref_t)` of whole groups, detached. RLOO puts
        the KL into the reward; with `scale_rewards` its advantages are divided by the group's
        std (+1e-4) of that reward, as GRPO's are."""
        k, o = self.cfg.online.num_generations, self.cfg.online
        kl = ((logps.detach() - ref_logps) * mask).sum(1)
        if self.method == "grpo":
            return grpo_advantages(reward, k, self.scale_rewards), kl
        r = reward - o.kl_coef * kl
        a = rloo_advantages(r, k)
        return (scale_by_group_std(a, r, k) if self.scale_rewards else a), kl

    def _group_step(self, samples, reward: torch.Tensor, n_prompts: int) -> dict:
        """`num_iterations` (mu) optimizer updates on one generation batch. The first computes
        the advantages and keeps the policy's log-probs as the old ones (`old = sg(logp)`:
        ratio 1) and the reference's; the later ones run the policy again and clip
        `exp(logp - old)`. The schedule advances once per generation batch: the mu updates
        of a step share its learning rate. Metrics are the last update's; `clip_fraction` the
        share of its tokens where the clip binds (0 with mu = 1)."""
        t, o, k = self.cfg.train, self.cfg.online, self.cfg.online.num_generations
        n_seq = sum(self._gather_list([len(samples)]))
        n_tok = sum(self._gather_list([sum(len(s.token_ids) for s in samples)]))
        denominator = aggregation_denominator(self.aggregation, n_seq, n_tok, o.max_new_tokens)
        beta_in_loss = o.kl_coef if self.method == "grpo" else 0.0
        kept: dict[int, tuple] = {}  # micro-batch -> (old logps, ref logps, advantages, kl)
        groups = split_even(list(range(n_prompts)), t.grad_accum)  # whole groups per micro-batch
        micro = [[g * k + j for g in gs for j in range(k)] for gs in groups]
        ref_toks = self._reference_tokens(samples, micro, k)

        def micro_loss(idx):
            chosen = [samples[i] for i in idx]
            first = idx[0] not in kept
            ref_tok = ref_toks.get(idx[0]) if first else None
            logps, ref_logps, mask = self._sample_token_logps(chosen, k, ref_tok)
            if first:
                adv, kl = self._advantages(reward[idx].to(logps), logps, ref_logps, mask)
                kept[idx[0]] = (logps.detach(), ref_logps, adv, kl)
            old, ref_logps, adv, kl = kept[idx[0]]
            losses = group_token_losses(
                logps, old, ref_logps, adv, mask, o.clip_epsilon, beta_in_loss
            )
            v = sequence_values(losses, mask, self.aggregation)
            out["values"].append(v.detach())
            out["kls"].append(kl)
            out["advs"].append(adv)
            ratio = (logps.detach() - old).exp()
            out["clipped"].append(((ratio - 1).abs() > o.clip_epsilon)[mask.bool()].double())
            return v.sum(), sum(len(s.prompt_token_ids) + len(s.token_ids) for s in chosen)

        for it in range(o.num_iterations):
            out: dict[str, list] = {"values": [], "kls": [], "advs": [], "clipped": []}
            with self._schedule_held(it < o.num_iterations - 1):
                metrics = self.stepper.run(
                    self.step + 1, micro, micro_loss, denominator, self._idle_loss
                )
        local = torch.cat(out["values"]).sum().item() if out["values"] else 0.0
        metrics["loss"] = sum(self._gather_list([local])) / denominator
        metrics["kl"] = self._gmean(torch.cat(out["kls"])) if out["kls"] else float("nan")
        advs = out["advs"]
        metrics["reward/advantage_abs"] = self._gmean(torch.cat(advs).abs()) if advs else 0.0
        if o.num_iterations > 1:
            metrics["clip_fraction"] = self._gmean(torch.cat(out["clipped"]) if advs else [])
        return metrics

    @contextlib.contextmanager
    def _schedule_held(self, hold: bool):
        """The step engine's scheduler, not advanced while `hold` (the first mu - 1 updates)."""
        real = self.stepper.scheduler
        if hold:
            self.stepper.scheduler = _HeldSchedule(real)
        try:
            yield
        finally:
            self.stepper.scheduler = real


class _HeldSchedule:
    """A scheduler's learning rate, with `step()` doing nothing."""

    def __init__(self, real):
        self.real = real

    def get_last_lr(self):
        return self.real.get_last_lr()

    def step(self) -> None:
        pass
