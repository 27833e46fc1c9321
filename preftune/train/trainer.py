"""The offline preference trainer: one loop for every loss of the registry.

The loop never branches on a loss's name; it reads what the loss declares (reference or not,
TDPO's sequential KL, unpaired data, state). It runs under Hugging Face accelerate from the
start, so nothing assumes one process: a global batch of pairs is split across processes and
then into micro-batches, each micro-batch's summed loss is divided by the global number of
examples, and metrics are gathered before they are averaged (train/base.py).
"""

from __future__ import annotations

import functools
import uuid

import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file
from tqdm.auto import tqdm

from preftune.config import Config
from preftune.evaluate import (
    SEGMENTS_FILE,
    TRAIN_SEGMENTS_FILE,
    greedy_samples,
    has_shared_prefixes,
    segment_table,
    train_probe,
)
from preftune.logprob.plan import LayoutSettings, layout_settings
from preftune.logps import sequence_logps, sequence_logps_and_kl
from preftune.losses import PreferenceLogps, UnpairedLogps, compute
from preftune.models import cache_dir, load_causal_lm
from preftune.train import offload
from preftune.train.base import BaseTrainer
from preftune.train.batches import (
    example_lengths,
    kl_batch,
    length_sorted_batches,
    mismatched_pairs,
    pair_batch,
    unpaired_batch,
)
from preftune.train.checkpoint import write_json
from preftune.train.reference import (
    CachedReference,
    ModelReference,
    cache_key,
    choose_mode,
    load_or_compute_cache,
    write_cache,
)
from preftune.train.setup import Datasets, load_datasets, load_policy
from preftune.validation import check_reference_offload


