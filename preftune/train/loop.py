"""The run, top to bottom: resume, evaluate before, train with a progress bar, evaluate and
checkpoint on schedule, save the final model, evaluate after, write the summary."""

from __future__ import annotations

import json
import time

import torch
from tqdm.auto import tqdm

from preftune.train import checkpoint as ckpt
from preftune.train.batches import global_batches
from preftune.train.trainer import Trainer, TrainResult, write_json


def _log(trainer: Trainer, metrics: dict, step: int) -> None:
    if not trainer.acc.is_main_process:
        return
    with open(trainer.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    trainer.acc.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=step)


def _resume(trainer: Trainer) -> None:
    path = ckpt.latest_checkpoint(trainer.run_dir / "checkpoints")
    if path is None:
        trainer.log_line(
            f"resume: no complete checkpoint in {trainer.run_dir}; starting from step 0"
        )
        return
    state = ckpt.load_checkpoint(
        path, trainer.acc.unwrap_model(trainer.policy), trainer.optimizer, trainer.scheduler
    )
    trainer.load_state(state)
    saved_threads, threads = state.get("torch_threads"), torch.get_num_threads()
    if saved_threads is not None and saved_threads != threads:
        trainer.log_line(
            f"warning: {path} was written by a run with {saved_threads} torch threads and this one "
            f"has {threads}; it continues, but not bit-equal to an uninterrupted run "
            f"(set OMP_NUM_THREADS={saved_threads} for that)"
        )
    # metrics logged after the checkpoint belong to the lost part of the run: drop them
    mpath = trainer.run_dir / "metrics.jsonl"
    if mpath.exists() and trainer.acc.is_main_process:
        kept = [
            ln
            for ln in mpath.read_text().splitlines()
            if ln and json.loads(ln).get("step", 0) <= trainer.step
        ]
        mpath.write_text("".join(ln + "\n" for ln in kept))
    trainer.log_line(f"resumed from {path} at step {trainer.step}")


def _task_eval(trainer: Trainer, summary: dict, tag: str) -> None:
    trainer.write_samples(tag)  # greedy_{tag}.json for any data set (and segment references)
    acc, samples = trainer.task_accuracy(tag)
    if acc is None:
        return
    summary[f"task/accuracy_{tag}"] = acc
    if trainer.acc.is_main_process:
        write_json(trainer.run_dir / f"samples_{tag}.json", samples[:32])
    trainer.log_line(f"held-out task accuracy {tag}: {acc:.1%} ({len(samples)} problems)")


def run(trainer: Trainer) -> TrainResult:
    cfg, t = trainer.cfg, trainer.cfg.train
    if trainer.acc.is_main_process:
        cfg.save(trainer.run_dir / "config.yaml")
    trainer.acc.init_trackers("preftune", config={k: str(v) for k, v in cfg.flat().items()})
    summary: dict = {}
    if t.resume:
        _resume(trainer)
        old = trainer.run_dir / "summary.json"
        if old.exists():
            summary.update(
                {k: v for k, v in json.loads(old.read_text()).items() if k.endswith("_before")}
            )
    if trainer.step == 0 and cfg.eval.eval_before:
        _task_eval(trainer, summary, "before")
        if trainer.acc.is_main_process:
            write_json(trainer.run_dir / "summary.json", summary)
    n_dropped = len(trainer.data.train) - trainer.per_epoch * t.batch_size
    if n_dropped:
        trainer.log_line(
            f"note: {n_dropped} examples past the last full batch of each epoch are not used"
        )
    trainer.log_line(
        f"training {cfg.loss.loss} on {len(trainer.data.train)} examples: {trainer.total_steps} steps "
        f"of {t.batch_size} ({t.grad_accum} micro-batches"
        f"{f' in each of {trainer.acc.num_processes} processes' if trainer.acc.num_processes > 1 else ''}"
        f"), run dir {trainer.run_dir}"
    )
    bar = tqdm(
        total=trainer.total_steps,
        initial=trainer.step,
        desc="train",
        disable=trainer.quiet,
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    last: dict = {}
    while trainer.step < trainer.total_steps:
        epoch, offset = divmod(trainer.step, trainer.per_epoch)
        batch = global_batches(
            len(trainer.data.train), t.batch_size, t.seed, epoch, trainer.lengths
        )[offset]
        last = trainer.train_step(batch)
        trainer.step += 1
        last["epoch"] = trainer.step / trainer.per_epoch
        if t.eval_every and trainer.step % t.eval_every == 0 and trainer.step < trainer.total_steps:
            last.update(trainer.evaluate_pairs())
        if trainer.step % t.log_every == 0 or trainer.step == trainer.total_steps:
            _log(trainer, last, trainer.step)
        bar.update(1)
        bar.set_postfix(
            loss=f"{last['loss']:.4f}",
            margin=f"{last.get('rewards/margins', float('nan')):.3f}",
            acc=f"{last.get('rewards/accuracies', float('nan')):.2f}",
        )
        if t.save_every and trainer.step % t.save_every == 0:
            trainer.save()
    bar.close()
    train_time = time.perf_counter() - start
    if trainer.in_backward is not None:  # a later backward on the model must not step it
        trainer.in_backward.remove()
    final_eval = trainer.evaluate_pairs()
    if final_eval:
        _log(trainer, final_eval, trainer.step)
    _save_final(trainer)
    _task_eval(trainer, summary, "after")
    summary.update({k: v for k, v in last.items()})
    summary.update(final_eval)
    summary.update(
        {
            "steps": trainer.step,
            "train_seconds": train_time,
            "reference": trainer.reference_mode,
            "num_processes": trainer.acc.num_processes,
            "loss_name": cfg.loss.loss,
            "run_dir": str(trainer.run_dir),
        }
    )
    if trainer.acc.is_main_process:
        write_json(trainer.run_dir / "summary.json", summary)
        try:
            from preftune.report import write_report

            write_report(trainer.run_dir)
        except ImportError:
            pass
    trainer.acc.end_training()
    _print_summary(trainer, summary)
    return TrainResult(trainer.run_dir, summary)


def _save_final(trainer: Trainer) -> None:
    if not trainer.acc.is_main_process:
        return
    model = trainer.acc.unwrap_model(trainer.policy)
    final = trainer.run_dir / "final"
    if trainer.cfg.model.lora:
        model.save_pretrained(final / "adapter")
        trainer.tokenizer.save_pretrained(final / "adapter")
        import copy

        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(final)
    else:
        model.save_pretrained(final)
    trainer.tokenizer.save_pretrained(final)


def _print_summary(trainer: Trainer, s: dict) -> None:
    if trainer.quiet and not trainer.acc.is_main_process:
        return
    parts = [
        f"{trainer.cfg.loss.loss}: {s['steps']} steps in {s['train_seconds']:.0f}s",
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
