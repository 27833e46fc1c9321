"""Checkpoints of a sharded (FSDP2) run: each process writes its own shard of the trainable
weights and optimizer moments with torch distributed checkpointing, as safetensors, and nothing
is pickled (accelerate's `save_state` pickles; torch's `HuggingFaceStorageWriter` does not).

    step-N/shards/shard-0000R-model-00001-of-00001.safetensors   process R-1's shards (DCP)
    step-N/state.safetensors, state.json    the rest, as in checkpoint.py, from the main process:
                                            scheduler, optimizer hyper-parameters and step
                                            counts, every process's RNG states, the trainer's
    step-N/manifest.json                    size and SHA-256 of every file above, written last

The guarantees are checkpoint.py's: written under `.tmp-step-N`, fsynced and renamed by the main
process once every shard is on disk; a checkpoint that does not match its manifest is passed
over; a pickle file is refused. The checkpoint folder must be one filesystem every process sees
(several machines: a shared one). A sharded checkpoint resumes with the same number of processes
(each continues its own data share and random generators). `start_sharded` and
`finish_sharded` are the frame of every engine's sharded checkpoint: DeepSpeed ZeRO's
(train/ds_checkpoint.py) writes its own shards inside it; the manifest names the engine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate.utils import gather_object
from safetensors.torch import save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.tensor import DTensor

from preftune.train import checkpoint as ckpt

SHARDS = "shards"


def _sharded_tensors(engine, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(every DTensor to write, keyed for DCP; the optimizer state with them taken out).
    Weights under `weights/<name>`, optimizer moments under `optim/<param index>/<key>`."""
    tensors = {f"weights/{n}": p.detach() for n, p in engine.named_parameters() if p.requires_grad}
    opt = optimizer.state_dict()
    rest = {}
    for i, st in opt["state"].items():
        rest[i] = {k: v for k, v in st.items() if not isinstance(v, DTensor)}
        tensors.update({f"optim/{i}/{k}": v for k, v in st.items() if isinstance(v, DTensor)})
    return tensors, {"state": rest, "param_groups": opt["param_groups"]}


def save_sharded(acc, ckpt_root: Path, step: int, engine, optimizer, scheduler, state, keep):
    """Every process calls this; returns the checkpoint's path on the main process."""
    tmp, final = start_sharded(acc, ckpt_root, step)
    tensors, optim = _sharded_tensors(engine, optimizer)
    # a collective: each process writes shard-<its rank + 1>-...safetensors
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True))  # fmt: skip
    payload = {
        "optimizer": optim,
        "sharded_keys": sorted(tensors),
        "scheduler": scheduler.state_dict(),
        **state,
    }
    return finish_sharded(acc, tmp, final, keep, payload, "FSDP2")


def start_sharded(acc, ckpt_root: Path, step: int) -> tuple[Path, Path]:
    """(temporary folder, final folder) of checkpoint `step`: the main process makes the
    temporary one afresh, with its shards/ folder, before any process writes there."""
    final, tmp = ckpt_root / f"step-{step}", ckpt_root / f".tmp-step-{step}"
    if acc.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / SHARDS).mkdir(parents=True)
    acc.wait_for_everyone()
    return tmp, final


def finish_sharded(acc, tmp: Path, final: Path, keep: int, payload: dict, engine: str):
    """Once each process has written its shard under tmp/shards/: every process's RNG states
    and `payload` in state.safetensors / state.json, the manifest (`engine` wrote the shards),
    then fsync and rename, by the main process. Every process calls it; returns the
    checkpoint's path on the main process, None on the others."""
    rngs = gather_object([ckpt.rng_state()])
    acc.wait_for_everyone()  # every shard is written
    if not acc.is_main_process:
        return None
    small: dict[str, torch.Tensor] = {}
    doc = ckpt.encode({**payload, "rng": rngs}, small)
    save_file(small, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(doc))
    shards = sorted(f"{SHARDS}/{p.name}" for p in (tmp / SHARDS).iterdir())
    names = ("state.safetensors", "state.json", *shards)
    manifest = {
        f: {"bytes": (tmp / f).stat().st_size, "sha256": ckpt.file_digest(tmp / f)} for f in names
    }
    manifest["sharded"] = {"processes": acc.num_processes, "files": shards, "engine": engine}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    ckpt.fsync_tree(tmp)
    ckpt.publish(tmp, final)
    ckpt.prune(final.parent, ckpt.step_of(final), keep)
    return final


def load_sharded(path: Path, engine, optimizer, scheduler, rank: int, num_processes: int) -> dict:
    """Every process calls this: its shards of the weights and optimizer moments, the
    scheduler, its RNG states; returns the trainer's state (as checkpoint.load_checkpoint)."""
    refuse_pickles(path)
    ckpt.check_written_by(path, "FSDP2")
    state = ckpt.read_state(path)
    rngs = state.pop("rng")
    ckpt.check_processes(path, len(rngs), num_processes)  # before anything is loaded in place
    targets = _targets(path, state.pop("sharded_keys"), engine, optimizer)
    dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(path / SHARDS)))
    optim = state.pop("optimizer")
    for key, t in targets.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/")
            optim["state"][int(index)][name] = t
    optimizer.load_state_dict(optim)
    scheduler.load_state_dict(state.pop("scheduler"))
    ckpt.set_rng_state(rngs[rank])
    state.setdefault("tensors", {})
    return state


def refuse_pickles(path: Path) -> None:
    """A pickle file in the checkpoint or its shards/ folder: refused (checkpoint.py)."""
    for folder in (path, path / SHARDS):
        if folder.is_dir():
            ckpt.refuse_pickles(folder)


def _targets(path: Path, keys: list[str], engine, optimizer) -> dict[str, torch.Tensor]:
    """Where each stored shard goes: a trainable weight (loaded in place) or a zero tensor of its
    optimizer moment's shape and sharding. The stored weights must be the trainable ones."""
    params = {n: p for n, p in engine.named_parameters() if p.requires_grad}
    stored = {k.partition("/")[2] for k in keys if k.startswith("weights/")}
    if stored != set(params):
        missing, extra = sorted(set(params) - stored), sorted(stored - set(params))
        raise ckpt.CheckpointError(
            f"checkpoint {path} holds other weights than this model trains (missing "
            f"{missing[:3]}, unknown {extra[:3]}); was it written with other model or LoRA "
            f"settings?"
        )
    # one parameter group (train/setup.py build_optimizer): moment i belongs to its param i
    (group,) = optimizer.param_groups
    targets = {}
    for key in keys:
        kind, _, rest = key.partition("/")
        if kind == "weights":
            targets[key] = params[rest].detach()
        else:
            targets[key] = torch.zeros_like(group["params"][int(rest.split("/")[0])])
    return targets
