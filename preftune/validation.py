"""Every check of the config's keys, before anything loads: `build_config` runs `validate`, the
online entry and `preftune data rso` add `validate_online`. A mistake fails here in one line, in
a second, and leaves nothing behind; the loaders check only what needs the files themselves
(train/setup.py `check_before_loading`: paths, model and data sources)."""

from __future__ import annotations

import dataclasses
import difflib

from preftune.errors import ConfigError
from preftune.losses import LOSSES, validate_hparams
from preftune.online.group import AGGREGATIONS

OFFLOAD_MODES = ("none", "disk")  # `reference_offload` (preftune/train/offload.py)
# the methods of `preftune online`; preftune/train/entry.py maps each to its trainer
ONLINE_METHOD_NAMES = ("online_dpo", "ipo_md", "rso", "remax", "rloo", "grpo")
# the policy-gradient methods: no registry loss, so any `loss` key is ignored
POLICY_GRADIENT_METHODS = ("remax", "rloo", "grpo")
# the online keys only some methods read: set to anything but its default for another method,
# a key would do nothing, so it is refused (nothing a user sets is silently dropped)
METHOD_KEYS = {
    "rso_num_candidates": ("rso",),
    "rso_num_samples": ("rso",),
    "rso_beta": ("rso",),
    "remax_kl_ctl": ("remax",),
    "remax_gamma": ("remax",),
    "remax_clip_reward": ("remax",),
    "mixture_beta": ("ipo_md",),
    "num_generations": ("rloo", "grpo"),
    "kl_coef": ("rloo", "grpo"),
    "clip_epsilon": ("grpo",),
    "num_iterations": ("grpo",),
    "scale_rewards": ("rloo", "grpo"),
    "loss_aggregation": ("rloo", "grpo"),
    "skip_ties": ("online_dpo", "ipo_md", "rso"),  # the pairwise methods drop tied pairs
    "rso_output": (),  # `preftune data rso` only
}


def loss_hparam_names() -> set[str]:
    """Every hyper-parameter name of the registry's losses (a top-level key may be one)."""
    return {k for spec in LOSSES.values() for k in spec.defaults}


def validate(cfg) -> None:
    """Everything that can be checked before a model loads."""
    _validate_loss(cfg)
    for ok, msg in _value_checks(cfg):
        if not ok:
            raise ConfigError(msg)
    _validate_combinations(cfg)


def _validate_loss(cfg) -> None:
    if cfg.loss.loss not in LOSSES:
        hint = difflib.get_close_matches(cfg.loss.loss, list(LOSSES), n=1)
        raise ConfigError(
            f"unknown loss '{cfg.loss.loss}'"
            + (f"; did you mean '{hint[0]}'?" if hint else "")
            + f" Available: {', '.join(LOSSES)}"
        )
    try:
        cfg.loss.loss_args = validate_hparams(cfg.loss.loss, cfg.loss.loss_args)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    if cfg.loss.beta_calibration is not None:
        allowed = {"alpha", "filter_ratio", "momentum", "seed"}
        bad = set(cfg.loss.beta_calibration) - allowed
        if bad:
            raise ConfigError(
                f"beta_calibration: unknown keys {sorted(bad)}; allowed: {sorted(allowed)}"
            )
        if "beta" not in LOSSES[cfg.loss.loss].defaults:
            raise ConfigError(
                f"beta_calibration needs a loss with a beta; '{cfg.loss.loss}' has none"
            )
        for k, v in cfg.loss.beta_calibration.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ConfigError(f"beta_calibration.{k} must be a number, got {v!r}")
        fr = cfg.loss.beta_calibration.get("filter_ratio", 0.2)
        if not 0 <= fr < 1:
            raise ConfigError(f"beta_calibration.filter_ratio must be in [0, 1), got {fr}")


