"""Runs several preftune trainings in one multi-process launch (torchrun), so the tests pay for
one process group: `python -m torch.distributed.run ... tests/ddp_driver.py jobs.json`.

jobs.json is a list of {"kind": "train" | "online" | "reward", "args": {config keys}}, with
"nan_on_rank": r and "nan_from_call": n to make DPO's loss NaN on process r from its n-th call
on. After each job every process writes the SHA-256 of its trained weights to
`<run_dir>/weights-rank<r>.sha256` (equal digests: the processes stayed in sync), or for a job
that raised a preftune error, its message to `<output_dir>/<run_name>.error-rank<r>`. A job's
"env" is what `accelerate launch` would set from its config file (FSDP2, DeepSpeed).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from run_helpers import nan_dpo_from_call
from torch.distributed.tensor import DTensor

from preftune.errors import UserError
from preftune.losses import LOSSES
from preftune.train.deepspeed import ZeroSharding, local_optimizer_numel
from preftune.train.entry import ONLINE_METHODS
from preftune.train.loop import run
from preftune.train.reward import RewardTrainer
from preftune.train.rundir import resolve
from preftune.train.sharding import local_numel
from preftune.train.trainer import Trainer
from preftune.validation import validate_online


def digest(model: torch.nn.Module) -> str:
    """SHA-256 of the trainable weights; a sharded (FSDP2) weight is gathered first (every
    process takes part, in the same order)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            w = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
            h.update(name.encode())
            h.update(w.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def count_grads(trainer) -> dict:
    """Wrap the optimizer's step to note the gradient elements this process holds at it."""
    seen = {}
    opt = trainer.optimizer
    step = opt.step

    def counted(*args, **kwargs):
        seen["grads"] = local_numel([p.grad for p in trainer.stepper.params if p.grad is not None])
        return step(*args, **kwargs)

    opt.step = counted
    return seen


def local_sizes(trainer, seen: dict) -> dict:
    """Elements this process holds of the trainable parameters, their gradients at the last
    step and the optimizer state."""
    params = [p for p in trainer.policy.parameters() if p.requires_grad]
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    moments = [v for st in inner.state.values() for v in st.values() if v.dim() > 0]
    sizes = {"params": local_numel(params), "optimizer": local_numel(moments), **seen}
    ref = getattr(trainer.reference, "model", None)
    if ref is not None and ref is not trainer.policy:  # a frozen copy; ZeRO-3: its partition
        sizes["reference"] = local_numel([getattr(p, "ds_tensor", p) for p in ref.parameters()])
    return sizes


def main(path: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    for job in json.loads(open(path).read()):
        if job.get("nan_on_rank") == rank:
            LOSSES["dpo"] = nan_dpo_from_call(job["nan_from_call"])
        os.environ.update(job.get("env", {}))  # FSDP2: what `accelerate launch` would set
        try:
            run_job(job)
        except UserError as e:
            args = job["args"]
            where = (
                Path(args["resume"])
                if "resume" in args
                else Path(args["output_dir"], args["run_name"])
            )
            Path(f"{where}.error-rank{rank}").write_text(str(e))
        for key in job.get("env", {}):
            del os.environ[key]
        # a DeepSpeed job's plugin (its config) lives in accelerate's state: the next job's own
        AcceleratorState._reset_state(reset_partial_state=False)
    if torch.distributed.is_initialized():  # no process exits while another still talks to it
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_job(job: dict) -> None:
    cfg = resolve(job["args"])
    if job["kind"] == "online":
        validate_online(cfg)
        trainer = ONLINE_METHODS[cfg.online.method](cfg)
    else:
        trainer = (RewardTrainer if job["kind"] == "reward" else Trainer)(cfg)
    seen = count_grads(trainer)
    run(trainer)
    rank = trainer.acc.process_index
    (trainer.run_dir / f"weights-rank{rank}.sha256").write_text(digest(trainer.policy))
    sizes = local_sizes(trainer, seen)
    if isinstance(trainer.sharding, ZeroSharding):  # its fp32 master weights and moments
        sizes.update(local_optimizer_numel(trainer.optimizer))
    sizes = json.dumps(sizes)
    (trainer.run_dir / f"sizes-rank{rank}.json").write_text(sizes)
    trainer.acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
