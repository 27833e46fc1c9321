"""The run, top to bottom: resume, evaluate before, train with a progress bar, evaluate and
checkpoint on schedule, save the final model, evaluate after, write the summary and report.

Training that diverges (train/guards.py) stops with its checkpoints from the step before the
divergence on moved aside, and the summary and report of what ran are written all the same.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from preftune.config import ConfigError
from preftune.models import progress_bars
from preftune.report import write_report
from preftune.train import checkpoint as ckpt
from preftune.train.base import BaseTrainer
from preftune.train.batches import global_batches
from preftune.train.checkpoint import write_json
from preftune.train.guards import DivergedError, quarantine
from preftune.train.rundir import check_same_training, save_config


def _log(trainer: BaseTrainer, metrics: dict, step: int) -> None:
    if not trainer.acc.is_main_process:
        return
    with open(trainer.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    trainer.acc.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=step)


def _apply_schedule(trainer: BaseTrainer) -> None:
    """After a resume, the optimizer's lr from this run's schedule at the checkpoint's step:
    the same value when nothing changed, the new one when `lr`, `max_steps` or `epochs` did
    (rundir.resume_config has said so)."""
    sched, lr = trainer.scheduler, trainer.cfg.train.lr
    sched.base_lrs = [lr] * len(sched.base_lrs)
    factors = [f(sched.last_epoch) for f in sched.lr_lambdas]
    for group, f in zip(trainer.optimizer.param_groups, factors):
        group["lr"] = lr * f
    sched._last_lr = [g["lr"] for g in trainer.optimizer.param_groups]


def _from_main(trainer: BaseTrainer, box: list):
    """The main process's `box[0]`, on every process."""
    if trainer.acc.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    return box[0]


def _resume(trainer: BaseTrainer) -> None:
    _refuse_finished(trainer)
    root = trainer.run_dir / "checkpoints"
    # the main process picks the checkpoint, so that every process resumes from the same one
    box = [ckpt.latest_checkpoint(root, log=trainer.warn) if trainer.acc.is_main_process else None]
    path = _from_main(trainer, box)
    if path is None and (trainer.run_dir / "final").exists():
        raise ConfigError(
            f"resume={trainer.run_dir}: the run has finished and kept no checkpoint to continue "
            f"from (set save_every to keep one); start a new run from its final/ model instead"
        )
    if trainer.acc.is_main_process:  # newer, unusable ones: kept aside, never pruned or reused
        moved, _ = quarantine(root, (ckpt.step_of(path) if path else 0) + 2, into="unusable")
        if moved:
            trainer.warn(f"moved {', '.join(moved)} to {root / 'unusable'}")
    if path is None:
        trainer.warn(f"resume: no complete checkpoint in {trainer.run_dir}; starting from step 0")
    else:
        load = (
            trainer.sharding.load_checkpoint if trainer.sharding.enabled else ckpt.load_checkpoint
        )
        state = load(
            path,
            trainer.engine if trainer.sharding.enabled else trainer.policy,
            trainer.optimizer,
            trainer.scheduler,
            trainer.acc.process_index,
            trainer.acc.num_processes,
        )
        if "config" in state:
            check_same_training(trainer.run_dir, state["config"], trainer.cfg)
        trainer.load_state(state)
        _apply_schedule(trainer)
        _warn_threads(trainer, path, state.get("torch_threads"))
    _truncate_metrics(trainer, trainer.step)
    if trainer.acc.is_main_process:  # the keys this resume applied, once it has succeeded
        save_config(trainer.cfg, trainer.run_dir)
    trainer.log_line(f"resumed from {path} at step {trainer.step}" if path else "resume: step 0")


def _refuse_finished(trainer: BaseTrainer) -> None:
    """A run that has finished is continued only with more steps: resuming it as it is would
    retrain its tail and rewrite its summary, final/ and config.yaml with what no step needed.
    Finished is what the run's last act says (summary.json's `finished`); a run stopped after
    final/ but before that (in the evaluation after) is resumed and finishes."""
    path = trainer.run_dir / "summary.json"
    summary = ckpt.json_object(path.read_text(errors="replace"))[0] if path.exists() else {}
    done, total = summary.get("steps", 0), trainer.total_steps
    if summary.get("finished") is True and done >= total:
        raise ConfigError(
            f"resume={trainer.run_dir}: the run finished at step {done} of {total}, so there is "
            f"nothing to train; give more steps to continue it (e.g. max_steps={2 * total}) or "
            f"start a new run from its final/ model"
        )


def _warn_threads(trainer: BaseTrainer, path, saved: int | None) -> None:
    threads = torch.get_num_threads()
    if saved is not None and saved != threads:
        trainer.warn(
            f"{path} was written by a run with {saved} torch threads and this one has {threads}; "
            f"it continues, but not bit-equal to an uninterrupted run (set OMP_NUM_THREADS="
            f"{saved} for that)"
        )


