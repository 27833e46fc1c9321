"""Small list and file helpers of the online loops."""

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
