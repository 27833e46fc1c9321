"""Building the pieces of a run from a Config: data, model, optimizer, schedule, run directory."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch

from preftune.config import Config, ConfigError
from preftune.data import arithmetic
from preftune.data.records import load_records, unpair
from preftune.data.tokenize import tokenize_records
from preftune.errors import UserError
from preftune.models import load_causal_lm, load_tokenizer, own_weights, resolve_model_path


class TrainingError(UserError, RuntimeError):
    """Training cannot go on: a non-finite loss or gradient, or a setting the run contradicts."""


BUNDLED = {"arithmetic": "onpolicy", "arithmetic_onpolicy": "onpolicy", "arithmetic_edit": "edit"}


@dataclass
class Datasets:
    train: list[dict]  # tokenized examples
    eval: list[dict]
    task_problems: list[dict]  # held-out problems for task/accuracy ([] when no task)
    verify: object  # (prompt, completion) -> bool, or None
    notes: list[str]  # what the user should know: skipped, truncated


def resolve_task(cfg: Config) -> str | None:
    task = cfg.data.task
    if task == "auto":
        return "arithmetic" if cfg.data.data in BUNDLED else None
    if task not in (None, "arithmetic"):
        raise ConfigError(f"task must be 'arithmetic', 'auto' or null, got {task!r}")
    return task


def load_datasets(cfg: Config, tokenizer, unpaired: bool) -> Datasets:
    d = cfg.data
    source = arithmetic.bundled_path(BUNDLED[d.data]) if d.data in BUNDLED else d.data
    records, report = load_records(source, skip_invalid=d.skip_invalid)
    notes = [report.summary()] if report.skipped else []
    if d.eval_data:
        eval_records, eval_report = load_records(d.eval_data, skip_invalid=d.skip_invalid)
        if eval_report.skipped:
            notes.append(eval_report.summary())
        train_records = records
    else:
        n_eval = min(d.num_eval, len(records) // 5)  # never eat more than a fifth of the data
        eval_records, train_records = (
            records[len(records) - n_eval :],
            records[: len(records) - n_eval],
        )
    if d.num_train is not None:
        train_records = train_records[: d.num_train]
    if unpaired:
        train_records, eval_records = unpair(train_records), unpair(eval_records)
    elif any("completion" in r for r in train_records):
        raise ConfigError(
            f"loss '{cfg.loss.loss}' needs paired records (prompt, chosen, rejected); "
            f"{d.data} holds unpaired ones (use loss=kto)"
        )
    train, stats = tokenize_records(train_records, tokenizer, d.max_length, d.max_prompt_length)
    evald, eval_stats = tokenize_records(eval_records, tokenizer, d.max_length, d.max_prompt_length)
    for s, name in ((stats, "train"), (eval_stats, "eval")):
        if s.summary():
            notes.append(f"{name}: {s.summary()}")
    task = resolve_task(cfg)
    problems = arithmetic.test_prompts()[: d.num_task_eval] if task == "arithmetic" else []
    return Datasets(train, evald, problems, arithmetic.verify if task else None, notes)


def load_policy(cfg: Config):
    m = cfg.model
    dtype = getattr(torch, m.dtype)
    tokenizer = load_tokenizer(m.model, trust_remote_code=m.trust_remote_code)
    model = load_causal_lm(m.model, dtype=dtype, trust_remote_code=m.trust_remote_code)
    if not m.lora:  # LoRA trains new adapter tensors; the base stays frozen and mapped
        own_weights(model)
    # from_pretrained returns eval mode, where transformers skips gradient checkpointing;
    # train mode changes nothing else here (dropout is disabled)
    model.train()
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if m.lora:
        from peft import LoraConfig, get_peft_model

        target = m.lora_target_modules
        lcfg = LoraConfig(
            r=m.lora_r,
            lora_alpha=m.lora_alpha,
            lora_dropout=m.lora_dropout,
            task_type="CAUSAL_LM",
            target_modules=target
            if target == "all-linear"
            else [t.strip() for t in target.split(",")],
        )
        model = get_peft_model(model, lcfg)
    return model, tokenizer, resolve_model_path(m.model)


def build_optimizer(cfg: Config, model, total_steps: int):
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "adamw":
        # the fused kernel (one pass over each tensor, CPU and CUDA) is torch's fastest AdamW;
        # same update rule as the default loop, rounding may differ in the last bit
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
    elif t.optimizer in ("sgd", "rmsprop"):
        cls = torch.optim.SGD if t.optimizer == "sgd" else torch.optim.RMSprop
        opt = cls(params, lr=t.lr, weight_decay=t.weight_decay)
    else:
        raise ConfigError(f"optimizer must be adamw, rmsprop or sgd, got {t.optimizer!r}")
    warmup = int(round(t.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if t.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return (
            max(0.0, 1 - progress)
            if t.scheduler == "linear"
            else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        )

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def create_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Allocate AdamW's two moments now, before any forward, instead of in its first step.

    torch creates them lazily inside the first `step()`, after that step's forward and backward
    have freed their buffers; with glibc keeping freed memory (`keep_freed_memory`) the moments
    then take those blocks, and every later step allocates its buffers and gradients afresh.
    W3 at a 256k vocabulary held seven vocabulary-sized blocks where a step needs five
    (docs/benchmarks.md, `benchmarks/memory_phases.py w3`). Created first, the moments sit
    apart and each step reuses the blocks the previous one freed. The state is what torch's
    first step would create (zeros, step 0), loaded through the public `load_state_dict`, so the
    updates are bit-identical (tests/test_trainer_state.py). Other optimizers are left alone.
    """
    inner = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps it
    if type(inner) is not torch.optim.AdamW or inner.state:
        return
    params = [p for group in inner.param_groups for p in group["params"]]
    state = {
        i: {
            "step": torch.tensor(0.0),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
        for i, p in enumerate(params)
        if p.requires_grad
    }
    inner.load_state_dict({"state": state, "param_groups": inner.state_dict()["param_groups"]})


def trackers(cfg: Config) -> list[str]:
    names = [n.strip() for n in cfg.train.report_to.split(",") if n.strip() and n.strip() != "none"]
    for n in names:
        module = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}.get(n)
        if module is None:
            raise ConfigError(
                f"report_to: unknown tracker {n!r}; use tensorboard, wandb, mlflow or none"
            )
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"report_to={n} but the '{module}' package is not installed: pip install {module}"
            )
    return names
