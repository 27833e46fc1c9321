"""The offline preference trainer: one loop for every loss of the registry.

The loop never branches on a loss's name; it reads what the loss declares (reference or not,
TDPO's sequential KL, unpaired data, state). It runs under Hugging Face accelerate from the
start, so nothing assumes one process: a global batch of pairs is split across processes and
then into micro-batches, each micro-batch's summed loss is divided by the global number of
examples, and metrics are gathered before they are averaged.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    broadcast_object_list,
    gather_object,
)
from safetensors.torch import load_file
from tqdm.auto import tqdm

from preftune.allocator import keep_freed_memory
from preftune.calibrate import BetaCalibration
from preftune.config import Config
from preftune.diagnostics import pair_diagnostics, segment_changes, summarise_segments
from preftune.evaluate import (
    SEGMENTS_FILE,
    greedy_samples,
    has_shared_prefixes,
    pair_segment_sums,
    read_segment_table,
    segment_table,
)
from preftune.logps import attention_only, sequence_logps, sequence_logps_and_kl
from preftune.losses import LOSSES, PreferenceLogps, UnpairedLogps, compute
from preftune.models import cache_dir, load_causal_lm
from preftune.train import checkpoint as ckpt
from preftune.train.batches import (
    example_lengths,
    kl_batch,
    length_sorted_batches,
    micro_batches,
    mismatched_pairs,
    pair_batch,
    unpaired_batch,
)
from preftune.train.dcp import save_sharded
from preftune.train.guards import DivergenceGuard
from preftune.train.in_backward import StepInBackward
from preftune.train.reference import (
    CachedReference,
    ModelReference,
    cache_key,
    choose_mode,
    load_or_compute_cache,
    write_cache,
)
from preftune.train.rundir import claim_once, resolve, training_keys
from preftune.train.setup import (
    Datasets,
    TrainingError,
    build_optimizer,
    check_before_loading,
    create_optimizer_state,
    load_datasets,
    load_policy,
    trackers,
)
from preftune.train.sharding import Sharding, fsdp_requested
from preftune.train.step import EngineModule, StepEngine, wrapped


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict


# what prepare may wrap the engine in: nothing, or DDP (CPU processes over gloo, GPUs over NCCL)
SUPPORTED_ENGINES = {
    DistributedType.NO,
    DistributedType.MULTI_CPU,
    DistributedType.MULTI_GPU,
    DistributedType.MULTI_XPU,
    DistributedType.MULTI_NPU,
    DistributedType.MULTI_MLU,
}


def place_for_training(acc, policy, sharding: Sharding, build_optimizer: Callable):
    """(policy on the accelerator's device, the prepared `EngineModule` around it, the prepared
    optimizer, built by `build_optimizer()` once the parameters are final). Under several
    processes accelerate wraps the module (DDP), whose reducer averages the gradients; the
    engine then keeps every gradient inside autograd. Under FSDP2 the module is sharded with
    `fully_shard` (train/sharding.py) and not given to `prepare`, which would shard it again
    (GPUs) or wrap it in DDP (CPUs). The policy itself is never wrapped: `trainer.policy` is
    the bare model everywhere (saving, generation, the reference), no unwrap needed."""
    if acc.distributed_type not in SUPPORTED_ENGINES and not sharding.enabled:
        raise TrainingError(
            f"accelerate is configured for {acc.distributed_type.value}; preftune runs one "
            f"process, DDP or FSDP2 (DeepSpeed ZeRO is not supported yet). Launch with a config "
            f"such as examples/accelerate/ddp.yaml or fsdp2.yaml"
        )
    policy.to(acc.device)
    engine = EngineModule(policy, fast_grads=not wrapped(acc))
    if sharding.enabled:
        sharding.shard_engine(engine, policy)
        return policy, engine, build_optimizer()
    engine, optimizer = acc.prepare(engine, build_optimizer())
    return policy, engine, optimizer


def _mean(values: list) -> float:
    return (
        float(torch.cat([v.reshape(-1).float() for v in values]).mean()) if values else float("nan")
    )


def prepare_trainer(
    trainer,
    cfg: Config,
    load_model: Callable[[], tuple],
    load_data: Callable[[object], Datasets],
) -> None:
    """Set the attributes `Trainer` methods and `loop.run` read: `Trainer.__init__` is this plus
    the reference; the online and reward trainers bring their own model and data loaders.

    load_model() -> (model, tokenizer, model_path); load_data(tokenizer) -> Datasets whose
    `train` list is what `loop.run` batches over (pairs, or prompts for the online methods).
    """
    trainer.cfg = cfg
    trainer.spec = LOSSES[cfg.loss.loss]
    if not cfg.train.resume:  # a resumed run's own config.yaml was checked when it started
        check_before_loading(cfg)
    trainer.rundir = claim_once(cfg, trainer.method or cfg.loss.loss)
    trainer.run_dir = trainer.rundir.path
    try:
        _prepare(trainer, cfg, load_model, load_data)
    except BaseException:
        trainer.rundir.release()  # a run that never started leaves the folder as it found it
        raise


def _prepare(trainer, cfg: Config, load_model, load_data) -> None:
    trainer.acc = Accelerator(
        log_with=trackers(cfg) or None,
        project_dir=str(trainer.run_dir),
        mixed_precision="bf16" if cfg.train.bf16 else "no",
        # buffers (rotary tables) are equal everywhere: no broadcast, which would also make
        # every forward a collective
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    torch.manual_seed(cfg.train.seed)
    trainer.quiet = cfg.train.quiet or not trainer.acc.is_main_process
    if cfg.train.keep_freed_memory and (done := keep_freed_memory()):
        trainer.log_line(f"allocator: {done}")
    trainer.policy, trainer.tokenizer, trainer.model_path = load_model()
    trainer.data = load_data(trainer.tokenizer)
    for note in trainer.data.notes:
        trainer.log_line(f"note: {note}")
    t = cfg.train
    trainer.per_epoch = len(trainer.data.train) // t.batch_size
    if trainer.per_epoch == 0:
        raise TrainingError(
            f"{len(trainer.data.train)} training examples are fewer than batch_size={t.batch_size}"
        )
    trainer.total_steps = t.max_steps or trainer.per_epoch * t.epochs
    trainer.lengths = example_lengths(trainer.data.train) if t.group_by_length else None
    if t.batch_size % (trainer.acc.num_processes * t.grad_accum):
        raise TrainingError(
            f"batch_size={t.batch_size} must split evenly over {trainer.acc.num_processes} "
            f"processes x grad_accum={t.grad_accum}"
        )
    _prepare_step(trainer, cfg)
    trainer.calibration = (
        BetaCalibration(**cfg.loss.beta_calibration) if cfg.loss.beta_calibration else None
    )
    trainer.loss_state = trainer.spec.init_state() if trainer.spec.stateful else None
    trainer.guard = DivergenceGuard(t.divergence_factor)
    trainer.step = 0


def _prepare_step(trainer, cfg: Config) -> None:
    """Optimizer, schedule, the prepared engine module and the step engine."""
    t = cfg.train
    trainer.sharding = Sharding(fsdp_requested(trainer.acc))
    if trainer.sharding.enabled and trainer.method not in (None, "reward"):
        raise TrainingError(
            f"{trainer.method} runs under one process or DDP; FSDP2 shards the offline methods "
            f"and the reward model. Launch it with examples/accelerate/ddp.yaml"
        )

    def build():
        trainer.optimizer, trainer.scheduler = build_optimizer(cfg, trainer.policy, trainer.total_steps)  # fmt: skip
        return trainer.optimizer

    trainer.policy, trainer.engine, trainer.optimizer = place_for_training(
        trainer.acc, trainer.policy, trainer.sharding, build
    )
    if trainer.sharding.enabled:
        trainer.log_line(
            "FSDP2: parameters, gradients and optimizer state sharded per decoder layer "
            "(fully_shard), gradients reduce-scattered by FSDP; the engine's gradient fast paths "
            "(embedding and LM-head gradients written into .grad) are off: they cannot write "
            "into sharded gradients"
        )
    elif wrapped(trainer.acc):
        trainer.log_line(
            f"{trainer.acc.distributed_type.value}: gradients averaged by the wrapper; the "
            f"engine's gradient fast paths (embedding and LM-head gradients written into .grad) "
            f"are off, since the wrapper would not see them"
        )
    create_optimizer_state(trainer.optimizer)  # before the precompute and the first step
    trainer.in_backward = None
    if t.optimizer_in_backward:
        if trainer.acc.num_processes > 1:
            raise TrainingError(
                f"optimizer_in_backward needs one process (this run has "
                f"{trainer.acc.num_processes}): each update must see the gradient averaged over "
                f"all of them. Run one process, or set optimizer_in_backward=false."
            )
        trainer.in_backward = StepInBackward(
            trainer.policy, trainer.optimizer, step=lambda: trainer.step + 1
        )
    trainer.stepper = StepEngine(
        trainer.acc,
        trainer.engine,
        trainer.optimizer,
        trainer.scheduler,
        t.max_grad_norm,
        trainer.in_backward,
    )


class Trainer:
    method: str | None = None  # names default run directories (the loss's name when None)

    def __init__(self, cfg: Config):
        prepare_trainer(
            self,
            cfg,
            lambda: load_policy(cfg),
            lambda tok: load_datasets(cfg, tok, unpaired=LOSSES[cfg.loss.loss].unpaired),
        )
        self.reference = self._build_reference()

    # ---- setup -------------------------------------------------------------------------------
    def log_line(self, text: str) -> None:
        if not self.quiet:
            tqdm.write(f"[preftune] {text}")

    def warn(self, text: str) -> None:
        """What the user must see whatever `quiet` says: to stderr, from the main process."""
        if self.acc.is_main_process:
            tqdm.write(f"[preftune] warning: {text}", file=sys.stderr)

    def _build_reference(self):
        mode, why = choose_mode(
            self.cfg.train.reference,
            needs_reference=self.spec.needs_reference,
            needs_model=self.spec.needs_seq_kl or self.spec.unpaired,
            lora=self.cfg.model.lora,
        )
        self.reference_mode = mode
        self.log_line(f"reference: {mode} — {why}")
        if mode == "none":
            return None
        if mode == "frozen" and self.sharding.enabled:  # sharded too, never whole per process
            frozen = self.sharding.shard_frozen(self._load_frozen())
            return ModelReference(frozen, "same", self.cfg.train.chunk_size)
        if mode in ("frozen", "lora"):
            return ModelReference(self.policy, mode, self.cfg.train.chunk_size)
        with self.sharding.gathered():  # each process its share of the batches
            return CachedReference(self._precompute())

    def _load_frozen(self):
        """The reference under FSDP2: the policy's starting weights, loaded again (a sharded
        policy cannot be copied), frozen."""
        m = self.cfg.model
        model = load_causal_lm(m.model, dtype=getattr(torch, m.dtype), trust_remote_code=m.trust_remote_code)  # fmt: skip
        return model.to(self.acc.device).eval().requires_grad_(False)

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
    def _share_prompt(self) -> tuple[bool | str, int]:
        """(share_prompt as the batch builders take it, the model width its cost model uses);
        `auto` is off for hybrid models, whose recurrent / convolution layers would see the
        other branch."""
        share = {"true": True, "false": False}.get(self.cfg.train.share_prompt, "auto")
        config = self.policy.config
        if share == "auto" and not attention_only(config):
            share = False
        return share, getattr(config, "hidden_size", 1024)

    def _pair_batch(self, examples, idx):
        t = self.cfg.train
        share, width = self._share_prompt
        # under gradient checkpointing the engine lays a shared prefix out in the rows of a
        # training step (logps.hidden_at_targets); passes without gradients still share it
        return pair_batch(
            examples,
            idx,
            self.tokenizer.pad_token_id,
            t.packed,
            share,
            width,
            t.share_prefix,
            t.share_completion_prefix,
        )

    # ---- one micro-batch -----------------------------------------------------------------------
    def run_policy(self, fn, *args):
        """`fn(policy, *args)`, one of the engine's functions. A forward with gradients goes
        through the prepared module, so a wrapper (DDP) sees it; one without (evaluation, the
        reference precompute, KTO's KL estimate) calls the bare model: no wrapper collective,
        which processes with unequal shares of the eval set would wait on for ever. So every
        forward with gradients must be followed by its backward in the same step (DDP expects
        the gradients of each forward it saw)."""
        if torch.is_grad_enabled():
            return self.engine(fn, *args)
        return fn(self.policy, *args)

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

    def _loss(self, examples, idx, reference, train: bool, kl=None):
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

    # ---- one optimizer step ----------------------------------------------------------------------
    def train_step(self, batch_idx: list[int]) -> dict:
        t, P = self.cfg.train, self.acc.num_processes
        micro = micro_batches(batch_idx, self.acc.process_index, P, t.grad_accum)
        rec: dict[str, list] = {k: [] for k in ("loss", "chosen", "rejected", "lp_c", "lp_r")}
        extra: dict[str, list] = {}
        kl = None
        if self.spec.unpaired:
            with self.sharding.gathered():
                kl = self.step_kl(batch_idx)

        def micro_loss(idx):
            out, logps, n = self._loss(self.data.train, idx, self.reference, True, kl)
            self._record(rec, extra, out, logps)
            return out.losses.sum(), n

        step = self.stepper.run(self.step + 1, micro, micro_loss, len(batch_idx))
        metrics = self._summarise(self._gather_rec(rec), self._gather_rec(extra))
        metrics.update(step)
        return metrics

    def _record(self, rec, extra, out, logps) -> None:
        """This process's per-example values of a micro-batch; `_gather_rec` collects them
        from every process once per step (their sizes may differ: KTO's chosen / rejected)."""
        rec["loss"].append(out.losses.detach())
        rec["chosen"].append(out.chosen_rewards.detach())
        rec["rejected"].append(out.rejected_rewards.detach())
        if isinstance(logps, PreferenceLogps):
            rec["lp_c"].append(logps.policy_chosen_logps.detach())
            rec["lp_r"].append(logps.policy_rejected_logps.detach())
            if logps.ref_chosen_logps is not None:  # per pair, averaged over all pairs of the step
                for k, v in pair_diagnostics(
                    logps.policy_chosen_logps, logps.policy_rejected_logps,
                    logps.ref_chosen_logps, logps.ref_rejected_logps,
                    logps.chosen_lengths, logps.rejected_lengths,
                ).items():  # fmt: skip
                    rec.setdefault(k, []).append(v.detach())
        for k, v in out.metrics.items():
            extra.setdefault(k, []).append(
                torch.as_tensor(v, dtype=torch.float32).detach().reshape(-1)
            )

    # ---- metrics that hold under several processes with different batch sizes ---------------
    def _gather_list(self, values: list) -> list:
        if self.acc.num_processes == 1:
            return list(values)
        return gather_object(list(values))

    def _gather_rec(self, rec: dict[str, list]) -> dict[str, list]:
        """Each key's values from every process, as one CPU tensor (or none), in one collective
        whatever keys each process has (an idle online process has none)."""
        local = {
            k: torch.cat([p.reshape(-1).float().cpu() for p in parts]).tolist()
            for k, parts in rec.items()
            if parts
        }
        merged: dict[str, list] = {k: [] for k in rec}
        for part in self._gather_list([local]):
            for k, values in part.items():
                merged.setdefault(k, []).extend(values)
        return {k: [torch.tensor(v)] if v else [] for k, v in merged.items()}

    def _gmean(self, values: torch.Tensor | list) -> float:
        local = values.reshape(-1).float().tolist() if torch.is_tensor(values) else list(values)
        values = self._gather_list(local)
        return sum(values) / len(values) if values else float("nan")

    @staticmethod
    def _summarise(rec, extra, prefix: str = "") -> dict:
        m = {
            "loss": _mean(rec["loss"]),
            "rewards/chosen": _mean(rec["chosen"]),
            "rewards/rejected": _mean(rec["rejected"]),
        }
        if (
            rec["chosen"]
            and rec["rejected"]
            and len(torch.cat(rec["chosen"])) == len(torch.cat(rec["rejected"]))
        ):
            c, r = torch.cat(rec["chosen"]), torch.cat(rec["rejected"])
            m["rewards/margins"] = float((c - r).mean())
            m["rewards/accuracies"] = float((c > r).float().mean())
        if rec["lp_c"]:
            m["logps/chosen"], m["logps/rejected"] = _mean(rec["lp_c"]), _mean(rec["lp_r"])
        for k, v in rec.items():
            if "/" in k:  # diagnostics.pair_diagnostics: already per pair, named as logged
                m[k] = _mean(v)
        for k, v in extra.items():
            m[k] = _mean(v)
        return {prefix + k: v for k, v in m.items()}

    # ---- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_pairs(self) -> dict:
        if not self.data.eval:
            return {}
        reference = getattr(self, "eval_reference", self.reference)
        rec: dict[str, list] = {k: [] for k in ("loss", "chosen", "rejected", "lp_c", "lp_r")}
        extra: dict[str, list] = {}
        size = max(2, self.cfg.train.batch_size // self.cfg.train.grad_accum)
        was = self.policy.training
        self.policy.eval()
        mine = list(range(self.acc.process_index, len(self.data.eval), self.acc.num_processes))
        ref_segments = read_segment_table(self.run_dir / SEGMENTS_FILE, len(self.data.eval))
        changes: dict[str, list] = {}
        for s in range(0, len(mine), size):
            idx = mine[s : s + size]
            if self.spec.unpaired and len(idx) < 2:
                continue
            out, logps, _ = self._loss(self.data.eval, idx, reference, train=False)
            self._record(rec, extra, out, logps)
            if ref_segments is not None:  # one extra no-grad forward of the batch (evaluate.py)
                pol, shared = pair_segment_sums(
                    self.policy, self.data.eval, idx, self._pair_batch, self.cfg.train.chunk_size
                )
                ref = ref_segments[idx].transpose(0, 1).reshape(-1, 3)  # [chosen; rejected]
                for k, v in segment_changes(pol, ref, shared).items():
                    changes.setdefault(k, []).append(v)
        self.policy.train(was)
        metrics = self._summarise(self._gather_rec(rec), self._gather_rec(extra), prefix="eval/")
        # gathered once, whatever number of eval batches each process had
        cat = {k: v[0] for k, v in self._gather_rec(changes).items() if v}
        if cat:
            metrics.update({f"eval/{k}": v for k, v in summarise_segments(cat).items()})
        return metrics

    # ---- samples and the reference's segment sums, written before training and after ---------
    @torch.no_grad()
    def write_samples(self, tag: str) -> None:
        """Greedy completions of a few held-out prompts (`greedy_{tag}.json`, any data set) and,
        before training (policy == reference), the held-out pairs' reference segment sums that
        evaluate_pairs subtracts; both on disk, so a resumed run keeps them."""
        model = self.policy
        if self.acc.is_main_process and model.can_generate():
            was = self.policy.training
            self.policy.eval()
            exs, t = self.data.eval, self.cfg.train
            samples = greedy_samples(
                model, self.tokenizer, exs or self.data.train, self.cfg.eval.eval_max_new_tokens
            )
            write_json(self.run_dir / f"greedy_{tag}.json", samples)
            if tag == "before" and self.reference is not None and has_shared_prefixes(exs):
                size = max(2, t.batch_size // t.grad_accum)
                table = segment_table(model, exs, self._pair_batch, size, t.chunk_size)
                write_json(self.run_dir / SEGMENTS_FILE, table.tolist())
            self.policy.train(was)
        self.acc.wait_for_everyone()  # the others read the segment file in evaluate_pairs

    def task_accuracy(self, tag: str) -> tuple[float | None, list]:
        if not self.data.task_problems:
            return None, []
        from preftune.evaluate import task_accuracy

        e = self.cfg.eval
        acc, samples = task_accuracy(
            self.policy,
            self.tokenizer,
            self.data.task_problems,
            self.data.verify,
            e.eval_max_new_tokens,
            e.eval_batch_size,
            desc=f"task accuracy ({tag})",
            quiet=self.quiet,
        )
        return acc, samples

    # ---- state ------------------------------------------------------------------------------------
    def state(self) -> dict:
        tensors = {"loss_state": self.loss_state}
        if self.calibration is not None:
            tensors["calibration"] = self.calibration.state_dict()
        # the thread count is part of what makes a resumed run bit-equal: other counts sum in
        # another order on some CPUs (loop._resume warns when it differs)
        return {
            "step": self.step,
            "loss": self.cfg.loss.loss,
            "torch_threads": torch.get_num_threads(),
            "guard": self.guard.state_dict(),
            "config": training_keys(self.cfg),  # rundir.check_same_training reads it
            "tensors": tensors,
        }

    def load_state(self, state: dict) -> None:
        self.step = state["step"]
        self.guard.load_state_dict(state.get("guard", {}))
        self.loss_state = state["tensors"].get("loss_state")
        if self.calibration is not None and "calibration" in state["tensors"]:
            self.calibration.load_state_dict(state["tensors"]["calibration"])

    def save(self) -> Path | None:
        """A checkpoint of the run (every process calls this: each one's generators go in)."""
        if self.sharding.enabled:  # each process writes its shard
            return save_sharded(
                self.acc, self.run_dir / "checkpoints", self.step, self.engine, self.optimizer,
                self.scheduler, self.state(), self.cfg.train.keep_checkpoints,
            )  # fmt: skip
        rngs = [ckpt.rng_state()]
        if self.acc.num_processes > 1:
            rngs = gather_object(rngs)
        if not self.acc.is_main_process:
            return None
        return ckpt.save_checkpoint(
            self.run_dir / "checkpoints",
            self.step,
            self.policy,
            self.optimizer,
            self.scheduler,
            self.state(),
            self.cfg.train.keep_checkpoints,
            rngs,
        )


def train(config=None, overrides=None) -> TrainResult:
    """Train with `config` (a Config, a dict, a YAML path or None for the defaults) plus
    `overrides` (['key=value', ...] or a dict). Returns the run directory and final metrics."""
    from preftune.train.loop import run

    return run(Trainer(resolve(config, overrides)))


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))
