"""What the online and reward trainers share with the offline `Trainer`, minus its model and data.

`Trainer.__init__` loads a causal LM and tokenized pairs; the online trainers need prompts
instead, the reward trainer a sequence classifier. They call `preftune.train.trainer.
prepare_trainer` with their own loaders (the same setup `Trainer.__init__` runs), so they keep
every other `Trainer` method and the one loop in `preftune.train.loop.run`.
"""

from __future__ import annotations

import json
from pathlib import Path


def split_even(items: list, parts: int) -> list[list]:
    """`items` in `parts` contiguous chunks whose sizes differ by at most one (some may be
    empty): the micro-batches of a step whose number of pairs is only known after judging."""
    n = len(items)
    return [items[(i * n) // parts : ((i + 1) * n) // parts] for i in range(parts)]


def append_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")


def split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """`[config.yaml] key=value ...` -> (config path or None, overrides)."""
    argv = list(argv)
    if argv and "=" not in argv[0]:
        return argv[0], argv[1:]
    return None, argv


def relabel_summary(trainer, result, method: str, loss_name: str):
    """`loop.run` records `cfg.loss.loss` as the run's loss; record what was trained instead."""
    result.metrics.update({"method": method, "loss_name": loss_name})
    path = result.run_dir / "summary.json"
    if trainer.acc.is_main_process and path.exists():
        summary = json.loads(path.read_text())
        summary.update({"method": method, "loss_name": loss_name})
        path.write_text(json.dumps(summary, indent=1, default=str))
    return result
