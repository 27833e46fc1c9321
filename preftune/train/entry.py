"""The three entry points the CLI and the Python API share: `train`, `train_online`,
`train_reward`. Each resolves its config (a new run's, or a resumed run's: `rundir.resolve`, the
one resume resolver), builds its trainer and hands it to the one loop (`loop.run`).

    preftune train  loss=dpo beta=0.1
    preftune online method=online_dpo judge=verifier loss=dpo beta=0.1 max_steps=64
    preftune online method=rso loss=hinge beta=0.05 rso_num_candidates=8 rso_num_samples=4
    preftune online method=remax remax_kl_ctl=0.1 remax_gamma=0.95 temperature=1.0 top_p=0.9
    preftune online method=ipo_md loss=ipo beta=0.1 mixture_beta=0.5
    preftune online method=grpo num_generations=8 kl_coef=0.04 clip_epsilon=0.2
    preftune online method=rloo num_generations=4 kl_coef=0.05
    preftune reward

Online: `batch_size` is prompts per optimizer step; the prompts are the training records'
prompts (paired, unpaired or prompt-only records; the bundled arithmetic prompts by default);
the judge is `verifier`, a reward-model directory (e.g. a `preftune reward` run's final/) or
`module:function`. The run directory is the offline trainer's, plus samples.jsonl.
"""

from __future__ import annotations

import json

from preftune.train.checkpoint import write_json
from preftune.train.group import GroupTrainer
from preftune.train.ipo_md import IPOMDTrainer
from preftune.train.loop import TrainResult, run
from preftune.train.online_dpo import OnlineDPOTrainer, RSOTrainer
from preftune.train.remax import ReMaxTrainer
from preftune.train.reward import RewardTrainer
from preftune.train.rundir import resolve
from preftune.train.trainer import Trainer
from preftune.validation import (
    ONLINE_METHOD_NAMES,
    POLICY_GRADIENT_METHODS,
    check_reward_keys,
    check_unused_online_keys,
    validate_online,
)

ONLINE_METHODS = {
    "online_dpo": OnlineDPOTrainer,
    "ipo_md": IPOMDTrainer,
    "rso": RSOTrainer,
    "remax": ReMaxTrainer,
    "rloo": GroupTrainer,
    "grpo": GroupTrainer,
}
assert tuple(ONLINE_METHODS) == ONLINE_METHOD_NAMES, "validation.py names the same methods"


def train(config=None, overrides=None) -> TrainResult:
    """Train offline with `config` (a Config, a dict, a YAML path or None for the embedded
    default job) plus `overrides` (['key=value', ...] or a dict). Returns the run directory and
    the final metrics. Call it as often as you like in one process."""
    cfg = resolve(config, overrides)
    check_unused_online_keys(cfg, None)
    return run(Trainer(cfg))


def train_online(config=None, overrides=None) -> TrainResult:
    """Run an online method (`method=` online_dpo, ipo_md, rso, remax, rloo or grpo; METHODS.md
    §13, §17, §4, §14, §17b).
    Returns the run directory and the final metrics (`task/accuracy_before`/`_after` on a
    verifiable task)."""
    cfg = resolve(config, overrides)
    validate_online(cfg)
    trainer = ONLINE_METHODS[cfg.online.method](cfg)
    method = cfg.online.method
    loss_name = method if method in POLICY_GRADIENT_METHODS else cfg.loss.loss
    return _relabel(trainer, run(trainer), method, loss_name)


def train_reward(config=None, overrides=None) -> TrainResult:
    """Train a Bradley–Terry reward model (METHODS.md §16). Returns the run directory and the
    final metrics."""
    cfg = resolve(config, overrides)
    check_unused_online_keys(cfg, None)
    check_reward_keys(cfg)
    trainer = RewardTrainer(cfg)
    return _relabel(trainer, run(trainer), "reward", "bradley_terry")


def _relabel(trainer, result: TrainResult, method: str, loss_name: str) -> TrainResult:
    """`loop.run` records `cfg.loss.loss` as the run's loss; record what was trained instead."""
    result.metrics.update({"method": method, "loss_name": loss_name})
    path = result.run_dir / "summary.json"
    if trainer.acc.is_main_process and path.exists():
        summary = json.loads(path.read_text())
        summary.update({"method": method, "loss_name": loss_name})
        write_json(path, summary)
    return result
