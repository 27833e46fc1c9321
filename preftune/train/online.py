"""`preftune online`: online DPO, RSO and ReMax with a judge (METHODS.md §13, §4, §14).

    preftune online method=online_dpo judge=verifier loss=dpo beta=0.1 max_steps=64
    preftune online method=rso loss=hinge beta=0.05 rso_num_candidates=8 rso_num_samples=4
    preftune online method=remax remax_kl_ctl=0.1 remax_gamma=0.95 temperature=1.0 top_p=0.9

`batch_size` is prompts per optimizer step. The prompts are the training records' prompts
(paired, unpaired or prompt-only records; the bundled arithmetic prompts by default); the judge is
`verifier`, a reward-model directory (e.g. a `preftune reward` run's final/) or `module:function`.
The run directory is the offline trainer's, plus samples.jsonl (what was generated, with scores).
"""

from __future__ import annotations

from preftune.config import Config, ConfigError
from preftune.losses import LOSSES
from preftune.online.base import relabel_summary
from preftune.online.loops import OnlineDPOTrainer, RSOTrainer
from preftune.online.remax_loop import ReMaxTrainer, check_remax
from preftune.train.rundir import resolve
from preftune.train.trainer import TrainResult

ONLINE_METHODS = {"online_dpo": OnlineDPOTrainer, "rso": RSOTrainer, "remax": ReMaxTrainer}


def validate_online(cfg: Config, method: str | None = None) -> None:
    """Everything about the online keys that can be checked before a model loads."""
    o = cfg.online
    method = method or o.method
    if method not in ONLINE_METHODS:
        raise ConfigError(
            f"unknown online method '{method}'; choose one of {', '.join(ONLINE_METHODS)}"
        )
    spec = LOSSES[cfg.loss.loss]
    if method != "remax" and spec.unpaired:
        raise ConfigError(
            f"{method} trains on generated pairs; loss '{cfg.loss.loss}' needs unpaired data. "
            f"Pick a pairwise loss such as dpo, ipo or hinge"
        )
    checks = [
        (o.temperature > 0, f"temperature must be > 0, got {o.temperature}"),
        (0 < o.top_p <= 1, f"top_p must be in (0, 1], got {o.top_p}"),
        (o.top_k >= 0, f"top_k must be >= 0 (0 = off), got {o.top_k}"),
        (o.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {o.max_new_tokens}"),
        (o.log_samples >= 0, f"log_samples must be >= 0, got {o.log_samples}"),
        (
            o.generation_batch_size is None or o.generation_batch_size >= 1,
            f"generation_batch_size must be >= 1 (or null), got {o.generation_batch_size}",
        ),
        (
            o.missing_eos_penalty is None or o.missing_eos_penalty >= 0,
            f"missing_eos_penalty must be >= 0 (or null), got {o.missing_eos_penalty}",
        ),
    ]
    if method == "rso":
        checks += [
            (o.rso_beta >= 0, f"rso_beta must be >= 0 (0 = best-of-N), got {o.rso_beta}"),
            (
                2 <= o.rso_num_samples <= o.rso_num_candidates,
                f"rso_num_samples ({o.rso_num_samples}) must be between 2 and "
                f"rso_num_candidates ({o.rso_num_candidates})",
            ),
            (
                o.rso_num_samples % 2 == 0,
                f"rso_num_samples must be even (accepted samples are paired), got "
                f"{o.rso_num_samples}",
            ),
        ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    if method == "remax":
        check_remax(cfg)
    if cfg.train.reference == "precompute":
        raise ConfigError(
            "reference=precompute cannot serve an online run: its completions are new every "
            "step; use auto, frozen or lora"
        )


def train_online(config=None, overrides=None) -> TrainResult:
    """Run an online method with `config` (a Config, dict, YAML path or None) plus `overrides`
    (['key=value', ...] or a dict); `method` picks online_dpo, rso or remax. Returns the run
    directory and the final metrics (`task/accuracy_before`/`_after` on a verifiable task)."""
    from preftune.train.loop import run

    cfg = resolve(config, overrides)
    validate_online(cfg)
    trainer = ONLINE_METHODS[cfg.online.method](cfg)
    loss_name = "remax" if cfg.online.method == "remax" else cfg.loss.loss
    return relabel_summary(trainer, run(trainer), cfg.online.method, loss_name)
