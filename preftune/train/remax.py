"""The ReMax trainer: REINFORCE with the greedy decode of the current policy as baseline.

Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for
Aligning Large Language Models" (arXiv 2310.10505), METHODS.md §14, following the reference
code `liziniu/ReMax` step3_rlhf_finetuning/remax_trainer.py (`generate_experience`,
`compute_returns`, `actor_loss_fn`):

    A      = clip(r(y) - r(y_greedy), -c, c)                    # y ~ pi, y_greedy = greedy of pi
    ret_t  = -kl_ctl * (logp_t - ref_t) + gamma^(T - t + 1) * A  # per-token KL, discounted reward
    L      = -sum_t ret_t * logp_t * mask_t / sum_t mask_t       # token mean over the whole batch

The returns come from `preftune.online.remax`; the one log-prob engine (`token_logps`) gives the
per-token log-probs of policy and reference. Under gradient accumulation every micro-batch's
summed surrogate is divided by the response tokens of the whole step, so the step's gradient is
the reference code's batch token-mean whatever `grad_accum` is. Not reproduced: the reference
code's replacement of answers of one token or fewer by a space token.
"""

from __future__ import annotations

import time

import torch

from preftune.layouts import (
    TokenBatch,
    build_shared_prompt_batch,
    build_token_batch,
    shared_prefix_length,
)
from preftune.logprob.plan import group_sharing_pays
from preftune.logps import token_logps
from preftune.online.base import split_even
from preftune.online.remax import remax_returns, remax_sequence_losses
from preftune.online.rso_data import apply_eos_penalty
from preftune.train.online_dpo import OnlineTrainer


