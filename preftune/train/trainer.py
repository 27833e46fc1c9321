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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from preftune.allocator import keep_freed_memory
from preftune.calibrate import BetaCalibration
from preftune.config import Config, build_config
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
from preftune.models import cache_dir
from preftune.train import checkpoint as ckpt
from preftune.train.batches import (
    example_lengths,
    length_sorted_batches,
    micro_batches,
    pair_batch,
    unpaired_batch,
)
from preftune.train.in_backward import StepInBackward
from preftune.train.reference import (
    CachedReference,
    ModelReference,
    cache_key,
    choose_mode,
    load_or_compute_cache,
)
from preftune.train.setup import (
    Datasets,
    TrainingError,
    build_optimizer,
    create_optimizer_state,
    load_datasets,
    load_policy,
    run_dir_for,
    trackers,
)


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict


def place_for_training(acc, policy, optimizer):
    """The policy on the accelerator's device, NOT wrapped in DistributedDataParallel:
    preftune.logps calls the decoder and head submodules directly (prompt tokens get no head
    work), so DDP's forward would never run and its reducer never average anything. Gradients
    are averaged explicitly by Trainer._sync_gradients, once per optimizer step (so gradient
    accumulation needs no no_sync)."""
    policy.to(acc.device)
    return policy, acc.prepare(optimizer)


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
    trainer.run_dir = run_dir_for(cfg)
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    trainer.acc = Accelerator(
        log_with=trackers(cfg) or None,
        project_dir=str(trainer.run_dir),
        mixed_precision="bf16" if cfg.train.bf16 else "no",
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
    trainer.optimizer, trainer.scheduler = build_optimizer(cfg, trainer.policy, trainer.total_steps)
    trainer.policy, trainer.optimizer = place_for_training(
        trainer.acc, trainer.policy, trainer.optimizer
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
    trainer.calibration = (
        BetaCalibration(**cfg.loss.beta_calibration) if cfg.loss.beta_calibration else None
    )
    trainer.loss_state = trainer.spec.init_state() if trainer.spec.stateful else None
    trainer.step = 0


class Trainer:
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
        if mode in ("frozen", "lora"):
            return ModelReference(
                self.acc.unwrap_model(self.policy), mode, self.cfg.train.chunk_size
            )
        return CachedReference(self._precompute())

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
            table, reused = load_or_compute_cache(
                path, lambda ex=examples, s=split: self._reference_table(ex, s)
            )
            self.log_line(
                f"reference log-probs ({split}): {'reused cache' if reused else 'computed and cached'} {path.name}"
            )
            tables[split] = table
            self.cache_reused[split] = reused
        self.eval_reference = CachedReference(tables["eval"])
        return tables["train"]

    @torch.no_grad()
    def _reference_table(self, examples: list[dict], split: str) -> dict[str, torch.Tensor]:
        model = ModelReference(
            self.acc.unwrap_model(self.policy),
            "lora" if self.cfg.model.lora else "same",
            self.cfg.train.chunk_size,
        )
        chosen = torch.zeros(len(examples), dtype=torch.float64)
        rejected = torch.zeros(len(examples), dtype=torch.float64)
        # no gradients: length-sorted batches of PRECOMPUTE_TOKENS, not the training batches
        for idx in tqdm(
            length_sorted_batches(example_lengths(examples)),
            desc=f"reference log-probs ({split})",
            disable=self.quiet,
            leave=False,
        ):
            batch = self._pair_batch(examples, idx)
            with self.acc.autocast():
                lp = model.logps(batch.tokens.to(self.acc.device)).double().cpu()
            chosen[idx], rejected[idx] = lp[: len(idx)], lp[len(idx) :]
        return {"chosen": chosen, "rejected": rejected}

    @functools.cached_property
    def _share_prompt(self) -> tuple[bool | str, int]:
        """(share_prompt as the batch builders take it, the model width its cost model uses);
        `auto` is off for hybrid models, whose recurrent / convolution layers would see the
        other branch."""
        share = {"true": True, "false": False}.get(self.cfg.train.share_prompt, "auto")
        config = self.acc.unwrap_model(self.policy).config
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
    def _paired_logps(self, examples, idx, reference) -> tuple[PreferenceLogps, int]:
        b = self._pair_batch(examples, idx)
        tokens = b.tokens.to(self.acc.device)
        n = len(idx)
        kl = None
        if self.spec.needs_seq_kl:
            ref_hidden = reference.hidden(tokens)
            pol, kl = sequence_logps_and_kl(
                self.policy, reference.head_model(), tokens, ref_hidden, self.cfg.train.chunk_size
            )
        else:
            pol = sequence_logps(self.policy, tokens, self.cfg.train.chunk_size)
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

    def _unpaired_logps(self, examples, idx, reference) -> tuple[UnpairedLogps, int]:
        b = unpaired_batch(
            examples, idx, self.tokenizer.pad_token_id, self.cfg.train.packed,
            self.cfg.train.share_prefix,
        )
        tokens, kl_tokens = b.tokens.to(self.acc.device), b.kl_tokens.to(self.acc.device)
        pol = sequence_logps(self.policy, tokens, self.cfg.train.chunk_size)
        with torch.no_grad():  # KTO's z0 is a detached estimate (METHODS.md §12)
            kl_pol = sequence_logps(self.policy, kl_tokens, self.cfg.train.chunk_size)
        logps = UnpairedLogps(
            policy_logps=pol,
            ref_logps=reference.logps(tokens).to(pol),
            labels=b.labels.to(pol.device),
            kl_policy_logps=kl_pol,
            kl_ref_logps=reference.logps(kl_tokens).to(pol),
            lengths=b.lengths.to(pol.device),
        )
        return logps, b.num_tokens

    def _loss(self, examples, idx, reference, train: bool):
        with self.acc.autocast():
            build = self._unpaired_logps if self.spec.unpaired else self._paired_logps
            logps, ntok = build(examples, idx, reference)
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
        t = self.cfg.train
        P = self.acc.num_processes
        micro = micro_batches(batch_idx, self.acc.process_index, P, t.grad_accum)
        rec: dict[str, list] = {k: [] for k in ("loss", "chosen", "rejected", "lp_c", "lp_r")}
        extra: dict[str, list] = {}
        ntok = 0
        start = time.perf_counter()
        for i, idx in enumerate(micro):
            out, logps, n = self._loss(self.data.train, idx, self.reference, train=True)
            # local sum over the global batch size; x P because the gradients are then averaged
            # over processes
            loss = out.losses.sum() * P / len(batch_idx)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss ({loss.item()}) at step {self.step + 1}, micro-batch {i} "
                    f"(examples {idx[:4]}...); step refused, last checkpoint kept"
                )
            self.acc.backward(loss)
            ntok += n
            self._record(rec, extra, out, logps)
        self._sync_gradients()
        grad_norm = self._clip_and_check()
        lr = self.scheduler.get_last_lr()[0]  # the lr this step uses; scheduler.step() moves it on
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        metrics = self._summarise(rec, extra)
        metrics.update(
            {
                "grad_norm": grad_norm,
                "lr": lr,
                "tokens_per_second": ntok * P / elapsed,
                "step_time": elapsed,
            }
        )
        return metrics

    def _sync_gradients(self, bucket_elems: int = 1 << 24) -> None:
        """Average gradients over processes: flattened into buckets (one all-reduce per ~64 MB
        of fp32, not one per tensor), reduced, divided by the process count, copied back."""
        P = self.acc.num_processes
        if P == 1:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        params = [p for p in self.policy.parameters() if p.requires_grad]
        for p in params:  # every process must send every tensor, trained this step or not
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        start = 0
        while start < len(grads):
            end, size = start, 0
            while end < len(grads) and (end == start or size + grads[end].numel() <= bucket_elems):
                size += grads[end].numel()
                end += 1
            flat = _flatten_dense_tensors(grads[start:end])
            dist.all_reduce(flat)
            flat.div_(P)
            for g, reduced in zip(grads[start:end], _unflatten_dense_tensors(flat, grads[start:end])):
                g.copy_(reduced)
            start = end

    def _clip_and_check(self) -> float:
        if self.in_backward is not None:  # updated, checked and freed in backward already
            return self.in_backward.finish()
        params = [p for p in self.policy.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not torch.isfinite(norm):
            raise TrainingError(
                f"non-finite gradient norm at step {self.step + 1}; step refused, the last "
                f"checkpoint is intact. Lower lr, or check the data around this step."
            )
        max_norm = self.cfg.train.max_grad_norm
        # clip_grad_norm_'s rule (scale by max_norm / (norm + 1e-6) where that is below 1),
        # without its pass over every gradient multiplying by exactly 1.0 when it is not
        if max_norm and max_norm / (float(norm) + 1e-6) < 1.0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    def _record(self, rec, extra, out, logps) -> None:
        g = self.acc.gather
        rec["loss"].append(g(out.losses.detach()))
        rec["chosen"].append(g(out.chosen_rewards.detach()))
        rec["rejected"].append(g(out.rejected_rewards.detach()))
        if isinstance(logps, PreferenceLogps):
            rec["lp_c"].append(g(logps.policy_chosen_logps.detach()))
            rec["lp_r"].append(g(logps.policy_rejected_logps.detach()))
            if logps.ref_chosen_logps is not None:  # per pair, averaged over all pairs of the step
                for k, v in pair_diagnostics(
                    logps.policy_chosen_logps, logps.policy_rejected_logps,
                    logps.ref_chosen_logps, logps.ref_rejected_logps,
                    logps.chosen_lengths, logps.rejected_lengths,
                ).items():
                    rec.setdefault(k, []).append(g(v))
        for k, v in out.metrics.items():
            extra.setdefault(k, []).append(
                torch.as_tensor(v, dtype=torch.float32).detach().reshape(-1)
            )

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
                    changes.setdefault(k, []).append(self.acc.gather(v))
        self.policy.train(was)
        metrics = self._summarise(rec, extra, prefix="eval/")
        if changes:
            cat = {k: torch.cat(v) for k, v in changes.items()}
            metrics.update({f"eval/{k}": v for k, v in summarise_segments(cat).items()})
        return metrics

    # ---- samples and the reference's segment sums, written before training and after ---------
    @torch.no_grad()
    def write_samples(self, tag: str) -> None:
        """Greedy completions of a few held-out prompts (`greedy_{tag}.json`, any data set) and,
        before training (policy == reference), the held-out pairs' reference segment sums that
        evaluate_pairs subtracts; both on disk, so a resumed run keeps them."""
        model = self.acc.unwrap_model(self.policy)
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
            self.acc.unwrap_model(self.policy),
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
            "tensors": tensors,
        }

    def load_state(self, state: dict) -> None:
        self.step = state["step"]
        self.loss_state = state["tensors"].get("loss_state")
        if self.calibration is not None and "calibration" in state["tensors"]:
            self.calibration.load_state_dict(state["tensors"]["calibration"])

    def save(self) -> Path | None:
        if not self.acc.is_main_process:
            return None
        return ckpt.save_checkpoint(
            self.run_dir / "checkpoints",
            self.step,
            self.acc.unwrap_model(self.policy),
            self.optimizer,
            self.scheduler,
            self.state(),
            self.cfg.train.keep_checkpoints,
        )


def train(config=None, overrides=None) -> TrainResult:
    """Train with `config` (a Config, a dict, a YAML path or None for the defaults) plus
    `overrides` (['key=value', ...] or a dict). Returns the run directory and final metrics."""
    from preftune.train.loop import run

    cfg = build_config(config, overrides)
    if cfg.train.resume:
        saved = Path(cfg.train.resume) / "config.yaml"
        if not saved.exists():
            raise TrainingError(
                f"resume={cfg.train.resume}: no config.yaml there; is it a preftune run directory?"
            )
        extra = dict(overrides) if isinstance(overrides, dict) else {}
        if not isinstance(overrides, dict):
            for item in overrides or []:
                k, v = item.split("=", 1)
                extra[k.strip().lstrip("-").replace("-", "_")] = v
        import yaml

        base = yaml.safe_load(saved.read_text())
        base.update({k: (yaml.safe_load(v) if isinstance(v, str) else v) for k, v in extra.items()})
        base["resume"] = cfg.train.resume
        cfg = build_config(base)
    return run(Trainer(cfg))


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))
