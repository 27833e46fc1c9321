"""The run directory: the one place that decides it, and the one resume resolver.

A run directory belongs to one run. A new run claims its folder with an atomic `mkdir` and
writes `config.yaml` into it at once (with absolute paths, so it resumes from any directory and
even if the run is killed before its first step). A folder that already holds anything is
refused unless the run resumes it (`resume=DIR`) or replaces it (`overwrite=true`). Default
names (`dpo-20261202-061500`) get a `-2`, `-3`, ... suffix when two runs start in the same
second.

`resume=DIR` reads DIR's config.yaml. A key given again with the same value is fine; a key
from RESUMABLE is applied (and said); `lr`, `max_steps` and `epochs` are applied from the
checkpoint's step on (and said: the run then no longer equals an uninterrupted one, unless the
schedule is constant); any other changed key is refused by name, since a resumed run continues
the same training.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import yaml
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env

from preftune.config import Config, ConfigError, build_config, parse_value
from preftune.train import checkpoint as ckpt

# Keys that change how a run is watched or saved, not what it trains.
RESUMABLE = {
    "quiet",
    "report_to",
    "log_every",
    "eval_every",
    "save_every",
    "save_every_minutes",
    "keep_checkpoints",
    "eval_before",
    "eval_max_new_tokens",
    "eval_batch_size",
    "num_task_eval",
    "keep_freed_memory",
    "chunk_size",
    "log_samples",
    "generation_batch_size",
}
# lr, and how long to train, change the schedule from the checkpoint's step on: applied and said
APPLIED_ON_RESUME = RESUMABLE | {"lr", "max_steps", "epochs", "resume", "overwrite"}
# config values that name local files or folders: stored absolute in config.yaml
PATH_KEYS = ("model", "data", "eval_data", "output_dir", "judge", "rso_output")


def _raw(config, overrides) -> dict:
    """The keys given now, as build_config reads them (a Config, dict or YAML path, then
    key=value overrides), without validation."""
    if isinstance(config, Config):
        raw = config.flat()
    elif isinstance(config, dict):
        raw = dict(config)
    elif config is not None:
        raw = yaml.safe_load(Path(config).read_text()) or {}
    else:
        raw = {}
    if isinstance(overrides, dict):
        raw.update(overrides)
    else:
        for item in overrides or []:
            k, v = item.split("=", 1)
            raw[k.strip().lstrip("-").replace("-", "_")] = parse_value(v)
    return raw


def _flat_values(cfg: Config) -> dict:
    flat = cfg.flat()
    args = flat.pop("loss_args", {}) or {}
    return {**flat, **args}


def resume_config(run_dir: str | Path, config=None, overrides=None) -> tuple[Config, list[str]]:
    """The resumed run's Config: DIR's config.yaml plus what is given now; returns it with the
    lines that say which keys were applied. Refuses a changed key that would alter training."""
    run_dir = Path(run_dir).resolve()
    saved = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise ConfigError(f"resume={run_dir}: no such folder; give the run directory to continue")
    if not saved.exists():
        raise ConfigError(
            f"resume={run_dir}: no config.yaml there, so it is not a preftune run directory "
            f"(a run writes it when it starts); give the folder of the run to continue"
        )
    try:
        base = yaml.safe_load(saved.read_text())
        before = build_config(base)
    except (yaml.YAMLError, ConfigError) as e:
        raise ConfigError(f"resume={run_dir}: its config.yaml cannot be read ({e})") from None
    for path in ckpt.list_checkpoints(run_dir / "checkpoints"):
        ckpt.refuse_pickles(path)  # before any model loads
    given = _raw(config, overrides)
    old = _flat_values(before)
    try:
        after = build_config({**base, **given, "resume": str(run_dir), "overwrite": False})
    except ConfigError:  # e.g. another loss, which the saved loss_args do not fit
        after = None
    new = _flat_values(after) if after is not None else given
    changed = {k for k in new if new[k] != old.get(k)}
    refused = sorted(changed - APPLIED_ON_RESUME)
    if refused:
        k = "loss" if "loss" in refused else refused[0]
        raise ConfigError(
            f"resume={run_dir}: {k}={new[k]!r} differs from the run's {k}={old.get(k)!r}; a "
            f"resumed run continues the same training (only lr, max_steps, epochs and the "
            f"logging/saving keys may change). Drop {k}, or start a new run with another run_name"
        )
    if after is None:
        after = build_config({**base, **given, "resume": str(run_dir), "overwrite": False})
    notes = [f"resume: {k} {old.get(k)!r} -> {new[k]!r}" for k in sorted(changed - {"resume"})]
    return after, notes


def absolute_paths(cfg: Config) -> None:
    """Local paths in `cfg` made absolute, so its config.yaml works from any directory."""
    for section in (cfg.model, cfg.data, cfg.train, cfg.online):
        for key in PATH_KEYS:
            value = getattr(section, key, None)
            if isinstance(value, str) and value and (Path(value).exists() or key == "output_dir"):
                setattr(section, key, str(Path(value).expanduser().resolve()))


def _check_writable(folder: Path) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"output_dir={folder}: {probe} is not a writable folder; choose output_dir=<a folder "
            f"you can write>"
        )


def claim(cfg: Config, default_name: str) -> Path:
    """The run's directory: for a resume, DIR (which must hold config.yaml); for a new run a
    fresh folder, claimed atomically and holding config.yaml when this returns."""
    t = cfg.train
    if t.resume:
        path = Path(t.resume).resolve()
        if not (path / "config.yaml").exists():
            raise ConfigError(f"resume={path}: not a preftune run directory (no config.yaml)")
        _save_config(cfg, path / "config.yaml")  # with the keys the resume applied
        return path
    out = Path(t.output_dir).expanduser().resolve()
    _check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    named = t.run_name is not None
    base = t.run_name or f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = out / base
    if named and path.exists() and any(path.iterdir()):
        if not t.overwrite:
            raise ConfigError(
                f"{path} already holds a run; continue it with resume={path}, replace it with "
                f"overwrite=true, or pick another run_name"
            )
        shutil.rmtree(path)
    for n in range(2, 1000):
        try:
            path.mkdir(exist_ok=named)
            break
        except FileExistsError:  # a default name taken by a run started in the same second
            path = out / f"{base}-{n}"
    t.run_name = path.name
    absolute_paths(cfg)
    _save_config(cfg, path / "config.yaml")
    return path


def claim_once(cfg: Config, default_name: str) -> Path:
    """`claim` on the main process only; every process gets its answer (the folder, or the
    error it raised), so two processes never pick two folders or both claim one."""
    # as accelerate's AcceleratorState builds it, so the Accelerator made next shares it
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if state.num_processes == 1:
        return claim(cfg, default_name)
    answer: list = [None]
    if state.is_main_process:
        try:
            answer = [claim(cfg, default_name)]
        except ConfigError as e:
            answer = [str(e)]
    broadcast_object_list(answer, from_process=0)
    if isinstance(answer[0], str):
        raise ConfigError(answer[0])
    cfg.train.run_name = answer[0].name
    absolute_paths(cfg)
    return answer[0]


def resolve(config=None, overrides=None) -> Config:
    """The Config of a run about to start: `build_config(config, overrides)`, or for
    `resume=DIR` the resumed run's (see `resume_config`, whose notes are printed here)."""
    cfg = build_config(config, overrides)
    if not cfg.train.resume:
        return cfg
    cfg, notes = resume_config(cfg.train.resume, config, overrides)
    for line in notes if not cfg.train.quiet else []:
        print(f"[preftune] {line}", flush=True)
    return cfg


def release(path: Path) -> None:
    """Remove a run directory claimed by a run that failed before it started, if it holds
    nothing but its config.yaml."""
    if path.is_dir() and {p.name for p in path.iterdir()} <= {"config.yaml"}:
        shutil.rmtree(path)


def _save_config(cfg: Config, path: Path) -> None:
    tmp = path.with_name(".tmp-config.yaml")
    cfg.save(tmp)
    tmp.replace(path)  # atomic: a kill leaves the old config.yaml or the new one
