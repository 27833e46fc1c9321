"""The online trainers: each step generates, judges, and takes one optimizer step on the result.

- `OnlineDPOTrainer` — online DPO / OAIF (Guo et al. 2024; METHODS.md §13): two samples per
  prompt from the current policy, labelled by the judge, any pairwise loss of the registry.
- `RSOTrainer` — RSO (Liu et al., ICLR 2024; §4): N samples per prompt from the reference
  (SFT) policy, k kept by the statistical rejection sampler, ranked into pairs by the judge,
  trained with sigmoid-norm (`loss=dpo`) or hinge-norm (`loss=hinge`), `beta` being the paper's
  gamma.
- `ReMaxTrainer` (in preftune/train/remax.py) — REINFORCE with a greedy baseline (§14).

They are `Trainer`s with prompts as their data: `preftune.train.loop.run` drives them exactly as
it drives offline training (data order, progress bar, eval, checkpoints, resume, final/), and
the pairwise ones reuse `Trainer._loss` (so β calibration and every loss declaration apply).
Every step logs `reward/mean`, `kl`, `completion_length`, `pairs/ties`; on the first, the last
and every `eval_every`-th step a few prompts' completions and scores go to samples.jsonl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from preftune import prepacked
from preftune.config import Config, ConfigError
from preftune.data import arithmetic
from preftune.data.prompts import load_prompts, user_text
from preftune.data.tokenize import tokenize_records
from preftune.generation import Completion, SamplingConfig, generate
from preftune.judges import RewardModelJudge, load_judge
from preftune.logps import sequence_logps
from preftune.online.base import append_jsonl, split_even
from preftune.online.labels import label_online_pairs
from preftune.online.rso_data import apply_eos_penalty, select_rso_pairs
from preftune.train import checkpoint as ckpt
from preftune.train.metrics import record, summarise
from preftune.train.reference import CachedReference
from preftune.train.setup import Datasets, TrainingError, resolve_task
from preftune.train.trainer import Trainer


def pair_example(chosen: Completion, rejected: Completion) -> dict:
    """A generated pair in the tokenized-example form `Trainer._loss` reads."""
    return {
        "prompt_ids": list(chosen.prompt_token_ids),
        "chosen_ids": list(chosen.token_ids),
        "rejected_ids": list(rejected.token_ids),
    }


class OnlineTrainer(Trainer):
    """Shared setup and bookkeeping; subclasses implement `train_step(batch_idx)`."""

    method = "online"
    pairwise = True  # trains a registry loss on pairs, so held-out pairs give eval/ metrics

    @property
    def label(self) -> str:
        return f"{self.method} ({self.cfg.loss.loss})" if self.pairwise else self.method

    def __init__(self, cfg: Config):
        judge = load_judge(cfg.online.judge, batch_size=max(1, cfg.eval.eval_batch_size))
        super().__init__(cfg)  # prompts as data (`load_data`), then `_build_reference`
        if isinstance(judge, RewardModelJudge):
            judge.model.to(self.acc.device)
        self.judge = judge
        o = cfg.online
        self.sampling = SamplingConfig(
            temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, max_new_tokens=o.max_new_tokens
        )
        self.sample_rng = torch.Generator().manual_seed(cfg.train.seed)  # RSO's uniforms
        self.samples_path = self.run_dir / "samples.jsonl"
        self.log_line(f"{self.method}: judge {o.judge}, {len(self.data.train)} prompts")
        self.log_line(prepacked.describe(self.acc.device))

    # ---- setup -----------------------------------------------------------------------------
    def load_data(self, tokenizer) -> Datasets:
        cfg, d = self.cfg, self.cfg.data
        ps = load_prompts(cfg, tokenizer)
        evald: list[dict] = []
        if self.pairwise and ps.eval_records:
            evald, stats = tokenize_records(
                ps.eval_records, tokenizer, d.max_length, d.max_prompt_length
            )
            if stats.summary():
                ps.notes.append(f"eval: {stats.summary()}")
        task = resolve_task(cfg)
        problems = arithmetic.test_prompts()[: d.num_task_eval] if task == "arithmetic" else []
        return Datasets(ps.prompts, evald, problems, arithmetic.verify if task else None, ps.notes)

    def _check_engine(self) -> None:
        """beta_calibration needs one process. Under FSDP2 and DeepSpeed an online run reads
        its reference only in gathered phases (generation, the step's reference log-probs): a
        pairwise loss that reads the reference's distributions beside each policy forward
        (TDPO) is refused there."""
        super()._check_engine()
        if self.acc.num_processes > 1 and self.cfg.loss.beta_calibration:
            raise ConfigError(
                "beta_calibration in an online run needs one process: the number of pairs per "
                "process changes every step, and the calibration gathers equal-sized batches"
            )
        if self.sharding.enabled and self.pairwise and self.spec.needs_seq_kl:
            raise TrainingError(
                f"{self.method} with loss={self.cfg.loss.loss} reads the reference's "
                f"distributions in every micro-batch, which an online run under "
                f"{self.sharding.name} does not keep; use another loss or launch it with "
                f"examples/accelerate/ddp.yaml"
            )

    def needs_reference(self) -> bool:
        """Whether reference=none is an error."""
        return True

    def wants_reference(self) -> bool:
        """Whether reference=auto loads one (for the `kl` metric even when nothing needs it)."""
        return self.needs_reference()

    def _reference_mode(self) -> tuple[str, str]:
        """(mode, why): none where nothing reads it, else the initial model."""
        mode = self.cfg.train.reference
        if mode == "precompute":
            raise ConfigError(
                "reference=precompute cannot serve an online run: its completions are new every "
                "step; use auto, frozen or lora"
            )
        if mode == "none" or (mode == "auto" and not self.wants_reference()):
            if self.needs_reference():
                raise ConfigError(
                    f"reference=none, but {self.method} needs the reference model here; "
                    f"use auto, frozen or lora"
                )
            return "none", "nothing here reads it"
        if mode == "auto":
            mode = "lora" if self.cfg.model.lora else "frozen"
        return mode, "the initial model, fixed for the whole run"

    def _build_reference(self):
        mode, why = self._reference_mode()
        self.reference_mode = mode
        self.log_line(f"reference: {mode} — {why}")
        if mode == "none":
            return None
        if self.sharding.enabled:  # read only in gathered phases: generation, `_step_reference`
            return self._sharded_reference(mode, gathered_only=True)
        return self._model_reference(mode)

    # ---- generation and judging ------------------------------------------------------------
    def _my_prompts(self, batch_idx: list[int]) -> list[dict]:
        mine = batch_idx[self.acc.process_index :: self.acc.num_processes]
        return [self.data.train[i] for i in mine]

    def _generate(
        self, prompts: list[dict], cfg: SamplingConfig, from_reference: bool = False
    ) -> list[Completion]:
        """Completions of the current policy, or of the reference (RSO's proposal pi_sft)."""
        texts = [p["text"] for p in prompts]
        bs = self.cfg.online.generation_batch_size
        model, ctx = self.policy, contextlib.nullcontext()
        if from_reference:
            if self.reference.mode == "lora":
                ctx = model.disable_adapter()
            else:
                model = self.reference.model
        # FSDP2 / ZeRO-3: the sampling model gathered whole for the phase (processes stop at
        # EOS after different numbers of forwards, which per-layer all-gathers could not follow)
        own = model is self.policy
        with self.sharding.gathered(policy=own, reference=not own), ctx, self.acc.autocast():
            return generate(model, self.tokenizer, texts, cfg, batch_size=bs)

    def _score(self, prompts: list[dict], comps: list[Completion]) -> torch.Tensor:
        texts = [prompts[c.prompt_index]["text"] for c in comps]
        return torch.tensor(self.judge.score(texts, [c.text for c in comps]), dtype=torch.float64)

    # ---- one optimizer step on generated pairs ---------------------------------------------
    def _train_on_pairs(self, pairs: list[dict]) -> dict:
        """One optimizer step on this process's pairs, through the same step engine as
        `Trainer.train_step`; the global number of pairs, known only after judging, normalises
        the loss."""
        n_global = sum(self._gather_list([len(pairs)]))
        rec: dict[str, list] = {k: [] for k in ("loss", "chosen", "rejected", "lp_c", "lp_r")}
        extra: dict[str, list] = {}
        log_ratios: list[torch.Tensor] = []
        micro = split_even(list(range(len(pairs))), self.cfg.train.grad_accum)
        reference = self._step_reference(pairs, micro)

        def micro_loss(idx):
            out, logps, n = self._loss(pairs, idx, reference, train=True)
            record(rec, extra, out, logps)
            if logps.ref_chosen_logps is not None:
                log_ratios.extend(
                    [
                        (logps.policy_chosen_logps - logps.ref_chosen_logps).detach(),
                        (logps.policy_rejected_logps - logps.ref_rejected_logps).detach(),
                    ]
                )
            return out.losses.sum(), n

        metrics = self.stepper.run(self.step + 1, micro, micro_loss, n_global, self._idle_loss)
        summary = summarise(self._gather_rec(rec), self._gather_rec(extra))
        # a step without pairs (all ties) trains nothing: its loss is NaN, the rest is left out
        metrics.update({k: v for k, v in summary.items() if k == "loss" or v == v})
        # completions sampled from the policy: mean of log pi/pi_ref = KL estimate; every process
        # joins the gather, with or without pairs of its own
        kl = self._gmean(torch.cat(log_ratios) if log_ratios else [])
        if kl == kl:
            metrics["kl"] = kl
        return metrics

    @torch.no_grad()
    def _step_reference(self, pairs: list[dict], micro: list[list[int]]):
        """The reference's log-probs of this step's pairs, computed before the step micro-batch
        by micro-batch as the step lays them out (so the same values), as a table `_loss` reads:
        under FSDP2 and DeepSpeed the reference is sharded and processes hold unequal numbers
        of pairs, so it runs in one gathered phase rather than beside each policy forward. A
        loss that reads the reference's distributions (TDPO) keeps the model."""
        if self.reference is None or self.spec.needs_seq_kl:
            return self.reference
        chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
        with self.sharding.gathered(policy=False), self.acc.autocast():
            for idx in (mb for mb in micro if len(mb)):
                b = self._pair_batch(pairs, idx)
                values = self.reference.logps(b.tokens.to(self.acc.device), (b.index, len(idx)))
                chosen, rejected = chosen.to(values), rejected.to(values)
                chosen[b.index], rejected[b.index] = values[: len(idx)], values[len(idx) :]
        return CachedReference({"chosen": chosen, "rejected": rejected})

    def _idle_loss(self) -> torch.Tensor:
        """A forward through the prepared engine on a one-token pair, for a process with
        nothing to train this step: the gradient sync of the others waits for its backward."""
        eos = self.tokenizer.eos_token_id
        batch = self._pair_batch(
            [{"prompt_ids": [eos], "chosen_ids": [eos], "rejected_ids": [eos]}], [0]
        )
        with self.acc.autocast():
            tokens = batch.tokens.to(self.acc.device)
            return self.run_policy(sequence_logps, tokens, self.cfg.train.chunk_size).sum()

    def _generation_metrics(self, comps: list[Completion], scores: torch.Tensor) -> dict:
        return {
            "reward/mean": self._gmean(scores),
            "completion_length": self._gmean([len(c.token_ids) for c in comps]),
            "completion/eos_fraction": self._gmean([float(c.has_eos) for c in comps]),
        }

    # ---- samples.jsonl -------------------------------------------------------------------------
    def _log_samples(self, rows: list[dict]) -> None:
        """On the first, the last and every eval_every-th step: what was generated and scored."""
        s, every = self.step + 1, self.cfg.train.eval_every
        if not self.acc.is_main_process or not rows:
            return
        if s == 1 or s == self.total_steps or (every and s % every == 0):
            append_jsonl(self.samples_path, [{"step": s, "method": self.method, **r} for r in rows])

    @staticmethod
    def _sample_row(prompt: dict, comp: Completion, score: float, role: str) -> dict:
        return {
            "prompt": user_text(prompt["prompt"]),
            "completion": comp.text,
            "score": float(score),
            "has_eos": comp.has_eos,
            "num_tokens": len(comp.token_ids),
            "role": role,
        }

    # ---- state -----------------------------------------------------------------------------------
    def state(self) -> dict:
        """The offline trainer's state plus the RSO sampler's generator (torch's global RNG,
        which `generate` draws from, is in every checkpoint already)."""
        state = super().state()
        state["tensors"]["sample_rng"] = self.sample_rng.get_state()
        state["method"] = self.method
        return state

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        if "sample_rng" in state["tensors"]:
            self.sample_rng.set_state(state["tensors"]["sample_rng"])
        if self.acc.is_main_process:  # as loop.run does for metrics
            ckpt.truncate_jsonl(self.samples_path, self.step, self.warn)

    def evaluate_pairs(self) -> dict:
        return super().evaluate_pairs() if self.pairwise else {}


class OnlineDPOTrainer(OnlineTrainer):
    """Online DPO / OAIF (Guo et al. 2024, "Direct Language Model Alignment from Online AI
    Feedback"), METHODS.md §13 (a): sample two completions per prompt from the current policy,
    judge them, subtract `missing_eos_penalty` from those without EOS, chosen = the higher score
    (ties to the first; skipped and counted with skip_ties), then the configured pairwise loss
    on log-probs recomputed with gradient. Reference code: TRL `OnlineDPOTrainer.training_step`.
    """

    method = "online_dpo"

    def needs_reference(self) -> bool:
        return self.spec.needs_reference

    def train_step(self, batch_idx: list[int]) -> dict:
        start = time.perf_counter()
        o = self.cfg.online
        prompts = self._my_prompts(batch_idx)
        comps = self._generate(prompts, dataclasses.replace(self.sampling, num_return_sequences=2))
        scores = self._score(prompts, comps)
        first, second = comps[0::2], comps[1::2]  # prompt-major: samples 2i and 2i+1 of prompt i
        labels = label_online_pairs(
            scores[0::2],
            scores[1::2],
            torch.tensor([c.has_eos for c in first]),
            torch.tensor([c.has_eos for c in second]),
            o.missing_eos_penalty,
            o.skip_ties,
        )
        both = first + second  # label indices point into [first; second]
        chosen, rejected = labels.chosen_index.tolist(), labels.rejected_index.tolist()
        kept = [i for i, k in enumerate(labels.keep.tolist()) if k]
        pairs = [pair_example(both[chosen[i]], both[rejected[i]]) for i in kept]
        gen_time = time.perf_counter() - start
        metrics = self._train_on_pairs(pairs)
        metrics.update(self._generation_metrics(comps, scores))
        metrics["pairs/ties"] = sum(self._gather_list([labels.num_ties]))
        metrics["pairs/trained"] = sum(self._gather_list([len(pairs)]))
        metrics["generation_time"] = gen_time
        metrics["step_time"] = time.perf_counter() - start
        raw = torch.cat([scores[0::2], scores[1::2]])  # judge scores in the [first; second] layout
        rows = []
        for i in range(min(o.log_samples, len(prompts))):
            tie = bool(labels.chosen_scores[i] == labels.rejected_scores[i])  # after the penalty
            for j, role in ((chosen[i], "chosen"), (rejected[i], "rejected")):
                rows.append(self._sample_row(prompts[i], both[j], raw[j], "tie" if tie else role))
        self._log_samples(rows)
        return metrics


class RSOTrainer(OnlineTrainer):
    """RSO as an online loop (Liu et al., ICLR 2024, "Statistical Rejection Sampling Improves
    Preference Optimization", Algorithm 1 and §3; METHODS.md §4): per prompt,
    `rso_num_candidates` samples of the reference policy, `rso_num_samples` of them accepted by
    the rejection sampler at `rso_beta`, paired first-round-rank by the judge's scores."""

    method = "rso"

    def train_step(self, batch_idx: list[int]) -> dict:
        start = time.perf_counter()
        o = self.cfg.online
        prompts = self._my_prompts(batch_idx)
        sampling = dataclasses.replace(self.sampling, num_return_sequences=o.rso_num_candidates)
        cands = self._generate(prompts, sampling, from_reference=True)
        scores = self._score(prompts, cands)
        judged = apply_eos_penalty(scores, cands, o.missing_eos_penalty)
        sel = select_rso_pairs(
            cands,
            judged,
            o.rso_num_candidates,
            o.rso_num_samples,
            o.rso_beta,
            self.sample_rng,
            keep_ties=not o.skip_ties,
        )
        pairs = [pair_example(c, r) for c, r in sel.pairs]
        gen_time = time.perf_counter() - start
        metrics = self._train_on_pairs(pairs)
        if "kl" in metrics:  # the pairs come from pi_ref: -mean log pi/pi_ref estimates KL(ref||pi)
            metrics["kl"] = -metrics["kl"]
        metrics.update(self._generation_metrics(cands, scores))
        metrics["reward/accepted"] = self._gmean(sel.chosen_scores + sel.rejected_scores)
        metrics["pairs/ties"] = sum(self._gather_list([sel.num_ties]))
        metrics["pairs/trained"] = sum(self._gather_list([len(pairs)]))
        metrics["generation_time"] = gen_time
        metrics["step_time"] = time.perf_counter() - start
        rows = []
        for (c, r), sc, sr in list(zip(sel.pairs, sel.chosen_scores, sel.rejected_scores))[
            : o.log_samples
        ]:
            prompt = prompts[c.prompt_index]
            rows += [
                self._sample_row(prompt, c, sc, "chosen"),
                self._sample_row(prompt, r, sr, "rejected"),
            ]
        self._log_samples(rows)
        return metrics
