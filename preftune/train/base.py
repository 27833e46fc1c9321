"""What every trainer shares: the run's setup (run directory, accelerate, model, data, optimizer,
the step engine), one optimizer step over micro-batches, metrics gathered across processes,
held-out evaluation, checkpoints.

A trainer says how to load its model and data (`load_model`, `load_data`) and how to score one
micro-batch (`_loss`): the offline preference `Trainer` (train/trainer.py), the online trainers
(train/online_dpo.py, train/remax.py) and the reward-model trainer (train/reward.py). The one
loop (train/loop.py) drives them all.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from tqdm.auto import tqdm

from preftune.allocator import keep_freed_memory
from preftune.calibrate import BetaCalibration
from preftune.config import Config
from preftune.diagnostics import summarise_segments
from preftune.evaluate import (
    SEGMENTS_FILE,
    TRAIN_SEGMENTS_FILE,
    read_segment_table,
    segment_changes_of,
    task_accuracy,
    train_probe,
)
from preftune.losses import LOSSES
from preftune.precision import settle_bf16
from preftune.train import checkpoint as ckpt
from preftune.train.batches import example_lengths, micro_batches
from preftune.train.deepspeed import (
    ZeroSharding,
    accelerator_kwargs,
    deepspeed_requested,
    start_processes,
    zero_stage,
)
from preftune.train.guards import DivergenceGuard
from preftune.train.in_backward import StepInBackward
from preftune.train.metrics import record, summarise
from preftune.train.rundir import claim_once, training_keys
from preftune.train.setup import (
    Datasets,
    TrainingError,
    build_optimizer,
    check_before_loading,
    create_optimizer_state,
    trackers,
)
from preftune.train.sharding import Sharding, fsdp_requested
from preftune.train.step import StepEngine, place_for_training, wrapped


class BaseTrainer:
    """The run's plumbing; subclasses implement `load_model`, `load_data` and `_loss`."""

    method: str | None = None  # names default run directories (the loss's name when None)
    reference = None  # what `_loss` compares the policy with (None: nothing)
    eval_reference = None  # the held-out pairs' reference, where it differs from `reference`

    def __init__(self, cfg: Config):
        """Check, claim the run directory, then set everything up; a run that fails before it
        starts leaves its folder as it found it."""
        self.cfg = cfg
        self.spec = LOSSES[cfg.loss.loss]
        # DeepSpeed on CPUs: the gloo group, before anything counts processes
        self._launch_note = start_processes()
        if not cfg.train.resume:  # a resumed run's own config.yaml was checked when it started
            check_before_loading(cfg)
        self.precision = settle_bf16(cfg)  # bf16=auto decided before config.yaml is written
        self.rundir = claim_once(cfg, self.method or cfg.loss.loss)
        self.run_dir = self.rundir.path
        try:
            self._setup(cfg)
        except BaseException:
            self.rundir.release()
            raise

    @property
    def label(self) -> str:
        """What the run trains, as its log lines name it."""
        return self.method or self.cfg.loss.loss

    def load_model(self) -> tuple:
        """(model, tokenizer, model path)."""
        raise NotImplementedError

    def load_data(self, tokenizer) -> Datasets:
        """The data; its `train` list is what `loop.run` batches over."""
        raise NotImplementedError

    def _loss(self, examples, idx, reference, train: bool, context=None):
        """(LossOutput, log-probs or None, real tokens) of examples[idx]."""
        raise NotImplementedError

    def step_context(self, batch_idx: list[int]):
        """What every micro-batch of a step needs from the whole step (KTO's KL pairs)."""
        return None

    def _setup(self, cfg: Config) -> None:
        ds = accelerator_kwargs(cfg)  # DeepSpeed's plugin, where the launch asks for it
        self.acc = Accelerator(
            log_with=trackers(cfg) or None,
            project_dir=str(self.run_dir),
            mixed_precision="bf16" if cfg.train.bf16 else "no",
            # buffers (rotary tables) are equal everywhere: no broadcast, which would also make
            # every forward a collective
            kwargs_handlers=[
                DistributedDataParallelKwargs(broadcast_buffers=False),
                *ds.pop("kwargs_handlers", []),
            ],
            **ds,
        )
        # the engine the launch asks for, decided once
        if deepspeed_requested():
            self.sharding = ZeroSharding(zero_stage())
        else:
            self.sharding = Sharding(fsdp_requested(self.acc))
        self._check_engine()
        torch.manual_seed(cfg.train.seed)
        self.quiet = cfg.train.quiet or not self.acc.is_main_process
        self.log_line(self.precision.line)
        if self._launch_note:
            self.log_line(self._launch_note)
        if cfg.train.keep_freed_memory and (done := keep_freed_memory()):
            self.log_line(f"allocator: {done}")
        self.policy, self.tokenizer, self.model_path = self.load_model()
        self.data = self.load_data(self.tokenizer)
        for note in self.data.notes:
            self.log_line(f"note: {note}")
        t = cfg.train
        self.per_epoch = len(self.data.train) // t.batch_size
        if self.per_epoch == 0:
            raise TrainingError(
                f"{len(self.data.train)} training examples are fewer than batch_size={t.batch_size}"
            )
        self.total_steps = t.max_steps or self.per_epoch * t.epochs
        self.lengths = example_lengths(self.data.train) if t.group_by_length else None
        if t.batch_size % (self.acc.num_processes * t.grad_accum):
            raise TrainingError(
                f"batch_size={t.batch_size} must split evenly over {self.acc.num_processes} "
                f"processes x grad_accum={t.grad_accum}"
            )
        self._setup_step(cfg)
        self.calibration = (
            BetaCalibration(**cfg.loss.beta_calibration) if cfg.loss.beta_calibration else None
        )
        self.loss_state = self.spec.init_state() if self.spec.stateful else None
        self.guard = DivergenceGuard(t.divergence_factor)
        self.step = 0

    def _check_engine(self) -> None:
        """What a trainer refuses under the launch's engine or its settings, before the model
        and data load (inside the run directory's claim: a refusal releases it)."""

    def _setup_step(self, cfg: Config) -> None:
        """Optimizer, schedule, the prepared engine module and the step engine."""
        t = cfg.train

        def build():
            self.optimizer, self.scheduler = build_optimizer(cfg, self.policy, self.total_steps)
            return self.optimizer

        self.policy, self.engine, self.optimizer = place_for_training(
            self.acc, self.policy, self.sharding, build
        )
        self._say_engine()
        create_optimizer_state(self.optimizer)  # before the precompute and the first step
        self.in_backward = None
        if t.optimizer_in_backward:
            if self.acc.num_processes > 1:
                raise TrainingError(
                    f"optimizer_in_backward needs one process (this run has "
                    f"{self.acc.num_processes}): each update must see the gradient averaged over "
                    f"all of them. Run one process, or set optimizer_in_backward=false."
                )
            self.in_backward = StepInBackward(
                self.policy, self.optimizer, step=lambda: self.step + 1
            )
        self.stepper = StepEngine(
            self.acc,
            self.engine,
            self.optimizer,
            self.scheduler,
            t.max_grad_norm,
            self.in_backward,
            sharding=self.sharding,
        )

    def _say_engine(self) -> None:
        """One line on what synchronises the gradients, and why the engine's fast paths are off."""
        if isinstance(self.sharding, ZeroSharding):
            self.log_line(
                f"{self.sharding.name}: optimizer state"
                f"{', gradients and parameters' if self.sharding.stage == 3 else ' and gradients'} "
                f"partitioned over the "
                f"processes, reduced, clipped and stepped by the DeepSpeed engine; the engine's "
                f"gradient fast paths (embedding and LM-head gradients written into .grad) are "
                f"off: DeepSpeed would not see them"
            )
        elif self.sharding.enabled:
            self.log_line(
                "FSDP2: parameters, gradients and optimizer state sharded per decoder layer "
                "(fully_shard), gradients reduce-scattered by FSDP; the engine's gradient fast "
                "paths (embedding and LM-head gradients written into .grad) are off: they cannot "
                "write into sharded gradients"
            )
        elif wrapped(self.acc):
            self.log_line(
                f"{self.acc.distributed_type.value}: gradients averaged by the wrapper; the "
                f"engine's gradient fast paths (embedding and LM-head gradients written into .grad) "
                f"are off, since the wrapper would not see them"
            )

    # ---- output ------------------------------------------------------------------------------
    def log_line(self, text: str) -> None:
        if not self.quiet:
            tqdm.write(f"[preftune] {text}")

    def warn(self, text: str) -> None:
        """What the user must see whatever `quiet` says: to stderr, from the main process."""
        if self.acc.is_main_process:
            tqdm.write(f"[preftune] warning: {text}", file=sys.stderr)

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

    # ---- one optimizer step ----------------------------------------------------------------------
    def train_step(self, batch_idx: list[int]) -> dict:
        t, P = self.cfg.train, self.acc.num_processes
        micro = micro_batches(batch_idx, self.acc.process_index, P, t.grad_accum)
        rec: dict[str, list] = {k: [] for k in ("loss", "chosen", "rejected", "lp_c", "lp_r")}
        extra: dict[str, list] = {}
        context = self.step_context(batch_idx)

        def micro_loss(idx):
            out, logps, n = self._loss(self.data.train, idx, self.reference, True, context)
            record(rec, extra, out, logps)
            return out.losses.sum(), n

        step = self.stepper.run(self.step + 1, micro, micro_loss, len(batch_idx))
        metrics = summarise(self._gather_rec(rec), self._gather_rec(extra))
        metrics.update(step)
        return metrics

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

    # ---- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_pairs(self) -> dict:
        if not self.data.eval:
            return {}
        reference = self.eval_reference or self.reference
        rec: dict[str, list] = {k: [] for k in ("loss", "chosen", "rejected", "lp_c", "lp_r")}
        extra: dict[str, list] = {}
        size = max(2, self.cfg.train.batch_size // self.cfg.train.grad_accum)
        was = self.policy.training
        self.policy.eval()
        mine = self._share(len(self.data.eval))
        for s in range(0, len(mine), size):
            idx = mine[s : s + size]
            if self.spec.unpaired and len(idx) < 2:
                continue
            out, logps, _ = self._loss(self.data.eval, idx, reference, train=False)
            record(rec, extra, out, logps)
        metrics = summarise(self._gather_rec(rec), self._gather_rec(extra), prefix="eval/")
        for tag, exs, name in (
            ("eval", self.data.eval, SEGMENTS_FILE),
            ("train", train_probe(self.data.train), TRAIN_SEGMENTS_FILE),
        ):
            metrics.update(self._segment_metrics(tag, exs, name, size))
        self.policy.train(was)
        return metrics

    def _segment_metrics(self, tag: str, exs: list[dict], name: str, size: int) -> dict:
        """{tag}/segments/* of `exs` against the reference's table (one forward per batch)."""
        table, changes = read_segment_table(self.run_dir / name, len(exs)), {}
        if table is not None:
            mine, chunk = self._share(len(exs)), self.cfg.train.chunk_size
            changes = segment_changes_of(
                self.policy, exs, table, mine, self._pair_batch, size, chunk
            )
        cat = {k: v[0] for k, v in self._gather_rec(changes).items() if v}  # on every process
        return {f"{tag}/{k}": v for k, v in summarise_segments(cat).items()} if cat else {}

    def _share(self, n: int) -> list[int]:  # this process's indices of n evaluated examples
        return list(range(self.acc.process_index, n, self.acc.num_processes))

    def write_samples(self, tag: str) -> None:
        """Samples of the model before and after training, where it generates (Trainer)."""

    def task_accuracy(self, tag: str) -> tuple[float | None, list]:
        if not self.data.task_problems:
            return None, []
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
        if self.sharding.enabled:  # each process writes its shard (FSDP2, DeepSpeed ZeRO)
            return self.sharding.save_checkpoint(
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
