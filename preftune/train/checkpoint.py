"""Checkpoints: the one place that writes and reads them. Tensors in safetensors, the rest in
JSON, nothing unpickled.

A checkpoint `checkpoints/step-N/` holds what "resumed equals uninterrupted" needs:
  weights.safetensors   trainable weights
  state.safetensors     every other tensor: optimizer moments, RNG states, loss / calibration state
  state.json            the rest (step, optimizer hyper-parameters, scheduler, Python and NumPy
                        RNG), with each tensor replaced by its key in state.safetensors
  manifest.json         size and SHA-256 of each file above; written last

It is written under a temporary name, fsynced, then renamed: a kill at any moment leaves the
earlier checkpoints alone and at most a stray `.tmp-*` folder, which is ignored and later
removed. A checkpoint whose files do not match its manifest (truncated, corrupted, half copied)
is passed over for the newest one that does, with a line saying so. A folder that holds a
pickle file (`*.pt`, `*.pkl`, `*.bin`, ...) is refused outright: preftune does not unpickle, and
such a folder was not written by it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from preftune.errors import UserError
from preftune.models import pickle_files

_STEP_RE = re.compile(r"^step-(\d+)$")
FILES = ("weights.safetensors", "state.safetensors", "state.json")


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from: foreign, corrupt, or for another model."""


# ---- state <-> (tensors, JSON) ------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    """A run's JSON file, whole or not at all: a kill mid-write leaves the previous file, never
    an empty one."""
    _write_whole(path, json.dumps(obj, indent=1, default=str))


def _write_whole(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def truncate_jsonl(path: Path, step: int, warn: Callable[[str], None]) -> None:
    """Keep the rows of a run's JSONL log (metrics, online samples) up to `step`, the step a
    resume continues from, rewritten whole. A partial last line (a kill mid-write) is dropped
    with a warning; an unreadable line before it is an error naming it."""
    if not path.exists():
        return
    numbered = [(i, ln) for i, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]
    kept = []
    for i, line in numbered:
        row, problem = json_object(line)
        if problem and i != numbered[-1][0]:
            raise UserError(
                f"{path}:{i}: not a JSON row ({problem}); the file is damaged: remove that line "
                f"and resume again"
            )
        if problem:
            warn(f"{path}:{i}: dropped a partial last line (a write cut short by a kill)")
        elif row.get("step", 0) <= step:
            kept.append(line)
    _write_whole(path, "".join(ln + "\n" for ln in kept))


def json_object(line: str) -> tuple[dict, str | None]:
    """(the JSON object on `line`, None), or ({}, what is wrong with it)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return {}, f"{err.msg} at column {err.colno}"
    return (row, None) if isinstance(row, dict) else ({}, f"a {type(row).__name__}, not an object")


def encode(obj, tensors: dict[str, torch.Tensor]):
    """`obj` as JSON-able data; each tensor moved into `tensors` under a numbered key that
    replaces it. Tuples and dicts with non-string keys (an optimizer's parameter ids) are tagged
    so that `decode` gives back exactly what went in."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        t = obj.detach().cpu().contiguous()
        seen = {v.untyped_storage().data_ptr() for v in tensors.values() if v.numel()}
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()  # safetensors refuses two tensors sharing memory
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[k, encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: decode(v, tensors) for k, v in obj["__items__"]}
    return {k: decode(v, tensors) for k, v in obj.items()}


def rng_state() -> dict:
    """This process's generators: Python's, NumPy's, torch's and, where present, CUDA's."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