def _truncate_metrics(trainer: BaseTrainer, step: int) -> None:
    """Metrics logged after the checkpoint belong to the lost part of the run: drop them."""
    if trainer.acc.is_main_process:
        ckpt.truncate_jsonl(trainer.run_dir / "metrics.jsonl", step, trainer.warn)


def _task_eval(trainer: BaseTrainer, summary: dict, tag: str) -> None:
    with trainer.sharding.gathered():  # generation on the main process only
        trainer.write_samples(tag)  # greedy_{tag}.json for any data set (and segment references)
        acc, samples = trainer.task_accuracy(tag)
    if acc is None:
        return
    summary[f"task/accuracy_{tag}"] = acc
    if trainer.acc.is_main_process:
        write_json(trainer.run_dir / f"samples_{tag}.json", samples[:32])
    trainer.log_line(f"held-out task accuracy {tag}: {acc:.1%} ({len(samples)} problems)")


def _start(trainer: BaseTrainer) -> dict:
    """Resume (if asked), evaluate before, say what will run; returns the summary so far."""
    cfg, t = trainer.cfg, trainer.cfg.train
    trainer.acc.init_trackers("preftune", config={k: str(v) for k, v in cfg.flat().items()})
    summary: dict = {}
    if t.resume:
        _resume(trainer)
        old = trainer.run_dir / "summary.json"
        before, problem = (
            ckpt.json_object(old.read_text(errors="replace")) if old.exists() else ({}, None)
        )
        if problem:
            trainer.warn(f"{old} is unreadable (a write cut short?); it will be written anew")
        # what the run said so far (accuracy before; the last step's metrics, which a resume
        # from a checkpoint at the last step does not log again), less how it ended
        stale = ("diverged", "finished")
        summary.update({k: v for k, v in before.items() if k not in stale})
    if trainer.step == 0 and cfg.eval.eval_before:
        _task_eval(trainer, summary, "before")
        if trainer.acc.is_main_process:
            write_json(trainer.run_dir / "summary.json", summary)
    n_dropped = len(trainer.data.train) - trainer.per_epoch * t.batch_size
    if n_dropped:
        trainer.log_line(
            f"note: {n_dropped} examples past the last full batch of each epoch are not used"
        )
    procs = trainer.acc.num_processes
    trainer.log_line(
        f"training {trainer.label} on {len(trainer.data.train)} examples: {trainer.total_steps} "
        f"steps of {t.batch_size} ({t.grad_accum} micro-batches"
        f"{f' in each of {procs} processes' if procs > 1 else ''}), run dir {trainer.run_dir}"
    )
    return summary


def _postfix(last: dict) -> dict:
    """What the progress bar shows: the loss, and the margin and accuracy where the method
    has them (KTO's unpaired steps have no margin)."""
    shown = {"loss": f"{last['loss']:.4f}"}
    for key, name, fmt in (
        ("rewards/margins", "margin", ".3f"),
        ("rewards/accuracies", "acc", ".2f"),
    ):
        v = last.get(key)
        if v is not None and math.isfinite(v):
            shown[name] = format(v, fmt)
    return shown


def _train(trainer: BaseTrainer) -> dict:
    """The steps, from `trainer.step` to the end; returns the last step's metrics."""
    t = trainer.cfg.train
    guard = trainer.guard
    bar = tqdm(
        total=trainer.total_steps,
        initial=trainer.step,
        desc="train",
        disable=trainer.quiet,
        dynamic_ncols=True,
    )
    last: dict = {}
    saved_at = time.monotonic()
    while trainer.step < trainer.total_steps:
        epoch, offset = divmod(trainer.step, trainer.per_epoch)
        batch = global_batches(
            len(trainer.data.train), t.batch_size, t.seed, epoch, trainer.lengths
        )[offset]
        last = trainer.train_step(batch)
        trainer.step += 1
        last["epoch"] = trainer.step / trainer.per_epoch
        if t.eval_every and trainer.step % t.eval_every == 0 and trainer.step < trainer.total_steps:
            with trainer.sharding.gathered():  # unequal shares of the held-out pairs
                last.update(trainer.evaluate_pairs())
        if trainer.step % t.log_every == 0 or trainer.step == trainer.total_steps:
            _log(trainer, last, trainer.step)
        guard.check(trainer.step, last.get("loss", float("nan")), last["grad_norm"])
        bar.update(1)
        bar.set_postfix(_postfix(last))
        due = t.save_every and trainer.step % t.save_every == 0
        if due or _late(trainer, saved_at):
            trainer.save()
            saved_at = time.monotonic()
    bar.close()
    return last


def _late(trainer: BaseTrainer, saved_at: float) -> bool:
    """Whether save_every_minutes have passed since the last checkpoint, as the main process's
    clock says: every process must take the same decision (a checkpoint gathers from all)."""
    minutes = trainer.cfg.train.save_every_minutes
    return _from_main(trainer, [bool(minutes) and time.monotonic() - saved_at >= 60 * minutes])