class Trainer(BaseTrainer):
    """Preference pairs (or KTO's unpaired examples) against a reference, any registry loss."""

    def _setup(self, cfg: Config) -> None:
        """BaseTrainer's setup, then the reference (inside the run directory's claim: a
        reference that cannot be built releases it)."""
        super()._setup(cfg)
        if self.acc.is_local_main_process:  # reference copies a killed run left on this node
            offload.sweep(self.run_dir)
        self.acc.wait_for_everyone()
        self.reference = self._build_reference()

    def _check_engine(self) -> None:
        """Also the reference's mode, settled before the model loads, and `reference_offload`
        checked against it and the engine."""
        super()._check_engine()
        mode, why = self._reference_mode()
        asked = self.cfg.train.reference
        where = f"reference={asked}" + ("" if asked == mode else f" chose {mode}: {why}")
        engine = self.sharding.name if self.sharding.enabled else None
        check_reference_offload(self.cfg.train.reference_offload, mode, where, engine)

    def load_model(self) -> tuple:
        return load_policy(self.cfg)

    def load_data(self, tokenizer) -> Datasets:
        return load_datasets(self.cfg, tokenizer, unpaired=self.spec.unpaired)

    # ---- the reference -----------------------------------------------------------------------
    def _reference_mode(self) -> tuple[str, str]:
        """(mode, why): where the reference comes from (`reference.choose_mode`)."""
        return choose_mode(
            self.cfg.train.reference,
            needs_reference=self.spec.needs_reference,
            needs_model=self.spec.needs_seq_kl or self.spec.unpaired,
            lora=self.cfg.model.lora,
        )

    def _build_reference(self):
        mode, why = self._reference_mode()
        self.reference_mode = mode
        self.log_line(f"reference: {mode} — {why}")
        if mode == "none":
            return None
        if mode in ("frozen", "lora") and self.sharding.enabled:
            return self._sharded_reference(mode, gathered_only=False)
        if mode in ("frozen", "lora"):
            return self._model_reference(mode)
        with self.sharding.gathered():  # each process its share of the batches
            return CachedReference(self._precompute())

    def _model_reference(self, mode: str) -> ModelReference:
        """The frozen copy or LoRA's adapter-off base, held by this process; with
        `reference_offload=disk` the copy's layers in a folder of the run directory's."""
        folder = None
        if self.cfg.train.reference_offload == "disk":
            token = uuid.uuid4().hex[:8]
            folder = self.run_dir / f"{offload.PREFIX}{self.acc.process_index}-{token}"
            self.log_line(
                f"reference_offload: the reference's decoder layers in {folder}, read back for "
                "each of its forwards (removed when the run ends)"
            )
        return ModelReference(self.policy, mode, self.cfg.train.chunk_size, folder)

    def _sharded_reference(self, mode: str, gathered_only: bool) -> ModelReference:
        """The reference under FSDP2 or DeepSpeed: sharded too, never whole per process where
        the policy is sharded (ZeRO-2 keeps both whole). LoRA's adapter-off forward would run
        outside the sharded module, so its reference is the base model loaded again (the same
        weights: the adapter starts at zero). `gathered_only`: the run reads it only inside
        `sharding.gathered()` phases."""
        if mode == "lora":
            self.log_line(f"reference: under {self.sharding.name}, the base model loaded again")
        frozen = self.sharding.shard_frozen(self._load_frozen(), self.acc.device, gathered_only)
        return ModelReference(frozen, "same", self.cfg.train.chunk_size)

    def _load_frozen(self):
        """The reference under sharding: the policy's starting weights, loaded again (a
        sharded policy cannot be copied) on the CPU, frozen; `shard_frozen` places it."""
        m = self.cfg.model
        model = load_causal_lm(m.model, getattr(torch, m.dtype), m.trust_remote_code)
        return model.eval().requires_grad_(False)

    def _precompute(self) -> dict[str, torch.Tensor]:
        d, t = self.cfg.data, self.cfg.train
        settings = {
            "max_length": d.max_length,
            "max_prompt_length": d.max_prompt_length,
            "dtype": self.cfg.model.dtype,
            "bf16": t.bf16,
            "lora": self.cfg.model.lora,
        }
        tables = {}
        self.cache_reused = {}
        for split, examples in (("train", self.data.train), ("eval", self.data.eval)):
            key = cache_key(self.model_path, examples, settings)
            path = cache_dir() / "refcache" / f"{key}.safetensors"
            table, reused = self._cached_table(
                path, lambda ex=examples, s=split: self._reference_table(ex, s)
            )
            self.log_line(
                f"reference log-probs ({split}): {'reused cache' if reused else 'computed and cached'} {path.name}"
            )
            tables[split] = table
            self.cache_reused[split] = reused
        self.eval_reference = CachedReference(tables["eval"])
        return tables["train"]

    def _cached_table(self, path, compute) -> tuple[dict[str, torch.Tensor], bool]:
        """(table, reused): the cache file if the main process finds it (sent to the others),
        else computed by all processes together and written by the main one."""
        if self.acc.num_processes == 1:
            return load_or_compute_cache(path, compute)
        box = [load_file(str(path)) if self.acc.is_main_process and path.exists() else None]
        broadcast_object_list(box, from_process=0)
        if box[0] is not None:
            return box[0], True
        table = compute()
        if self.acc.is_main_process:
            write_cache(path, table)
        return table, False

    @torch.no_grad()
    def _reference_table(self, examples: list[dict], split: str) -> dict[str, torch.Tensor]:
        """Reference log-probs of every example: each process scores its share of the
        length-sorted batches (of PRECOMPUTE_TOKENS, not the training batches), then all
        shares are gathered, so N processes do 1/N of the work each."""
        model = ModelReference(
            self.policy,
            "lora" if self.cfg.model.lora else "same",
            self.cfg.train.chunk_size,
        )
        P, rank = self.acc.num_processes, self.acc.process_index
        mine = []
        for idx in tqdm(
            length_sorted_batches(example_lengths(examples))[rank::P],
            desc=f"reference log-probs ({split})",
            disable=self.quiet,
            leave=False,
        ):
            batch = self._pair_batch(examples, idx)
            with self.acc.autocast():
                lp = model.logps(batch.tokens.to(self.acc.device)).double().cpu()
            mine.append((list(idx), lp[: len(idx)].tolist(), lp[len(idx) :].tolist()))
        chosen = torch.zeros(len(examples), dtype=torch.float64)
        rejected = torch.zeros(len(examples), dtype=torch.float64)
        for idx, c, r in self._gather_list(mine):
            chosen[idx], rejected[idx] = (
                torch.tensor(c, dtype=torch.float64),
                torch.tensor(r, dtype=torch.float64),
            )
        return {"chosen": chosen, "rejected": rejected}

    @functools.cached_property
    def layout(self) -> LayoutSettings:
        """How this run lays out its pair batches (the layout planner, logprob/plan.py)."""
        return layout_settings(
            self.cfg.train, self.policy.config, bool(self.cfg.model.gradient_checkpointing)
        )

    def _pair_batch(self, examples, idx):
        # under gradient checkpointing the engine lays a shared prefix out in the rows of a
        # training step (logprob/plan.py); passes without gradients still share it
        lay = self.layout
        return pair_batch(
            examples,
            idx,
            self.tokenizer.pad_token_id,
            lay.packed,
            lay.share_prompt,
            lay.hidden_size,
            lay.share_prefix,
            lay.share_completion_prefix,
            lay.varlen,
        )

    # ---- one micro-batch -----------------------------------------------------------------------
    def _paired_logps(self, examples, idx, reference) -> tuple[PreferenceLogps, int]:
        b = self._pair_batch(examples, idx)
        tokens = b.tokens.to(self.acc.device)
        n = len(idx)
        kl = None
        if self.spec.needs_seq_kl:
            ref_hidden = reference.hidden(tokens)
            pol, kl = self.run_policy(
                sequence_logps_and_kl,
                reference.head_model(),
                tokens,
                ref_hidden,
                self.cfg.train.chunk_size,
            )
        else:
            pol = self.run_policy(sequence_logps, tokens, self.cfg.train.chunk_size)
        ref = reference.logps(tokens, (b.index, n)).to(pol) if reference is not None else None
        logps = PreferenceLogps(
            policy_chosen_logps=pol[:n],
            policy_rejected_logps=pol[n:],
            ref_chosen_logps=None if ref is None else ref[:n],
            ref_rejected_logps=None if ref is None else ref[n:],
            chosen_lengths=b.chosen_lengths.to(pol.device),
            rejected_lengths=b.rejected_lengths.to(pol.device),
            chosen_seq_kl=None if kl is None else kl[:n],
            rejected_seq_kl=None if kl is None else kl[n:],
        )
        return logps, b.num_tokens

    def _unpaired_logps(self, examples, idx, reference, kl=None) -> tuple[UnpairedLogps, int]:
        """KTO's log-probs of examples[idx]; `kl` the (policy, reference) log-probs of the
        step's KL pairs (`step_kl`), else those of idx's own (evaluation)."""
        t = self.cfg.train
        b = unpaired_batch(examples, idx, self.tokenizer.pad_token_id, t.packed, t.share_prefix)
        tokens = b.tokens.to(self.acc.device)
        pol = self.run_policy(sequence_logps, tokens, t.chunk_size)
        kl_pol, kl_ref = kl if kl is not None else self.kl_logps(examples, idx, reference)
        logps = UnpairedLogps(
            policy_logps=pol,
            ref_logps=reference.logps(tokens).to(pol),
            labels=b.labels.to(pol.device),
            kl_policy_logps=kl_pol.to(pol),
            kl_ref_logps=kl_ref.to(pol),
            lengths=b.lengths.to(pol.device),
        )
        return logps, b.num_tokens

    @torch.no_grad()  # KTO's z0 is a detached estimate (METHODS.md §12)
    def kl_logps(self, examples, idx, reference, pairs=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy, reference) log-probs of KTO's mismatched pairs of examples[idx]."""
        t = self.cfg.train
        pairs = mismatched_pairs(idx) if pairs is None else pairs
        tokens = kl_batch(examples, pairs, self.tokenizer.pad_token_id, t.packed, t.share_prefix)
        tokens = tokens.to(self.acc.device)
        with self.acc.autocast():
            return self.run_policy(sequence_logps, tokens, t.chunk_size), reference.logps(tokens)

    def step_context(self, batch_idx: list[int]):
        """KTO's KL pairs of the step (`step_kl`); nothing for the paired losses."""
        if not self.spec.unpaired:
            return None
        with self.sharding.gathered():
            return self.step_kl(batch_idx)

    def step_kl(self, batch_idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """KTO's KL pairs of a whole step, each process scoring its share in micro-batch-sized
        pieces, gathered: z0 is the step's whatever the processes and micro-batches (HALOs
        gathers it over processes too), so accumulation and N processes equal one batch."""
        P, t = self.acc.num_processes, self.cfg.train
        pairs = mismatched_pairs(batch_idx)[self.acc.process_index :: P]
        size = max(1, len(pairs) // t.grad_accum)
        parts = [
            self.kl_logps(self.data.train, None, self.reference, pairs[s : s + size])
            for s in range(0, len(pairs), size)
        ]
        pol, ref = (torch.cat([p[i].double() for p in parts]) for i in (0, 1))
        return self.acc.gather(pol), self.acc.gather(ref)

    def _loss(self, examples, idx, reference, train: bool, context=None):
        """`context`: KTO's step-wide KL log-probs (`step_context`), None in evaluation."""
        kl = context
        with self.acc.autocast():
            if self.spec.unpaired:
                logps, ntok = self._unpaired_logps(examples, idx, reference, kl)
            else:
                logps, ntok = self._paired_logps(examples, idx, reference)
            hp = self.cfg.loss.loss_args
            if self.calibration is not None and train:
                out = self.calibration(
                    self.cfg.loss.loss, logps, hp, gather=self.acc.gather, state=self.loss_state
                )
            else:
                out = compute(self.cfg.loss.loss, logps, state=self.loss_state, **hp)
        if train and out.state is not None:
            self.loss_state = out.state  # eval reads the state but never moves it
        return out, logps, ntok

    # ---- samples and the reference's segment sums, written before training and after ---------
    @torch.no_grad()
    def write_samples(self, tag: str) -> None:
        """Greedy completions of a few held-out prompts (`greedy_{tag}.json`, any data set) and,
        before training (policy == reference), the reference segment sums of the held-out pairs
        and of the training probe that evaluate_pairs subtracts; on disk, so a resumed run keeps
        them."""
        model = self.policy
        if self.acc.is_main_process and model.can_generate():
            was = self.policy.training
            self.policy.eval()
            exs, t = self.data.eval, self.cfg.train
            samples = greedy_samples(
                model, self.tokenizer, exs or self.data.train, self.cfg.eval.eval_max_new_tokens
            )
            write_json(self.run_dir / f"greedy_{tag}.json", samples)
            if tag == "before" and self.reference is not None:
                size = max(2, t.batch_size // t.grad_accum)
                # the probe is followed at evaluations: none without held-out pairs
                probe = train_probe(self.data.train) if exs else []
                for pairs, name in ((exs, SEGMENTS_FILE), (probe, TRAIN_SEGMENTS_FILE)):
                    if has_shared_prefixes(pairs):
                        table = segment_table(model, pairs, self._pair_batch, size, t.chunk_size)
                        write_json(self.run_dir / name, table.tolist())
            self.policy.train(was)
        self.acc.wait_for_everyone()  # the others read the segment file in evaluate_pairs
