"""Building the pieces of a run from a Config: data, model, optimizer, schedule, run directory."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from preftune.activations import checkpointing_kwargs
from preftune.compiling import compile_decoder_layers
from preftune.config import Config, ConfigError
from preftune.data import arithmetic
from preftune.data.records import load_records, unpair
from preftune.data.sources import BUNDLED, check_source
from preftune.data.split import split_note, split_records
from preftune.data.tokenize import tokenize_records
from preftune.errors import UserError
from preftune.models import (
    check_model_source,
    load_causal_lm,
    load_tokenizer,
    own_weights,
    progress_bars,
    resolve_model_path,
)


class TrainingError(UserError, RuntimeError):
    """Training cannot go on: a non-finite loss or gradient, or a setting the run contradicts."""


@dataclass
class Datasets:
    train: list[dict]  # tokenized examples
    eval: list[dict]
    task_problems: list[dict]  # held-out problems for task/accuracy ([] when no task)
    verify: object  # (prompt, completion) -> bool, or None
    notes: list[str]  # what the user should know: skipped, truncated


def check_output_dir(output_dir: str) -> None:
    """Refuse an output_dir where no run folder can be made: the nearest part of it that exists
    must be a folder this process can write."""
    path = Path(output_dir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(
            f"output_dir={output_dir}: {existing} is a file, so no run folder can be made there; "
            f"choose another output_dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"output_dir={output_dir}: {existing} is not writable by this user; choose another "
            f"output_dir, or fix its permissions"
        )


def check_before_loading(cfg: Config) -> None:
    """What a new run can check before its run directory is made and anything loads: the output
    folder, and that the model and data exist. The loaders check again where they load."""
    check_output_dir(cfg.train.output_dir)
    check_model_source(cfg.model.model, cfg.model.trust_remote_code)
    check_source(cfg.data.data)
    if cfg.data.eval_data:
        check_source(cfg.data.eval_data, "eval_data")


def resolve_task(cfg: Config) -> str | None:
    """The verifiable task of the run (`task`, checked in preftune/validation.py): auto is the
    arithmetic task on the bundled sets, none elsewhere."""
    task = cfg.data.task
    if task == "auto":
        return "arithmetic" if cfg.data.data in BUNDLED else None
    return task


def _tokenize(cfg: Config, records: list[dict], where: list[str], tokenizer, unpaired: bool):
    d = cfg.data
    if unpaired:  # a pair gives two examples, both named by the pair's line
        where = [w for r, w in zip(records, where) for _ in range(1 if "completion" in r else 2)]
        records = unpair(records)
    return tokenize_records(
        records, tokenizer, d.max_length, d.max_prompt_length, where, d.skip_invalid
    )


def load_datasets(cfg: Config, tokenizer, unpaired: bool) -> Datasets:
    """Records -> tokenized train and held-out examples, with notes saying what was split off,
    skipped, cut and left out; too little data for one batch is an error here, before training."""
    d, t = cfg.data, cfg.train
    records, report = load_records(d.data, skip_invalid=d.skip_invalid)
    notes = [report.summary()] if report.skipped else []
    num_eval = 0 if d.eval_data else d.num_eval
    split = split_records(len(records), num_eval, d.num_train, t.seed, d.data in BUNDLED)
    if d.eval_data:
        eval_records, eval_report = load_records(d.eval_data, d.skip_invalid, key="eval_data")
        eval_where, split.how = eval_report.where, f"eval_data={d.eval_data}"
        if eval_report.skipped:
            notes.append(eval_report.summary())
    else:
        eval_records = [records[i] for i in split.eval]
        eval_where = [report.where[i] for i in split.eval]
    train_records = [records[i] for i in split.train]
    for key, recs in (("data", records), ("eval_data", eval_records)):
        if not unpaired and any("completion" in r for r in recs):
            raise ConfigError(
                f"loss '{cfg.loss.loss}' needs paired records (prompt, chosen, rejected); "
                f"{key}={getattr(d, key)} holds unpaired ones (prompt, completion, label); "
                f"use loss=kto"
            )
    train_where = [report.where[i] for i in split.train]
    train, stats = _tokenize(cfg, train_records, train_where, tokenizer, unpaired)
    evald, eval_stats = _tokenize(cfg, eval_records, eval_where, tokenizer, unpaired)
    for s, name in ((stats, "train"), (eval_stats, "eval")):
        if s.summary():
            notes.append(f"{name}: {s.summary()}")
    if len(train) < t.batch_size:
        raise TrainingError(
            f"data={d.data}: {len(train)} training examples (after holding out "
            f"{len(split.eval)} for evaluation) are fewer than batch_size={t.batch_size}; lower "
            f"batch_size or num_eval, or add data"
        )
    notes.append(
        split_note(d.data, split, len(eval_records), d.num_train, len(train), t.batch_size)
    )
    task = resolve_task(cfg)
    problems = arithmetic.test_prompts()[: d.num_task_eval] if task == "arithmetic" else []
    return Datasets(train, evald, problems, arithmetic.verify if task else None, notes)


def prepare_model(cfg: Config, model, task_type: str):
    """A freshly loaded model made ready to train: its own weights (LoRA: adapters on a frozen,
    mapped base), train mode, gradient checkpointing if asked. `task_type` is peft's."""
    m = cfg.model
    if not m.lora:  # LoRA trains new adapter tensors; the base stays frozen and mapped
        own_weights(model)
    # from_pretrained returns eval mode, where transformers skips gradient checkpointing;
    # train mode changes nothing else here (dropout is disabled)
    model.train()
    if m.gradient_checkpointing:
        kwargs = checkpointing_kwargs(m.gradient_checkpointing)  # whole layers, or selective
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not m.lora:
        return _compiled(cfg, model)
    target = m.lora_target_modules
    lcfg = LoraConfig(
        r=m.lora_r,
        lora_alpha=m.lora_alpha,
        lora_dropout=m.lora_dropout,
        task_type=task_type,
        target_modules=target if target == "all-linear" else [t.strip() for t in target.split(",")],
    )
    try:
        model = get_peft_model(model, lcfg)
    except ValueError as e:  # peft's word for target modules the model does not have
        raise ConfigError(
            f"lora_target_modules={target}: {str(e).splitlines()[0].rstrip('.')}; name modules of this model "
            f"(such as q_proj,v_proj), or use all-linear"
        ) from None
    return _compiled(cfg, model)