def _stop_diverged(trainer: BaseTrainer, summary: dict, err: DivergedError) -> None:
    """Move the suspect checkpoints aside, write the summary and report, and stop."""
    box = [None]
    if trainer.acc.is_main_process:
        box = [quarantine(trainer.run_dir / "checkpoints", err.first)]
    moved, left = _from_main(trainer, box)
    summary.update({"steps": trainer.step, "diverged": str(err), "run_dir": str(trainer.run_dir)})
    _write_summary(trainer, summary)
    _end_trackers(trainer)
    trainer.rundir.finish()
    where = (f"moved {', '.join(moved)} to checkpoints/diverged/; " if moved else "") + (
        f"resume from {left.name} with a lower lr: preftune train --resume {trainer.run_dir} lr=..."
        if left
        else "no checkpoint before it; start again with a lower lr"
    )
    # no process leaves first: a launcher (torchrun) stops the others as soon as one exits with
    # an error, which could cut the main process's summary and report short
    trainer.acc.wait_for_everyone()
    raise DivergedError(err.step, f"{err.reason}; {where}", err.first) from None


@dataclass
class TrainResult:
    """What a run returns: its directory and its final metrics (summary.json)."""

    run_dir: Path
    metrics: dict


def run(trainer: BaseTrainer) -> TrainResult:
    try:
        return _run(trainer)
    finally:
        trainer.rundir.unlock()  # whatever happened; a kill leaves a lock the next run takes over


def _run(trainer: BaseTrainer) -> TrainResult:
    summary = _start(trainer)
    start = time.perf_counter()
    try:
        last = _train(trainer)
    except DivergedError as err:
        _stop_diverged(trainer, summary, err)
    train_time = time.perf_counter() - start
    if trainer.in_backward is not None:  # a later backward on the model must not step it
        trainer.in_backward.remove()
    with trainer.sharding.gathered():
        final_eval = trainer.evaluate_pairs()
    if final_eval:
        _log(trainer, final_eval, trainer.step)
    summary.update(last)
    summary.update(final_eval)
    summary.update(
        {
            "steps": trainer.step,
            "train_seconds": train_time,
            "reference": trainer.reference_mode,
            "num_processes": trainer.acc.num_processes,
            "loss_name": trainer.cfg.loss.loss,
            "run_dir": str(trainer.run_dir),
        }
    )
    _write_summary(trainer, summary, report=False)  # a kill in the final save keeps these
    _save_final(trainer)
    _task_eval(trainer, summary, "after")
    summary["finished"] = True  # the run's last act; a resume of it needs more steps
    _write_summary(trainer, summary)
    _end_trackers(trainer)
    trainer.rundir.finish()
    _print_summary(trainer, summary)
    return TrainResult(trainer.run_dir, summary)


def _end_trackers(trainer: BaseTrainer) -> None:
    """Close the trackers. Not `Accelerator.end_training`, which also destroys the process
    group: a Python caller (a sweep under torchrun) may train again in the same processes."""
    for tracker in trainer.acc.trackers:
        tracker.finish()


def _write_summary(trainer: BaseTrainer, summary: dict, report: bool = True) -> None:
    if not trainer.acc.is_main_process:
        return
    write_json(trainer.run_dir / "summary.json", summary)
    if report:
        write_report(trainer.run_dir)


def _save_final(trainer: BaseTrainer) -> None:
    """final/: one Hugging Face model folder, written under a temporary name and renamed, so a
    kill leaves either the whole folder or none. Under FSDP2 every process sends its shards
    and the main process saves an unsharded copy."""
    model = trainer.policy
    if trainer.sharding.enabled:
        model = trainer.sharding.plain_copy(trainer.engine, trainer.policy)
    if not trainer.acc.is_main_process:
        return
    final, tmp = trainer.run_dir / "final", trainer.run_dir / ".tmp-final"
    if tmp.exists():
        shutil.rmtree(tmp)
    with progress_bars(not trainer.quiet):  # transformers' "Writing model shards" bar
        if trainer.cfg.model.lora:
            model.save_pretrained(tmp / "adapter")
            trainer.tokenizer.save_pretrained(tmp / "adapter")
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
    trainer.tokenizer.save_pretrained(tmp)
    ckpt.fsync_tree(tmp)
    ckpt.publish(tmp, final)


def _print_summary(trainer: BaseTrainer, s: dict) -> None:
    if trainer.quiet and not trainer.acc.is_main_process:
        return
    parts = [
        f"{trainer.label}: {s['steps']} steps in {s['train_seconds']:.0f}s",
        f"loss {s.get('loss', float('nan')):.4f}",
    ]
    if "eval/rewards/accuracies" in s:
        parts.append(f"eval reward acc {s['eval/rewards/accuracies']:.2f}")
    if "task/accuracy_after" in s:
        before = s.get("task/accuracy_before")
        parts.append(
            f"task accuracy {'' if before is None else f'{before:.1%} -> '}{s['task/accuracy_after']:.1%}"
        )
    parts.append(f"model in {trainer.run_dir / 'final'}")
    print("[preftune] " + " | ".join(parts), flush=True)
