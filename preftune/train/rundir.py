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

import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
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
    "compile",
    "reference_offload",  # where the frozen copy's layers wait, not what they hold
    "log_samples",
    "generation_batch_size",
}
# lr, and how long to train, change the schedule from the checkpoint's step on: applied and said
APPLIED_ON_RESUME = RESUMABLE | {"lr", "max_steps", "epochs", "resume", "overwrite"}
LOCK = ".lock"
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
    for key in ("resume", "overwrite"):
        raw.pop(key, None)
    return raw


def _flat_values(cfg: Config) -> dict:
    flat = cfg.flat()
    args = flat.pop("loss_args", {}) or {}
    return {**flat, **args}


def training_keys(cfg: Config) -> dict:
    """The keys that define what a run trains (all but APPLIED_ON_RESUME), as JSON values:
    stored in each checkpoint and compared on resume."""
    values = _flat_values(cfg)
    return json.loads(json.dumps({k: v for k, v in values.items() if k not in APPLIED_ON_RESUME}))


def _refuse(run_dir: Path, key: str, new, old) -> None:
    raise ConfigError(
        f"resume={run_dir}: {key}={new!r} differs from the run's {key}={old!r}; a resumed run "
        f"continues the same training (only lr, max_steps, epochs and the logging/saving keys "
        f"may change). Drop {key}, or start a new run with another run_name"
    )


def check_same_training(run_dir: Path, saved: dict, cfg: Config) -> None:
    """Refuse a resume whose training keys differ from those a checkpoint was taken under."""
    now = training_keys(cfg)
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            _refuse(run_dir, key, now.get(key), saved.get(key))


def resume_config(run_dir: str | Path, config=None, overrides=None) -> tuple[Config, list[str]]:
    """The resumed run's Config: DIR's config.yaml plus what is given now; returns it with the
    lines that say which keys were applied. Refuses a changed key that would alter training."""
    run_dir = Path(run_dir).expanduser().resolve()
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
        if not isinstance(base, dict):
            raise TypeError(
                f"a mapping of config keys expected, found a {type(base).__name__}; restore the "
                f"config.yaml the run wrote"
            )
        old = _flat_values(build_config(base))
    except (yaml.YAMLError, ConfigError, TypeError, UnicodeDecodeError) as e:
        raise ConfigError(f"resume={run_dir}: its config.yaml cannot be read ({e})") from None
    for path in ckpt.list_checkpoints(run_dir / "checkpoints"):
        ckpt.refuse_pickles(path)  # before any model loads
    given = _raw(config, overrides)
    notes = []
    if given.get("bf16") == "auto" and base.get("bf16") != "auto":
        del given["bf16"]  # decided when the run started (preftune/precision.py)
        notes.append(
            f"resume: bf16=auto keeps the run's bf16={old['bf16']!r}, decided at its start"
        )
    try:
        after = build_config({**base, **given, "resume": str(run_dir), "overwrite": False})
    except ConfigError:  # e.g. another loss, which the saved loss_args do not fit
        changed = sorted(
            k for k, v in given.items() if k not in APPLIED_ON_RESUME and v != old.get(k)
        )
        if changed:
            k = "loss" if "loss" in changed else changed[0]
            _refuse(run_dir, k, given[k], old.get(k))
        raise
    absolute_paths(after)  # a relative path given again names the same file
    new = _flat_values(after)
    changed = {k for k in new if new[k] != old.get(k)} - {"resume", "overwrite"}
    for k in sorted(changed - APPLIED_ON_RESUME):
        _refuse(run_dir, k, new[k], old.get(k))
    return after, notes + [f"resume: {k} {old.get(k)!r} -> {new[k]!r}" for k in sorted(changed)]


def absolute_paths(cfg: Config) -> None:
    """Local paths in `cfg` made absolute, so its config.yaml works from any directory."""
    for section in (cfg.model, cfg.data, cfg.train, cfg.online):
        for key in PATH_KEYS:
            value = getattr(section, key, None)
            if isinstance(value, str) and value and (Path(value).exists() or key == "output_dir"):
                setattr(section, key, str(Path(value).expanduser().resolve()))


