"""Checkpoints of a DeepSpeed ZeRO-2 / ZeRO-3 run, with nothing pickled (DeepSpeed's own
`save_checkpoint` writes torch.save pickles, which preftune never loads).

    step-N/shards/rank-R.safetensors   process R's block of the trainable parameters, each whole
                                       and in fp32: its master weight `fp32/<name>` and AdamW's
                                       moments `exp_avg/<name>`, `exp_avg_sq/<name>`
    step-N/state.safetensors, state.json, manifest.json   as train/dcp.py writes them: scheduler,
                                       AdamW's step count and hyper-parameters, every process's
                                       RNG states, the trainer's counters

Whole tensors by parameter name, not each process's ZeRO partition: the partitions are
DeepSpeed's internal layout (flat groups, alignment padding, ZeRO-3's per-parameter split), which
changes with the stage, the process count and DeepSpeed's version, while a tensor per name is
read by any safetensors reader and checked against the model by name. The cost is DeepSpeed's
public per-parameter API (deepspeed.utils `safe_get_full_fp32_param`,
`safe_get_full_optimizer_state`): each tensor is assembled by one collective on every process
(an all-reduce under ZeRO-1/2, an all-gather under ZeRO-3), all processes in the same order, so a
checkpoint moves 3 fp32 copies of the trainable weights through the process group. The disk
writes are spread: process R keeps and writes only its contiguous block of parameters (blocks of
about equal elements), about 1/N of the checkpoint each, holding at most that block and one
whole parameter at a time.

Restoring sets the fp32 masters and the moments with `safe_set_full_*` (each process copies its
own fragments, no collective), and the model's working parameters too, which ZeRO keeps apart
from the masters: whole on every process under ZeRO-2 (copied in), partitioned under ZeRO-3
(`deepspeed.zero.GatheredParameters`: a gather and a broadcast per parameter). The guarantees
are dcp.py's (atomic, verified, no pickle); a resume needs the stage and the number of processes
that wrote the checkpoint, and refuses others in one line.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from preftune.train import checkpoint as ckpt
from preftune.train.dcp import SHARDS, finish_sharded, refuse_pickles, start_sharded

MASTER = "fp32"  # the key prefix of the fp32 master weights; the moments' are their own names


def engine_name(engine) -> str:
    """What the manifest calls the engine that wrote a checkpoint ("DeepSpeed ZeRO-2")."""
    return f"DeepSpeed ZeRO-{engine.zero_optimization_stage()}"


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters, named as the module accelerate prepared names them; the same
    order on every process (the collectives below pair up in it)."""
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _owners(params: list, processes: int) -> list[int]:
    """The process that writes each parameter: contiguous blocks of about equal elements (a
    parameter goes to the block its middle element falls in)."""
    sizes = [getattr(p, "ds_numel", p.numel()) for _, p in params]  # ZeRO-3: p holds none
    total, seen, owners = max(sum(sizes), 1), 0, []
    for n in sizes:
        owners.append(min(processes - 1, (seen + n // 2) * processes // total))
        seen += n
    return owners


def _flat_state(engine) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    """(the torch AdamW that ZeRO steps, the flat fp32 partitions that key its state). DeepSpeed
    has no public accessor for these: the attribute names are ZeRO-1/2's and ZeRO-3's own."""
    zero = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        return zero.optimizer, list(zero.fp32_partitioned_groups_flat)
    return zero.optimizer, list(zero.single_partition_of_fp32_groups)


def save_zero(acc, ckpt_root: Path, step: int, engine, optimizer, scheduler, state, keep: int):
    """Every process calls this (each assembles every tensor, writes its block); returns the
    checkpoint's path on the main process, None on the others. `optimizer` (accelerate's
    wrapper) is not read: the engine holds ZeRO's optimizer."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    tmp, final = start_sharded(acc, ckpt_root, step)
    base, flats = _flat_state(engine)
    first = base.state.get(flats[0], {})  # every flat group has taken the same steps
    if not first and not isinstance(base, torch.optim.SGD) and engine.global_steps > 0:
        # only plain SGD keeps no state after a step (no moments, no step count); AdamW's would
        # be lost. Before any step of this process's engine (an online run whose pairs all tied;
        # global_steps counts this process's steps, a resumed run's from 0 with its state
        # loaded) there is none to keep
        raise ckpt.CheckpointError(
            f"{type(base).__name__} holds no state to checkpoint at step {step}; checkpoints "
            f"are written after an optimizer step"
        )
    moments = sorted(k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0)
    params, mine = _trainable(engine), {}
    for (name, p), owner in zip(params, _owners(params, acc.num_processes)):
        for key in (MASTER, *moments):
            full = (
                safe_get_full_fp32_param(p)
                if key == MASTER
                else safe_get_full_optimizer_state(p, key)
            )  # a collective, on every process
            if owner == acc.process_index:
                mine[f"{key}/{name}"] = full.detach().cpu().contiguous()
    save_file(mine, str(tmp / SHARDS / f"rank-{acc.process_index}.safetensors"))
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    payload = {
        "optimizer": {"moments": moments, "step": first.get("step"), "param_groups": hyper},
        "scheduler": scheduler.state_dict(),
        **state,
    }
    return finish_sharded(acc, tmp, final, keep, payload, engine_name(engine))


def load_zero(path: Path, engine, optimizer, scheduler, rank: int, num_processes: int) -> dict:
    """Every process calls this: the fp32 masters, moments and working parameters, AdamW's step
    count, the scheduler, its RNG states; returns the trainer's state (as dcp.load_sharded)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    refuse_pickles(path)
    ckpt.check_written_by(path, engine_name(engine))
    state = ckpt.read_state(path)
    rngs = state.pop("rng")
    ckpt.check_processes(path, len(rngs), num_processes)  # before anything is loaded in place
    saved = state.pop("optimizer")
    params = _trainable(engine)
    with contextlib.ExitStack() as stack:
        where = _stored_tensors(path, stack)
        _check_tensors(path, where, params, saved["moments"])
        _create_optimizer_state(engine, saved)
        for name, p in params:
            master = where[f"{MASTER}/{name}"].get_tensor(f"{MASTER}/{name}")
            safe_set_full_fp32_param(p, master)
            for key in saved["moments"]:
                value = where[f"{key}/{name}"].get_tensor(f"{key}/{name}")
                safe_set_full_optimizer_state(p, value, key)
            _set_working(engine, p, master)
    scheduler.load_state_dict(state.pop("scheduler"))
    ckpt.set_rng_state(rngs[rank])
    state.setdefault("tensors", {})
    return state


def _stored_tensors(path: Path, stack: contextlib.ExitStack) -> dict:
    """Each stored key -> the open shard that holds it (read a tensor at a time, not whole)."""
    where = {}
    for f in sorted((path / SHARDS).glob("*.safetensors")):
        handle = stack.enter_context(safe_open(str(f), framework="pt"))
        where.update(dict.fromkeys(handle.keys(), handle))
    return where


def _check_tensors(path: Path, where: dict, params: list, moments: list[str]) -> None:
    """Every tensor the load will copy exists with its parameter's shape, checked before
    anything is loaded in place."""
    stored = {k.partition("/")[2] for k in where if k.startswith(f"{MASTER}/")}
    names = {n for n, _ in params}
    if stored != names:
        missing, extra = sorted(names - stored), sorted(stored - names)
        raise ckpt.CheckpointError(
            f"checkpoint {path} holds other weights than this model trains (missing "
            f"{missing[:3]}, unknown {extra[:3]}); was it written with other model or LoRA "
            f"settings?"
        )
    for name, p in params:
        want = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3: p itself is empty
        for key in (MASTER, *moments):
            if f"{key}/{name}" not in where:
                raise ckpt.CheckpointError(f"checkpoint {path} has no {key}/{name}; it is damaged")
            got = tuple(where[f"{key}/{name}"].get_slice(f"{key}/{name}").get_shape())
            if got != want:
                raise ckpt.CheckpointError(
                    f"checkpoint {path}: {key}/{name} has shape {list(got)}, this model's "
                    f"parameter {list(want)}; was it written with another model?"
                )


def _create_optimizer_state(engine, saved: dict) -> None:
    """The optimizer's state, before the first step: ZeRO creates it in that step, and
    `safe_set_full_optimizer_state` writes into it, so it is made here as torch's first step
    makes it (zero moments), with the saved step count and hyper-parameters. The step count
    lives in the torch optimizer's state (one per flat group) and DeepSpeed has no public call
    that sets it, so it is set there, on the device torch's own `load_state_dict` puts it: the
    parameter's for a fused or capturable group (preftune's AdamW is fused), else the CPU."""
    base, flats = _flat_state(engine)
    group_of = {id(p): g for g in base.param_groups for p in g["params"]}
    for flat in flats:
        st = base.state[flat]
        if saved["step"] is not None:
            g = group_of.get(id(flat), {})
            on = flat.device if g.get("fused") or g.get("capturable") else torch.device("cpu")
            st["step"] = saved["step"].to(device=on, dtype=torch.float32)
        for key in saved["moments"]:
            st.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
    for group, hyper in zip(base.param_groups, saved["param_groups"]):
        group.update(hyper)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None and saved["moments"]:  # (none: ZeRO links them after its first step)
        # ZeRO-1/2 point each parameter at its fragment of the moments after their first step
        # (ZeRO-3 finds them through the optimizer's state); no public call does it before
        link()


def _set_working(engine, p: torch.nn.Parameter, master: torch.Tensor) -> None:
    """The model's own copy of a parameter (in the run's dtype) from its fp32 master, as ZeRO's
    step leaves it: whole on each process (ZeRO-2), or gathered, set and partitioned again
    (ZeRO-3; every process sets the same value, process 0's is broadcast)."""
    if engine.zero_optimization_stage() != 3:
        with torch.no_grad():
            p.data.copy_(master.view_as(p))
        return
    from deepspeed import zero

    with zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
        p.data.copy_(master.view_as(p))
