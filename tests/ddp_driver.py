"""Runs several preftune trainings in one multi-process launch (torchrun), so the tests pay for
one process group: `python -m torch.distributed.run ... tests/ddp_driver.py jobs.json`.

jobs.json is a list of {"kind": "train" | "online" | "reward", "args": {config keys}}. After
each job every process writes the SHA-256 of its trained weights to
`<run_dir>/weights-rank<r>.sha256`: equal digests mean the processes stayed in sync.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch

from preftune.train.loop import run
from preftune.train.online import ONLINE_METHODS, validate_online
from preftune.train.reward import RewardTrainer
from preftune.train.rundir import resolve
from preftune.train.trainer import Trainer


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(path: str) -> None:
    for job in json.loads(open(path).read()):
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
