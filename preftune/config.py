"""Typed configuration: one small dataclass per concern, loaded from YAML plus key=value overrides.

Keys are flat and unique across sections (``lr``, ``loss``, ``model``...), so a YAML file and the
command line use the same names. Loss hyper-parameters go in ``loss_args`` or directly at the
top level (``beta=0.2``); they are checked against the chosen loss. Unknown keys are errors
with a "did you mean" hint; bad values fail here, before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from preftune.errors import ConfigError

__all__ = ["Config", "ConfigError", "build_config", "help_text", "parse_value"]


@dataclass
class ModelConfig:
    model: str = (
        "default"  # 'default' (embedded SmolLM2-135M-Instruct), a local HF directory, or a hub id
    )
    dtype: str = "float32"  # weights dtype: float32 | bfloat16
    trust_remote_code: bool = False
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    # activations recomputed in backward: false | true (whole decoder layers) | selective (only
    # the cheap ops: norms, activations, rotary, casts; matmul outputs kept, preftune/activations.py)
    gradient_checkpointing: bool | str = False


@dataclass
class DataConfig:
    data: str = (
        "arithmetic"  # 'arithmetic' (on-policy pairs), 'arithmetic_edit', or a path / dataset id
    )
    eval_data: str | None = None  # held-out preference pairs; default: a held-out slice of `data`
    task: str | None = (
        "auto"  # verifiable task for task/accuracy: 'arithmetic', None; 'auto' = by data
    )
    # training records: null = all; auto = all of a user's data, the bundled sets' first 256
    # (the default job); N = the first N of the training part, in file order
    num_train: int | str | None = "auto"
    # held-out pairs for eval/ metrics (at most a fifth of the data), drawn at random by `seed`;
    # the bundled sets hold out their last ones. Ignored when eval_data is given
    num_eval: int = 64
    num_task_eval: int = 256  # held-out task problems for task/accuracy
    max_length: int = 512
    max_prompt_length: int = 256
    skip_invalid: bool = False


@dataclass
class LossConfig:
    loss: str = "dpo"
    loss_args: dict = field(default_factory=dict)
    beta_calibration: dict | None = None  # {alpha: 0.6, filter_ratio: 0.2, momentum: 0.9}


@dataclass
class TrainConfig:
    output_dir: str = "runs"
    run_name: str | None = None
    seed: int = 0
    lr: float = 5e-6
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8  # pairs per optimizer step, across processes and accumulation
    grad_accum: int = 1
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    scheduler: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    # each parameter updated (and its gradient freed) as soon as backward has finished its
    # gradient, so a step never holds all gradients at once; no clipping (max_grad_norm=null),
    # grad_accum=1, one process (preftune/train/in_backward.py)
    optimizer_in_backward: bool = False
    reference: str = "auto"  # auto | frozen | lora | precompute | none
    # none | disk: a frozen reference's decoder layers kept in files under the run directory
    # and read back one layer at a time for its forwards (accelerate's disk offload): the copy's
    # memory for reading its layers each step (preftune/train/offload.py)
    reference_offload: str = "none"
    # One row per sequence (or per prompt group), padded; `packed` puts the whole micro-batch
    # in one row with a block-diagonal mask. On CPU, SDPA with a mask materialises the T x T
    # attention of that row, so packing is slower than padding here (docs/benchmarks.md).
    packed: bool = False
    # one copy of each prompt, chosen and rejected branching from it: true | false | auto
    # (auto: per micro-batch, when a cost model says it saves work; see train/batches.py)
    share_prompt: str = "auto"
    # the leading tokens every prompt of a micro-batch shares (a chat template's system prompt
    # and turn header) run once, their keys/values reused by every row; same log-probs
    share_prefix: bool = True
    # with a shared prompt, the leading tokens chosen and rejected have in common (an edit pair
    # up to its first differing token) are laid out and scored once; same log-probs
    share_completion_prefix: bool = True
    group_by_length: bool = False  # batches of similar lengths (less padding), order still random
    # bf16 autocast over fp32 weights: true | false | auto (where the device has bf16 units: a
    # CUDA GPU with bf16, a CPU with AMX or AVX-512-BF16; decided when the run starts and stored
    # as true / false in its config.yaml, preftune/precision.py)
    bf16: bool | str = "auto"
    # each decoder layer of the policy compiled by torch.compile (inductor, dynamic shapes): the
    # norms, casts, rotary and elementwise ops fused; the matmuls unchanged; the first steps pay
    # the compilation. Off with one line where it cannot run (preftune/compiling.py)
    compile: bool = False
    # glibc: reuse freed memory instead of page-faulting it back each step (preftune/allocator.py)
    keep_freed_memory: bool = True
    # completion tokens per LM-head chunk; null = 2^25 logits // vocab (fixed logit memory)
    chunk_size: int | None = None
    log_every: int = 1
    eval_every: int | None = None
    save_every: int | None = None  # a checkpoint every N steps
    # and one whenever this many minutes of training have passed since the last (null = off):
    # a long run is resumable by default, a short one pays for no checkpoint
    save_every_minutes: float | None = 30.0
    keep_checkpoints: int = 2
    resume: str | None = None
    overwrite: bool = False  # replace an existing run directory of the same run_name
    # divergence: stop when the gradient norm exceeds this many times the median of the last
    # 20 steps (null = off); non-finite and vanished (exactly 0 with a non-zero loss) always stop
    divergence_factor: float | None = 1000.0
    quiet: bool = False
    report_to: str = "tensorboard"  # tensorboard | wandb | mlflow | none (comma-separated)


@dataclass
class EvalConfig:
    eval_before: bool = True
    eval_max_new_tokens: int = 16
    eval_batch_size: int = 64


@dataclass
class OnlineConfig:
    """`preftune online`: generation, judging and the online method's own knobs."""

    method: str = "online_dpo"  # online_dpo | ipo_md | rso | remax | rloo | grpo
    judge: str = "verifier"  # verifier | a reward-model directory | module:function
    temperature: float = 0.9
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    missing_eos_penalty: float | None = None
    skip_ties: bool = True
    rso_num_candidates: int = 8
    rso_num_samples: int = 4
    rso_beta: float = 0.5
    remax_kl_ctl: float = 0.1
    remax_gamma: float = 0.95
    remax_clip_reward: float = 5.0
    # IPO-MD (Calandriello et al. 2024): pairs drawn from pi^(1-b) * pi_ref^b, b = mixture_beta
    mixture_beta: float = 0.5
    # RLOO / GRPO (docs/online.md): the group, the KL weight, the clip, the papers' switches
    num_generations: int = 4  # samples per prompt (k)
    kl_coef: float = 0.04  # RLOO: per-sequence KL in the reward; GRPO: k3 per token
    clip_epsilon: float = 0.2  # GRPO's PPO clip of the token ratio
    num_iterations: int = 1  # GRPO's mu: optimizer updates per generation batch
    scale_rewards: bool | None = None  # divide by the group std; null: grpo true, rloo false
    loss_aggregation: str | None = (
        None  # sequence|token|constant|sum; null: grpo sequence, rloo sum
    )
    log_samples: int = 4  # prompts whose completions (with scores) go to samples.jsonl per eval
    generation_batch_size: int | None = None  # prompts per generate call (None = all at once)
    rso_output: str | None = None  # `preftune data rso`: the preference JSONL to write