def _value_checks(cfg) -> list[tuple[bool, str]]:
    """(holds, message if not) for each key checked on its own."""
    t, d = cfg.train, cfg.data
    return [
        (t.lr > 0, f"lr must be > 0, got {t.lr}"),
        (t.batch_size >= 1, f"batch_size must be >= 1, got {t.batch_size}"),
        (t.grad_accum >= 1, f"grad_accum must be >= 1, got {t.grad_accum}"),
        (
            t.batch_size % t.grad_accum == 0,
            f"batch_size ({t.batch_size}) must be divisible by grad_accum ({t.grad_accum})",
        ),
        (t.epochs >= 1, f"epochs must be >= 1, got {t.epochs}"),
        (t.max_steps is None or t.max_steps >= 1, f"max_steps must be >= 1, got {t.max_steps}"),
        (0 <= t.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {t.warmup_ratio}"),
        (
            t.scheduler in ("linear", "cosine", "constant"),
            f"scheduler must be linear, cosine or constant, got {t.scheduler!r}",
        ),
        (
            t.reference in ("auto", "frozen", "lora", "precompute", "none"),
            f"reference must be auto, frozen, lora, precompute or none, got {t.reference!r}",
        ),
        (
            t.reference_offload in OFFLOAD_MODES,
            f"reference_offload must be {' or '.join(OFFLOAD_MODES)}, got {t.reference_offload!r}",
        ),
        (
            t.bf16 in ("auto", True, False),
            f"bf16 must be auto, true or false, got {t.bf16!r}",
        ),
        (
            cfg.model.gradient_checkpointing in (True, False, "selective"),
            f"gradient_checkpointing must be true, false or selective, got "
            f"{cfg.model.gradient_checkpointing!r}",
        ),
        (
            t.share_prompt in ("auto", "true", "false"),
            f"share_prompt must be auto, true or false, got {t.share_prompt!r}",
        ),
        (
            t.chunk_size is None or t.chunk_size >= 1,
            f"chunk_size must be >= 1 (or null: 2^25 logits per chunk), got {t.chunk_size}",
        ),
        (
            d.max_length > 1 and d.max_prompt_length >= 1,
            "max_length must be > 1 and max_prompt_length >= 1",
        ),
        (
            d.num_train in (None, "auto") or (isinstance(d.num_train, int) and d.num_train >= 1),
            f"num_train must be >= 1, null (all records) or auto, got {d.num_train!r}",
        ),
        (d.num_eval >= 0, f"num_eval must be >= 0 (0: hold nothing out), got {d.num_eval}"),
        (d.num_task_eval >= 0, f"num_task_eval must be >= 0, got {d.num_task_eval}"),
        (
            d.task in ("auto", "arithmetic", None),
            f"task must be auto, arithmetic or null, got {d.task!r}",
        ),
        (
            t.optimizer in ("adamw", "rmsprop", "sgd"),
            f"optimizer must be adamw, rmsprop or sgd, got {t.optimizer!r}",
        ),
        (t.log_every >= 1, f"log_every must be >= 1, got {t.log_every}"),
        (
            t.eval_every is None or t.eval_every >= 0,
            f"eval_every must be >= 0 (0 or null: only before and after), got {t.eval_every}",
        ),
        (
            t.save_every is None or t.save_every >= 0,
            f"save_every must be >= 0 (0 or null: no checkpoints), got {t.save_every}",
        ),
        (
            cfg.model.dtype in ("float32", "bfloat16", "float16", "float64"),
            f"dtype must be float32, bfloat16, float16 or float64, got {cfg.model.dtype!r}",
        ),
        (t.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {t.keep_checkpoints}"),
        (t.save_every is None or t.save_every >= 1, f"save_every must be >= 1, got {t.save_every}"),
        (
            t.save_every_minutes is None or t.save_every_minutes > 0,
            f"save_every_minutes must be > 0 (or null), got {t.save_every_minutes}",
        ),
        (
            t.divergence_factor is None or t.divergence_factor > 1,
            f"divergence_factor must be > 1 (or null), got {t.divergence_factor}",
        ),
    ]


def _validate_combinations(cfg) -> None:
    t = cfg.train
    if t.optimizer_in_backward:
        # each parameter is updated before the backward has finished (train/in_backward.py)
        if t.max_grad_norm:
            raise ConfigError(
                f"optimizer_in_backward cannot clip (max_grad_norm={t.max_grad_norm}): each "
                "parameter is updated before the total norm is known. Set max_grad_norm=null, "
                "or optimizer_in_backward=false"
            )
        if t.grad_accum != 1:
            raise ConfigError(
                f"optimizer_in_backward cannot accumulate (grad_accum={t.grad_accum}): each "
                "parameter is updated as soon as one backward has finished its gradient. Set "
                "grad_accum=1 (with a smaller batch_size), or optimizer_in_backward=false"
            )
    if t.compile and cfg.model.gradient_checkpointing:
        raise ConfigError(
            f"compile=true with gradient_checkpointing={str(cfg.model.gradient_checkpointing).lower()}"
            " is not supported yet: recomputation around compiled layers is untested "
            "(preftune/compiling.py). Set compile=false or gradient_checkpointing=false"
        )
    if t.reference == "lora" and not cfg.model.lora:
        raise ConfigError(
            "reference=lora needs lora=true (the reference is the LoRA model with its adapter off)"
        )
    if t.reference in ("lora", "precompute", "none"):  # the rest once the mode is resolved
        check_reference_offload(t.reference_offload, t.reference, f"reference={t.reference}")


# why each reference mode leaves `reference_offload` nothing to offload
NO_COPY = {
    "none": "this run loads no reference model",
    "lora": "the reference is the LoRA model with its adapter off, not a second copy",
    "precompute": "the reference's log-probs are computed before training and no model is held",
}


def check_reference_offload(offload: str, mode: str, why: str, engine: str | None = None) -> None:
    """Refuse `reference_offload` where the run holds no frozen copy for it to offload (`mode`:
    the resolved reference mode, `why`: how it was chosen) or where FSDP2 / DeepSpeed
    (`engine`) places the reference itself. At config time for an explicit `reference`, and by
    the trainer once `reference=auto` is resolved, before the model loads."""
    if offload == "none":
        return
    if mode in NO_COPY:
        raise ConfigError(
            f"reference_offload={offload}, but {NO_COPY[mode]} ({why}): nothing to offload; "
            "drop reference_offload"
        )
    if engine is not None:
        raise ConfigError(
            f"reference_offload={offload} under {engine}: the engine shards the reference "
            "itself (use its own offload settings); set reference_offload=none"
        )


def check_reward_keys(cfg) -> None:
    """`preftune reward` trains a scoring model against no reference: refuse the reference keys
    rather than ignore them."""
    t = cfg.train
    for key, value, default in (
        ("reference", t.reference, "auto"),
        ("reference_offload", t.reference_offload, "none"),
    ):
        if value != default:
            raise ConfigError(
                f"{key}={value} with `preftune reward`: a reward model is trained against no "
                f"reference; drop {key}"
            )


def set_online_keys(cfg) -> dict:
    """The online keys whose value differs from the default."""
    return {
        f.name: getattr(cfg.online, f.name)
        for f in dataclasses.fields(cfg.online)
        if getattr(cfg.online, f.name) != f.default
    }


def check_unused_online_keys(cfg, method: str | None, rso_data: bool = False) -> None:
    """Refuse an online key set for a method that does not read it; `method=None` is an offline
    run (`preftune train`, `preftune reward`), which reads none of the online keys, and
    `rso_data` is `preftune data rso` (which reads `rso_output`)."""
    for key, value in set_online_keys(cfg).items():
        users = METHOD_KEYS.get(key)
        if rso_data and key == "rso_output":
            continue
        if method is None or users == ():
            readers = "`preftune data rso`" if users == () else "`preftune online`"
            if key in ("rso_num_candidates", "rso_num_samples", "rso_beta", "judge"):
                readers += " and `preftune data rso`"
            raise ConfigError(
                f"{key}={value} is read by {readers} only, not by this run; drop it from this "
                f"run's config"
            )
        if users is not None and method not in users:
            raise ConfigError(
                f"{key}={value} is read by method={' / '.join(users)} only, and this run's "
                f"method is {method}; drop it, or pick that method"
            )


def validate_online(cfg, method: str | None = None, rso_data: bool = False) -> None:
    """Everything about the online keys that can be checked before a model loads; `rso_data`:
    for `preftune data rso`, not `preftune online`."""
    o = cfg.online
    method = method or o.method
    if method not in ONLINE_METHOD_NAMES:
        raise ConfigError(
            f"unknown online method '{method}'; choose one of {', '.join(ONLINE_METHOD_NAMES)}"
        )
    check_unused_online_keys(cfg, method, rso_data)
    spec = LOSSES[cfg.loss.loss]
    if method not in POLICY_GRADIENT_METHODS and spec.unpaired:
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
    if method in ("rloo", "grpo"):
        check_group(cfg)
    if method == "ipo_md":
        check_ipo_md(cfg)
    check_online_reference(cfg, method)


def check_online_reference(cfg, method: str) -> None:
    """What an online method refuses of the reference settings."""
    if method in ("rso", "ipo_md") and cfg.train.reference_offload != "none":
        raise ConfigError(
            f"reference_offload={cfg.train.reference_offload} with method={method}: it samples "
            "from the reference, which would read every offloaded layer back for each generated "
            "token; set reference_offload=none"
        )
    if cfg.train.reference == "precompute":
        raise ConfigError(
            "reference=precompute cannot serve an online run: its completions are new every "
            "step; use auto, frozen or lora"
        )


def check_remax(cfg) -> None:
    o = cfg.online
    if not 0 < o.remax_gamma <= 1:
        raise ConfigError(f"remax_gamma must be in (0, 1], got {o.remax_gamma}")
    if o.remax_kl_ctl < 0:
        raise ConfigError(f"remax_kl_ctl must be >= 0, got {o.remax_kl_ctl}")
    if o.remax_clip_reward <= 0:
        raise ConfigError(f"remax_clip_reward must be > 0, got {o.remax_clip_reward}")


def check_ipo_md(cfg) -> None:
    o = cfg.online
    if cfg.loss.loss != "ipo":
        raise ConfigError(
            f"method=ipo_md trains the IPO loss on mixture samples (Calandriello et al. 2024), "
            f"got loss={cfg.loss.loss}: add loss=ipo (beta is IPO's tau)"
        )
    if not 0 <= o.mixture_beta <= 1:
        raise ConfigError(
            f"mixture_beta must be in [0, 1] (0: sample the policy, online IPO; 1: the "
            f"reference), got {o.mixture_beta}"
        )
    if cfg.train.reference == "none":
        raise ConfigError("method=ipo_md samples from the reference too: use reference=auto")


def check_group(cfg) -> None:
    o = cfg.online
    if o.num_generations < 2:
        raise ConfigError(
            f"num_generations must be >= 2 (the group baseline needs other samples of the "
            f"same prompt), got {o.num_generations}"
        )
    if o.kl_coef < 0:
        raise ConfigError(f"kl_coef must be >= 0, got {o.kl_coef}")
    if not 0 < o.clip_epsilon < 1:
        raise ConfigError(f"clip_epsilon must be in (0, 1), got {o.clip_epsilon}")
    if o.num_iterations < 1:
        raise ConfigError(f"num_iterations must be >= 1, got {o.num_iterations}")
    if o.loss_aggregation is not None and o.loss_aggregation not in AGGREGATIONS:
        raise ConfigError(
            f"loss_aggregation must be one of {', '.join(AGGREGATIONS)} (or null: the "
            f"method's paper), got {o.loss_aggregation!r}"
        )
    if o.kl_coef > 0 and cfg.train.reference == "none":
        raise ConfigError(
            f"kl_coef={o.kl_coef} needs the reference: use reference=auto or kl_coef=0"
        )