# ---- writing ------------------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def fsync_tree(path: Path) -> None:
    """fsync every file below `path`, and `path` itself."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_entry(path)


def fsync_entry(path: Path) -> None:
    """fsync a folder, so that names created or renamed in it are on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Rename the fsynced folder `tmp` to `final`; an existing `final` is renamed aside first
    and deleted only after, so a kill leaves one of the two under a name it can be found by."""
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)  # the commit point
    fsync_entry(final.parent)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(
    ckpt_root: Path, step: int, model, optimizer, scheduler, state: dict, keep: int, rng=None
) -> Path:
    """Write `checkpoints/step-{step}` atomically and keep the newest `keep` of those up to it.
    `state` is the trainer's: JSON-able values plus tensors anywhere inside `state["tensors"]`;
    `rng` every process's generator states (default: this process's)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".tmp-step-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "weights.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    payload = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng if rng is not None else [rng_state()],
        **state,
    }
    doc = encode(payload, tensors)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(doc))
    manifest = {
        f: {"bytes": (tmp / f).stat().st_size, "sha256": file_digest(tmp / f)} for f in FILES
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    fsync_tree(tmp)
    publish(tmp, final)
    prune(ckpt_root, step, keep)
    return final


def prune(ckpt_root: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step`: never the one just written, nor one newer
    than it (moved aside on resume, not pruned)."""
    upto = [p for p in list_checkpoints(ckpt_root) if step_of(p) <= step]
    for old in upto[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def step_of(path: Path) -> int:
    return int(_STEP_RE.match(path.name).group(1))


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.exists():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


# ---- reading ------------------------------------------------------------------------------------
def refuse_pickles(path: Path) -> None:
    if found := pickle_files(path):
        raise CheckpointError(
            f"{path} holds {', '.join(found)}, a pickle file that could run code when loaded; "
            f"preftune never unpickles and did not write it. Resume only runs preftune wrote "
            f"(or delete that checkpoint folder to fall back to an earlier one)"
        )


def verify(path: Path) -> str | None:
    """None when every file of the checkpoint matches its manifest, else what is wrong."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return "manifest.json is missing or unreadable"
    # a sharded checkpoint (train/dcp.py) lists its state files and each process's shard
    sharded = manifest.get("sharded")
    names = FILES if sharded is None else (*FILES[1:], *sharded.get("files", ["shards/"]))
    for name in names:
        f = path / name
        want = manifest.get(name, {})
        if not f.exists():
            return f"{name} is missing"
        if f.stat().st_size != want.get("bytes"):
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want.get('bytes')}"
        if file_digest(f) != want.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(ckpt_root: Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint whose files match its manifest; each newer one passed over is
    named with the reason."""
    for path in reversed(list_checkpoints(ckpt_root)):
        problem = verify(path)
        if problem is None:
            return path
        log(f"checkpoint {path} is incomplete or corrupt ({problem}); trying an older one")
    return None


def sharded_by(path: Path) -> str | None:
    """The engine whose processes each wrote a shard of checkpoint `path` ("FSDP2", "DeepSpeed
    ZeRO-2", ...), or None for one written whole (one process, DDP)."""
    if not (path / "shards").is_dir():
        return None
    try:
        sharded = json.loads((path / "manifest.json").read_text()).get("sharded") or {}
    except (OSError, ValueError):
        sharded = {}
    return sharded.get("engine", "FSDP2")  # FSDP2's, before other engines wrote shards


def check_written_by(path: Path, engine: str | None) -> None:
    """Refuse, in one line, a checkpoint written under another engine than this run's `engine`
    (None: whole): each lays its tensors out its own way."""
    by = sharded_by(path)
    if by == engine:
        return
    if by is None:
        raise CheckpointError(
            f"checkpoint {path} was written by an unsharded run and this run shards the model "
            f"({engine}); resume it with the launch that wrote it (DDP or one process)"
        )
    config = by.split()[-1].lower().replace("-", "")  # fsdp2, zero2, zero3
    raise CheckpointError(
        f"checkpoint {path} was written by {'an' if by == 'FSDP2' else 'a'} {by} run (each "
        f"process its shard){f' and this run is {engine}' if engine else ''}; resume it under "
        f"{by} with as many processes (examples/accelerate/{config}*.yaml)"
    )


def check_processes(path: Path, written: int, num_processes: int) -> None:
    """Refuse, in one line, a resume with another number of processes than wrote `path`."""
    if written != num_processes:
        raise CheckpointError(
            f"checkpoint {path} was written by {written} processes and this run has "
            f"{num_processes}; resume with {written} processes (each continues its own data "
            f"share and random generators)"
        )


def read_state(path: Path) -> dict:
    """Everything but the weights, as it was saved: optimizer, scheduler, rng and the trainer's."""
    refuse_pickles(path)
    tensors = load_file(str(path / "state.safetensors"))
    return decode(json.loads((path / "state.json").read_text()), tensors)


def load_checkpoint(
    path: Path, model, optimizer, scheduler, rank: int = 0, num_processes: int = 1
) -> dict:
    """Load weights, optimizer, scheduler and process `rank`'s RNG states (of a checkpoint
    written by `num_processes` processes); return the trainer's state."""
    check_written_by(path, None)
    try:
        state = read_state(path)
        weights = load_file(str(path / "weights.safetensors"))
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({e}); delete it to resume from an earlier one"
        ) from None
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = expected - set(weights), set(weights) - expected
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(extra)[:3]}; was it written with other model or LoRA settings?"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    rngs = state.pop("rng")
    check_processes(path, len(rngs), num_processes)
    set_rng_state(rngs[rank])
    state.setdefault("tensors", {})
    return state