@dataclass
class RewardConfig:
    """`preftune reward`: Bradley-Terry reward-model training."""

    center_rewards_coefficient: float | None = None  # Eisenstein et al. centering; 0.01 is usual
    use_margin: bool = True  # subtract a record's `margin` column (Llama 2) when the data has one


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "online": OnlineConfig,
    "reward": RewardConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def flat(self) -> dict:
        out = {}
        for name in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, name)))
        return out

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.flat(), sort_keys=False))


# Names TRL / transformers users type, pointed at ours in the "did you mean" hint.
TRL_NAMES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "model_name_or_path": "model",
    "loss_type": "loss",
    "warmup_steps": "warmup_ratio",
    "lr_scheduler_type": "scheduler",
    "dataset": "data",
    "dataset_name": "data",
    "precompute_ref_log_probs": "reference",
    "padding_free": "packed",
}


def _owner() -> dict[str, str]:
    return {f.name: sec for sec, cls in SECTIONS.items() for f in fields(cls)}


def parse_value(text: str) -> Any:
    """'0.1' -> 0.1, 'true' -> True, 'null' -> None, '{a: 1}' -> dict; anything else a string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 leaves '1e-5' a string
        except ValueError:
            pass
    return value


def _coerce(key: str, value: Any, typ: Any) -> Any:
    t = str(typ)
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"'{key}' cannot be null")
    if t.startswith("int | str") and value == "auto":  # num_train
        return value
    if t.startswith("bool | str"):  # bf16, gradient_checkpointing: true / false stay booleans
        return {"true": True, "false": False}.get(str(value).lower(), value)
    if t.startswith("str") and isinstance(value, dict | list):
        raise ConfigError(
            f"'{key}' must be a single value, got {value!r}; config keys are flat "
            f"('{key}: value' at the top level, no sections)"
        )
    if t.startswith("bool"):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if isinstance(value, str) and (t.startswith("int") or t.startswith("float")):
        try:  # YAML 1.1 reads '1e-5' as a string
            value = (
                float(value)
                if t.startswith("float") or not value.lstrip("-").isdigit()
                else int(value)
            )
        except ValueError:
            pass
    if t.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return int(value)
    if t.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if t.startswith("str"):
        return str(value).lower() if isinstance(value, bool) else str(value)  # true -> "true"
    if t.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping such as {{alpha: 0.6}}, got {value!r}")
        return dict(value)
    return value


def _raw_items(source, overrides) -> dict[str, Any]:
    """The flat key -> value mapping of `source` (a YAML path, dict or Config) and `overrides`."""
    raw: dict[str, Any] = {}
    if isinstance(source, Config):
        raw = source.flat()
    elif isinstance(source, dict):
        raw = dict(source)
    elif source is not None:
        raw = _read_yaml(Path(source))
    if isinstance(overrides, dict):
        raw.update(overrides)
        return raw
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (for example lr=1e-5)")
        k, v = item.split("=", 1)
        raw[k.strip().lstrip("-").replace("-", "_")] = parse_value(v)
    return raw


def _sections(raw: dict[str, Any], hparams: set[str]) -> dict[str, dict]:
    """Each key in its section; a loss hyper-parameter given at the top level in loss_args."""
    owner = _owner()
    sections: dict[str, dict] = {s: {} for s in SECTIONS}
    loss_args = raw.pop("loss_args", None) or {}
    if not isinstance(loss_args, dict):
        raise ConfigError(f"'loss_args' must be a mapping such as {{beta: 0.1}}, got {loss_args!r}")
    loss_args = dict(loss_args)
    for key, value in raw.items():
        key = str(key)
        if key in owner:
            sections[owner[key]][key] = value
        elif key in hparams:
            loss_args[key] = value
        else:
            known = {k: k for k in set(owner) | hparams} | TRL_NAMES
            hint = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            raise ConfigError(
                f"unknown config key '{key}'"
                + (f"; did you mean '{known[hint[0]]}'?" if hint else "")
                + " (run `preftune train --help` for the list of keys)"
            )
    sections["loss"]["loss_args"] = loss_args
    return sections


def build_config(
    source: str | Path | dict | Config | None = None, overrides: list[str] | dict | None = None
) -> Config:
    """A Config from a YAML path, a dict or an existing Config, then `overrides` (['lr=1e-5', ...]),
    validated (preftune/validation.py)."""
    # validation reads the loss registry, which brings torch: imported on the first config
    # built, so `import preftune` and `preftune --help` stay fast
    from preftune import validation

    sections = _sections(_raw_items(source, overrides), validation.loss_hparam_names())
    built = {}
    for sec, cls in SECTIONS.items():
        types = {f.name: f.type for f in fields(cls)}
        built[sec] = cls(**{k: _coerce(k, v, types[k]) for k, v in sections[sec].items()})
    cfg = Config(**built)
    validation.validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict:
    """A config file's mapping; what stops it being read is one ConfigError naming the file."""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}; give a YAML file of key: value lines")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem}); fix the file") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of key: value lines")
    return loaded


def help_text() -> str:
    lines = []
    for sec, cls in SECTIONS.items():
        lines.append(f"[{sec}]")
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name} = {json.dumps(default)}")
    return "\n".join(lines)
