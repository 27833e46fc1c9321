"""Runs several preftune trainings in one multi-process launch (torchrun), so the tests pay for
one process group: `python -m torch.distributed.run ... tests/ddp_driver.py jobs.json`.

jobs.json is a list of {"kind": "train" | "online" | "reward", "args": {config keys}}, with
"nan_on_rank": r and "nan_from_call": n to make DPO's loss NaN on process r from its n-th call
on. After each job every process writes the SHA-256 of its trained weights to
`<run_dir>/weights-rank<r>.sha256` (equal digests: the processes stayed in sync), or for a job
that raised a preftune error, its message to `<output_dir>/<run_name>.error-rank<r>`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from run_helpers import nan_dpo_from_call

from preftune.errors import UserError
from preftune.losses import LOSSES
from preftune.train.entry import ONLINE_METHODS
from preftune.train.loop import run
from preftune.train.reward import RewardTrainer
from preftune.train.rundir import resolve
from preftune.train.trainer import Trainer
from preftune.validation import validate_online


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(path: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    for job in json.loads(open(path).read()):
        if job.get("nan_on_rank") == rank:
            LOSSES["dpo"] = nan_dpo_from_call(job["nan_from_call"])
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


def run_job(job: dict) -> None:
    cfg = resolve(job["args"])
    if job["kind"] == "online":
        validate_online(cfg)
        trainer = ONLINE_METHODS[cfg.online.method](cfg)
    else:
        trainer = (RewardTrainer if job["kind"] == "reward" else Trainer)(cfg)
    run(trainer)
    rank = trainer.acc.process_index
    (trainer.run_dir / f"weights-rank{rank}.sha256").write_text(digest(trainer.policy))
    trainer.acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
