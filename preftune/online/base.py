"""What the online and reward trainers share with the offline `Trainer`, minus its model and data.

`Trainer.__init__` loads a causal LM and tokenized pairs; the online trainers need prompts
instead, the reward trainer a sequence classifier. `prepare_trainer` does the rest of that
setup identically (accelerate, seed, optimizer and schedule, calibration, step counter), so the
subclasses keep every other `Trainer` method and the one loop in `preftune.train.loop.run`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator

from preftune.calibrate import BetaCalibration
from preftune.config import Config, build_config
from preftune.losses import LOSSES
from preftune.train.batches import example_lengths
from preftune.train.setup import Datasets, build_optimizer, run_dir_for, trackers
from preftune.train.trainer import TrainingError, place_for_training


def resolve_config(config, overrides, default_name: Callable[[Config], str]) -> Config:
    """`build_config`, plus `resume=RUN_DIR` reading that run's config.yaml (later overrides win),
    as `preftune.train.trainer.train` does. A new run without `run_name` is named
    `default_name(cfg)-TIME`."""
    cfg = build_config(config, overrides)
    if cfg.train.resume:
        saved = Path(cfg.train.resume) / "config.yaml"
        if not saved.exists():
            raise TrainingError(
                f"resume={cfg.train.resume}: no config.yaml there; is it a preftune run directory?"
            )
        base = yaml.safe_load(saved.read_text())
        if isinstance(config, dict):  # keys given now win over the saved ones
            base.update(config)
        elif isinstance(config, str | Path):
            base.update(yaml.safe_load(Path(config).read_text()) or {})
        if isinstance(overrides, dict):
            base.update(overrides)
        else:
            for item in overrides or []:
                k, v = item.split("=", 1)
                base[k.strip().lstrip("-").replace("-", "_")] = yaml.safe_load(v)
        base["resume"] = cfg.train.resume
        cfg = build_config(base)
    elif cfg.train.run_name is None:
        cfg.train.run_name = f"{default_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg


def prepare_trainer(
    trainer,
    cfg: Config,
    load_model: Callable[[], tuple],
    load_data: Callable[[object], Datasets],
) -> None:
    """Set the attributes `Trainer` methods and `loop.run` read, as `Trainer.__init__` does.

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
    trainer.calibration = (
        BetaCalibration(**cfg.loss.beta_calibration) if cfg.loss.beta_calibration else None
    )
    trainer.loss_state = trainer.spec.init_state() if trainer.spec.stateful else None
    trainer.step = 0


def split_even(items: list, parts: int) -> list[list]:
    """`items` in `parts` contiguous chunks whose sizes differ by at most one (some may be
    empty): the micro-batches of a step whose number of pairs is only known after judging."""
    n = len(items)
    return [items[(i * n) // parts : ((i + 1) * n) // parts] for i in range(parts)]


def append_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")


def split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """`[config.yaml] key=value ...` -> (config path or None, overrides)."""
    argv = list(argv)
    if argv and "=" not in argv[0]:
        return argv[0], argv[1:]
    return None, argv


def relabel_summary(trainer, result, method: str, loss_name: str):
    """`loop.run` records `cfg.loss.loss` as the run's loss; record what was trained instead."""
    result.metrics.update({"method": method, "loss_name": loss_name})
    path = result.run_dir / "summary.json"
    if trainer.acc.is_main_process and path.exists():
        summary = json.loads(path.read_text())
        summary.update({"method": method, "loss_name": loss_name})
        path.write_text(json.dumps(summary, indent=1, default=str))
    return result