def _lock(path: Path) -> None:
    """Take `path/.lock` (created exclusively); a lock left by a process that no longer runs on
    this host is taken over. Refuses while another live process holds it."""
    lock, me = path / LOCK, {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and _alive(holder.get("pid")):
                raise ConfigError(
                    f"{path} is being written by another preftune run (pid {holder['pid']}); "
                    f"wait for it to end, or pick another run_name"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return
    raise ConfigError(f"{path}: could not take {LOCK}; another run is starting in it")


def _alive(pid) -> bool:
    """Whether `pid` still runs here. A killed process whose parent died too stays a zombie
    until an init that reaps it (containers often have none): it holds nothing, so it is gone."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state field follows the parenthesised command name
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


@dataclass
class RunDir:
    """A claimed run directory; `replaced` is an old run moved aside by overwrite=true, deleted
    once the new run has finished and put back if it fails before its first step."""

    path: Path
    resumed: bool
    replaced: Path | None = None
    owner: bool = True  # the process that claimed it (the main one); the others touch nothing

    def unlock(self) -> None:
        if self.owner:
            (self.path / LOCK).unlink(missing_ok=True)

    def release(self) -> None:
        """The run failed before it started: leave the folder as it was found."""
        if not self.owner:
            return
        self.unlock()
        if not self.resumed and {p.name for p in self.path.iterdir()} <= {"config.yaml"}:
            shutil.rmtree(self.path)
            if self.replaced is not None:
                self.replaced.rename(self.path)

    def finish(self) -> None:
        """The run has ended (finished, or stopped with its directory complete)."""
        self.unlock()
        if self.replaced is not None and self.replaced.exists():
            shutil.rmtree(self.replaced)
            self.replaced = None


def _new_folder(out: Path, name: str | None, default_name: str, overwrite: bool) -> RunDir:
    """Claim out/name (or a fresh default name) for a new run."""
    if name is None:
        base = f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        for n in range(1, 1000):
            path = out / (base if n == 1 else f"{base}-{n}")
            try:
                path.mkdir()
            except FileExistsError:  # a default name taken by a run started in the same second
                continue
            _lock(path)
            return RunDir(path, resumed=False)
        raise ConfigError(f"{out}: no free run name starting with {base}; set run_name")
    if name in (".", "..") or Path(name).name != name:
        raise ConfigError(f"run_name={name!r} must be a plain folder name (no '/' or '..')")
    path, replaced = out / name, None
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"{path} already holds a run; continue it with resume={path}, replace it with "
                f"overwrite=true, or pick another run_name"
            )
        _lock(path)  # refuses while that run is still going
        (path / LOCK).unlink()
        replaced = out / f".replaced-{name}-{os.getpid()}"
        path.rename(replaced)  # deleted once the new run has finished (RunDir.finish)
    path.mkdir(exist_ok=True)
    _lock(path)
    if any(p.name != LOCK for p in path.iterdir()):  # another run got in between
        (path / LOCK).unlink()
        raise ConfigError(f"{path} already holds a run; pick another run_name")
    return RunDir(path, resumed=False, replaced=replaced)


def claim(cfg: Config, default_name: str) -> RunDir:
    """The run's directory, locked: for a resume, DIR (which must hold config.yaml); for a new
    run a fresh folder, holding config.yaml when this returns."""
    t = cfg.train
    if t.resume:
        path = Path(t.resume).expanduser().resolve()
        if not (path / "config.yaml").exists():
            raise ConfigError(f"resume={path}: not a preftune run directory (no config.yaml)")
        _lock(path)
        return RunDir(path, resumed=True)
    out = Path(t.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = _new_folder(out, t.run_name, default_name, t.overwrite)
    t.run_name = run.path.name
    absolute_paths(cfg)
    save_config(cfg, run.path)
    return run


def claim_once(cfg: Config, default_name: str) -> RunDir:
    """`claim` on the main process only; every process gets its answer (the folder, or the
    error it raised), so two processes never pick two folders or both claim one."""
    # as accelerate's AcceleratorState builds it, so the Accelerator made next shares it
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if state.num_processes == 1:
        return claim(cfg, default_name)
    answer: list = [None]
    error = None
    if state.is_main_process:
        try:
            answer = [claim(cfg, default_name)]
        except Exception as e:  # every process must hear of it, or the others wait for ever
            error, answer = e, [f"{type(e).__name__}: {e}"]
    broadcast_object_list(answer, from_process=0)
    if error is not None:
        raise error
    if isinstance(answer[0], str):
        raise ConfigError(f"the main process could not claim the run directory: {answer[0]}")
    cfg.train.run_name = answer[0].path.name
    absolute_paths(cfg)
    if state.is_main_process:
        return answer[0]
    return RunDir(answer[0].path, answer[0].resumed, owner=False)


def resolve(config=None, overrides=None) -> Config:
    """The Config of a run about to start: `build_config(config, overrides)`, or for
    `resume=DIR` the resumed run's (see `resume_config`, whose notes are printed here, to
    stderr and whatever `quiet` says)."""
    cfg = build_config(config, overrides)
    if not cfg.train.resume:
        return cfg
    cfg, notes = resume_config(cfg.train.resume, config, overrides)
    for line in notes:
        print(f"[preftune] {line}", file=sys.stderr, flush=True)
    return cfg


def save_config(cfg: Config, run_dir: Path) -> None:
    """config.yaml, written atomically (a kill leaves the old one or the new one), without
    `overwrite` (re-running it must not replace the run)."""
    overwrite, cfg.train.overwrite = cfg.train.overwrite, False
    tmp = run_dir / ".tmp-config.yaml"
    try:
        cfg.save(tmp)
    finally:
        cfg.train.overwrite = overwrite
    tmp.replace(run_dir / "config.yaml")