def _compiled(cfg: Config, model):
    """`model` with its decoder layers compiled (`compile=true`, preftune/compiling.py), after
    LoRA has put its layers in place. One line says so, or why not: a switch-off goes to stderr
    whatever `quiet` says, from the main process only."""
    if not cfg.train.compile:
        return model
    line = compile_decoder_layers(model)
    off = line.startswith("compile=true switched off")
    if int(os.environ.get("RANK", "0")) == 0 and (off or not cfg.train.quiet):
        tqdm.write(
            f"[preftune] {'warning: ' if off else ''}{line}", file=sys.stderr if off else None
        )
    return model


def load_policy(cfg: Config):
    m = cfg.model
    tokenizer = load_tokenizer(m.model, trust_remote_code=m.trust_remote_code)
    with progress_bars(not cfg.train.quiet):
        model = load_causal_lm(
            m.model, dtype=getattr(torch, m.dtype), trust_remote_code=m.trust_remote_code
        )
    model = prepare_model(cfg, model, "CAUSAL_LM")
    return model, tokenizer, resolve_model_path(m.model, m.trust_remote_code)


def build_optimizer(cfg: Config, model, total_steps: int):
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "adamw":
        # the fused kernel (one pass over each tensor, CPU and CUDA) is torch's fastest AdamW;
        # same update rule as the default loop, rounding may differ in the last bit
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
    else:  # sgd or rmsprop (preftune/validation.py checked the name)
        cls = torch.optim.SGD if t.optimizer == "sgd" else torch.optim.RMSprop
        opt = cls(params, lr=t.lr, weight_decay=t.weight_decay)
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