def per_token_rows(values: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat `(N,)` per-token values of a TokenBatch -> `(S, T)` rows and their 0/1 mask.

    Every layout lists each sequence's scored tokens contiguously and in order (padded and
    packed in sequence order, the shared-prompt layout group by group), so token j of sequence
    s sits at column j - start(s), start(s) being its first index. Differentiable in `values`.
    """
    seq = batch.seq_index
    lengths = torch.bincount(seq, minlength=batch.num_seqs)
    idx = torch.arange(seq.numel(), device=seq.device)
    starts = torch.full_like(lengths, seq.numel()).scatter_reduce(0, seq, idx, "amin")
    col = idx - starts[seq]
    if bool((col >= lengths[seq]).any()):  # spread further than its count: not contiguous
        raise ValueError("per_token_rows: a sequence's tokens are not contiguous in the batch")
    width = int(lengths.max()) if seq.numel() else 0
    rows = values.new_zeros(batch.num_seqs, width).index_put((seq, col), values)
    mask = values.new_zeros(batch.num_seqs, width).index_put((seq, col), torch.ones_like(values))
    return rows, mask.detach()


def sample_batch(chosen, k: int, pad_id: int, lay) -> tuple[TokenBatch, torch.Tensor | None]:
    """Completions (prompt-major, `k` per prompt) laid out for the log-prob engine, and `perm`
    such that `rows[perm]` (rows of `per_token_rows`) is prompt-major again (None: it is).
    With k > 1 and `lay.share_prompt` (true, or "auto" where it costs less) each prompt is laid
    out once with its k samples branching from it (`build_shared_prompt_batch`), as offline
    pairs are; the log-probs are those of the separate layout (tested)."""
    prompts = [list(s.prompt_token_ids) for s in chosen]
    comps = [list(s.token_ids) for s in chosen]
    n = len(chosen) // k
    share = (
        k > 1
        and lay.share_prompt
        and all(prompts[g * k + j] == prompts[g * k] for g in range(n) for j in range(k))
    )
    if share:
        heads, groups = prompts[::k], [comps[g * k : (g + 1) * k] for g in range(n)]
        prefix = shared_prefix_length(heads) if lay.share_prefix else 0
        share = lay.share_prompt is True or group_sharing_pays(
            heads, groups, lay.packed, lay.hidden_size, prefix, lay.share_completion_prefix
        )
    if not share:
        batch = build_token_batch(
            prompts, comps, pad_id, packed=lay.packed, share_prefix=lay.share_prefix
        )
        return batch, None
    batch = build_shared_prompt_batch(
        heads, groups, pad_id, lay.packed, lay.share_prefix, lay.share_completion_prefix
    )
    # sequence j * n + g of the shared layout is sample g * k + j
    return batch, torch.arange(n * k).view(k, n).t().reshape(-1)


class ReMaxTrainer(OnlineTrainer):
    """ReMax (METHODS.md §14): one sample and one greedy decode per prompt, both from the current
    policy and scored by the same judge; the policy-gradient step of the reference code."""

    method = "remax"
    pairwise = False

    def needs_reference(self) -> bool:
        return self.cfg.online.remax_kl_ctl > 0

    def wants_reference(self) -> bool:
        return True  # even at kl_ctl = 0, for the `kl` metric

    def train_step(self, batch_idx: list[int]) -> dict:
        start = time.perf_counter()
        o = self.cfg.online
        prompts = self._my_prompts(batch_idx)
        samples = self._generate(prompts, self.sampling)
        greedy = self._generate(prompts, self.sampling.greedy())
        reward = self._score(prompts, samples)
        baseline = self._score(prompts, greedy)
        gen_time = time.perf_counter() - start
        metrics = self._policy_gradient_step(
            samples,
            apply_eos_penalty(reward, samples, o.missing_eos_penalty),
            apply_eos_penalty(baseline, greedy, o.missing_eos_penalty),
        )
        metrics.update(self._generation_metrics(samples, reward))
        metrics["reward/baseline"] = self._gmean(baseline)
        metrics["pairs/ties"] = sum(self._gather_list([int((reward == baseline).sum())]))
        metrics["generation_time"] = gen_time
        metrics["step_time"] = time.perf_counter() - start
        rows = []
        for i in range(min(o.log_samples, len(prompts))):
            rows.append(self._sample_row(prompts[i], samples[i], reward[i], "sample"))
            rows.append(self._sample_row(prompts[i], greedy[i], baseline[i], "greedy"))
        self._log_samples(rows)
        return metrics

    @torch.no_grad()
    def _reference_tokens(self, samples, micro: list[list[int]], k: int = 1) -> dict:
        """The reference's token log-probs of each micro-batch of the step (keyed by its first
        sample), laid out as the step lays them out (so the same values), computed before the
        step: under FSDP2 and DeepSpeed the reference is sharded and processes hold unequal
        numbers of samples, so it runs in one gathered phase. Empty without a reference."""
        if self.reference is None:  # kl_ctl = 0 and reference=none: the KL term is zero
            return {}
        out, pad, chunk = {}, self.tokenizer.pad_token_id, self.cfg.train.chunk_size
        with self.sharding.gathered(policy=False), self.acc.autocast():
            for idx in (mb for mb in micro if len(mb)):
                batch, _ = sample_batch([samples[i] for i in idx], k, pad, self.layout)
                batch = batch.to(self.acc.device)
                hidden = self.reference.hidden(batch)
                out[idx[0]] = token_logps(self.reference.head_model(), batch, hidden, chunk)
        return out

    def _sample_token_logps(
        self, chosen, k: int = 1, ref_tok: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(B, T)` per-token log-probs of completions (prompt-major, `k` per prompt) under the
        policy (with grad) and the reference (`ref_tok`, from `_reference_tokens`; without it
        the policy's detached values in its place), and their 0/1 mask, through the one
        log-prob engine."""
        batch, perm = sample_batch(chosen, k, self.tokenizer.pad_token_id, self.layout)
        batch = batch.to(self.acc.device)
        with self.acc.autocast():
            tok = self.run_policy(token_logps, batch, None, self.cfg.train.chunk_size)
        ref_tok = tok.detach() if ref_tok is None else ref_tok
        logps, mask = per_token_rows(tok, batch)  # fp32 (fp64 models: fp64) from the engine
        ref_logps, _ = per_token_rows(ref_tok.to(tok.dtype), batch)
        if perm is not None:
            perm = perm.to(logps.device)
            logps, ref_logps, mask = logps[perm], ref_logps[perm], mask[perm]
        return logps, ref_logps.detach(), mask

    def _policy_gradient_step(self, samples, reward: torch.Tensor, baseline: torch.Tensor) -> dict:
        """One step of the step engine whose loss is the token mean of the REINFORCE surrogate
        over the whole step (all processes): each micro-batch's summed token losses over the
        step's token count."""
        t, o = self.cfg.train, self.cfg.online
        n_tok = sum(self._gather_list([sum(len(s.token_ids) for s in samples)]))
        surrogate, kls, advantages = [], [], []
        micro = split_even(list(range(len(samples))), t.grad_accum)
        ref_toks = self._reference_tokens(samples, micro)

        def micro_loss(idx):
            chosen = [samples[i] for i in idx]
            logps, ref_logps, mask = self._sample_token_logps(chosen, 1, ref_toks.get(idx[0]))
            r, rb = reward[idx].to(logps), baseline[idx].to(logps)
            returns = remax_returns(
                logps.detach(), ref_logps, mask, r, rb,
                o.remax_kl_ctl, o.remax_gamma, o.remax_clip_reward,
            )  # fmt: skip
            seq_losses = remax_sequence_losses(logps, mask, returns)
            surrogate.append(seq_losses.detach())
            kls.append(((logps.detach() - ref_logps) * mask).sum(1))
            advantages.append((r - rb).clamp(-o.remax_clip_reward, o.remax_clip_reward))
            return seq_losses.sum(), sum(len(s.prompt_token_ids) + len(s.token_ids) for s in chosen)

        metrics = self.stepper.run(self.step + 1, micro, micro_loss, n_tok, self._idle_loss)
        local = torch.cat(surrogate).sum().item() if surrogate else 0.0
        metrics["loss"] = sum(self._gather_list([local])) / max(n_tok, 1)
        metrics["kl"] = self._gmean(torch.cat(kls)) if kls else float("nan")
        metrics["reward/advantage"] = self._gmean(torch.cat(advantages)) if advantages else 0.0
        return metrics
