"""Reading and validating preference records.

Sources: a JSONL file, a Parquet file, a directory written by ``datasets.save_to_disk``, a
Hugging Face hub id (needs the network), or a Python list of dicts.

Canonical record kinds
- paired:   {"prompt", "chosen", "rejected"} — strings (standard form) or message lists
            (conversational form). Implicit prompt: {"chosen", "rejected"} only, whose shared
            prefix (the common leading messages, or the common leading text) becomes the prompt.
- unpaired: {"prompt", "completion", "label"} with a boolean label (True = desirable), for KTO.

Every problem is an error naming the source, the line (1-based, as an editor shows it) and the
field, with what to do. ``skip_invalid=True`` drops bad records instead, and the returned
``LoadReport`` says how many and why: nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.errors import UserError

PAIRED_FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS = ("prompt", "completion", "label")


class DataError(UserError, ValueError):
    """A record is invalid: the message names the source, line and field."""


@dataclass
class LoadReport:
    source: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.source}: {self.kept} records"
        why = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        return (
            f"{self.source}: {self.kept} records kept, {sum(self.skipped.values())} skipped ({why})"
        )


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value
    )


def _check_text(value: Any, name: str) -> str | None:
    """None if `value` is a valid prompt/completion, else the reason."""
    if isinstance(value, str):
        return None if value != "" or name == "prompt" else f"'{name}' is an empty string"
    if isinstance(value, list):
        if not value and name != "prompt":
            return f"'{name}' is an empty message list"
        if not _is_messages(value):
            return f"'{name}' must be a string or a list of {{'role', 'content'}} messages"
        return None
    return f"'{name}' must be a string or a list of messages, got {type(value).__name__}"


def shared_prefix(chosen: str | list, rejected: str | list) -> tuple[Any, Any, Any]:
    """Split an implicit-prompt pair into (prompt, chosen_rest, rejected_rest)."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        # Cut at a word boundary so a shared first letter of the answers stays in the completions.
        cut = chosen.rfind(" ", 0, n) + 1 if n < len(chosen) else n
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise DataError("'chosen' and 'rejected' must both be strings or both be message lists")


def validate_record(rec: Any, where: str) -> dict:
    """Return the canonical form of one record or raise DataError naming `where` and the field."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be an object, got {type(rec).__name__}")
    if "completion" in rec or "label" in rec:
        missing = [k for k in UNPAIRED_FIELDS if k not in rec]
        if missing:
            raise DataError(
                f"{where}: unpaired record is missing field '{missing[0]}' "
                f"(unpaired records need {', '.join(UNPAIRED_FIELDS)})"
            )
        for name in ("prompt", "completion"):
            if (why := _check_text(rec[name], name)) is not None:
                raise DataError(f"{where}: field '{name}': {why}")
        if not isinstance(rec["label"], bool):
            raise DataError(f"{where}: field 'label' must be true or false, got {rec['label']!r}")
        return {"prompt": rec["prompt"], "completion": rec["completion"], "label": rec["label"]}
    for name in ("chosen", "rejected"):
        if name not in rec:
            raise DataError(
                f"{where}: missing field '{name}' (paired records need "
                f"'chosen' and 'rejected', and 'prompt' unless it is implicit)"
            )
        if (why := _check_text(rec[name], name)) is not None:
            raise DataError(f"{where}: field '{name}': {why}")
    if "prompt" not in rec:
        prompt, chosen, rejected = shared_prefix(rec["chosen"], rec["rejected"])
        if not chosen or not rejected:
            raise DataError(
                f"{where}: implicit prompt: 'chosen' and 'rejected' are identical, nothing to prefer"
            )
    else:
        prompt, chosen, rejected = rec["prompt"], rec["chosen"], rec["rejected"]
        if (why := _check_text(prompt, "prompt")) is not None:
            raise DataError(f"{where}: field 'prompt': {why}")
    if isinstance(prompt, str) != isinstance(chosen, str) or isinstance(chosen, str) != isinstance(
        rejected, str
    ):
        raise DataError(
            f"{where}: 'prompt', 'chosen' and 'rejected' must all be strings (standard form) "
            f"or all message lists (conversational form)"
        )
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if "margin" in rec:
        out["margin"] = float(rec["margin"])
    return out


def _iter_source(source: str | Path) -> tuple[str, list[tuple[str, Any]]]:
    path = Path(source)
    if path.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys"):  # a DatasetDict: take 'train'
            if "train" not in ds:
                raise DataError(
                    f"{path}: a DatasetDict without a 'train' split; splits are {list(ds.keys())}"
                )
            ds = ds["train"]
        return str(path), [(f"{path} row {i + 1}", row) for i, row in enumerate(ds)]
    if path.suffix == ".parquet":
        from datasets import Dataset

        ds = Dataset.from_parquet(str(path))
        return str(path), [(f"{path} row {i + 1}", row) for i, row in enumerate(ds)]
    if path.suffix in (".jsonl", ".json") or path.exists():
        if not path.exists():
            raise DataError(f"{path}: no such file")
        items = []
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    items.append((f"{path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    items.append(
                        (
                            f"{path}:{lineno}",
                            DataError(f"{path}:{lineno}: not valid JSON ({e.msg})"),
                        )
                    )
        return str(path), items
    # Anything else is taken as a hub dataset id; this is the only path that needs the network.
    from datasets import load_dataset

    ds = load_dataset(str(source), split="train")
    return str(source), [(f"{source} row {i + 1}", row) for i, row in enumerate(ds)]


def load_records(
    source: str | Path | list[dict], skip_invalid: bool = False
) -> tuple[list[dict], LoadReport]:
    """Read and validate every record of `source`; see the module docstring."""
    if isinstance(source, list):
        name, items = "<list>", [(f"record {i}", r) for i, r in enumerate(source)]
    else:
        name, items = _iter_source(source)
    report = LoadReport(name)
    out = []
    for where, rec in items:
        try:
            if isinstance(rec, DataError):
                raise rec
            out.append(validate_record(rec, where))
        except DataError as e:
            if not skip_invalid:
                raise DataError(
                    f"{e}\n  (pass --skip-invalid to drop invalid records and report them)"
                ) from None
            report.skipped[str(e).split(": ", 1)[-1]] += 1
    report.kept = len(out)
    if not out:
        raise DataError(
            f"{name}: no valid records" + (f" ({report.summary()})" if report.skipped else "")
        )
    kinds = {("completion" in r) for r in out}
    if len(kinds) > 1:
        raise DataError(f"{name}: mixes paired and unpaired records; use one kind per dataset")
    return out, report


def unpair(records: list[dict]) -> list[dict]:
    """Paired -> unpaired (for KTO): each pair gives a desirable and an undesirable example."""
    out = []
    for r in records:
        if "completion" in r:
            out.append(r)
            continue
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return out
