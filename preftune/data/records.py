"""Validating preference records, read from a source (`preftune.data.sources`) or given as a
Python list of dicts.

Canonical record kinds
- paired:   {"prompt", "chosen", "rejected"} — strings (standard form) or message lists
            (conversational form). Implicit prompt: {"chosen", "rejected"} only, whose shared
            prefix (the common leading messages, or the common leading text) becomes the prompt.
- unpaired: {"prompt", "completion", "label"} with a boolean label (True = desirable), for KTO.

Every problem is an error naming the source, the line (1-based, as an editor shows it) and the
field, with what to do. ``skip_invalid=True`` drops bad records instead, and the returned
``LoadReport`` says how many and why: nothing is dropped silently. A chosen answer identical to
its rejected one is invalid: there is nothing to prefer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.data.sources import DataError, read_items

PAIRED_FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS = ("prompt", "completion", "label")


@dataclass
class LoadReport:
    source: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    where: list[str] = field(default_factory=list)  # file:line (or row) of each kept record

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
        if n == len(chosen) == len(rejected):
            return chosen, "", ""
        # Cut before the space that starts the first differing word, so a shared first letter of
        # the answers stays in the completions and the space opens them (as TRL's extract_prompt).
        cut = max(chosen.rfind(" ", 0, n), 0)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise DataError("'chosen' and 'rejected' must both be strings or both be message lists")


def validate_record(rec: Any, where: str) -> dict:
    """Return the canonical form of one record or raise DataError naming `where` and the field."""
    if not isinstance(rec, dict):
        raise DataError(
            f'{where}: a record must be a JSON object ({{"prompt": ..., ...}}), got '
            f"{type(rec).__name__}"
        )
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
    if rec["chosen"] == rec["rejected"]:
        raise DataError(
            f"{where}: 'chosen' and 'rejected' are identical, nothing to prefer; fix or remove "
            f"the record"
        )
    if "prompt" not in rec:
        prompt, chosen, rejected = shared_prefix(rec["chosen"], rec["rejected"])
        if not chosen or not rejected:
            raise DataError(
                f"{where}: implicit prompt: one of 'chosen' and 'rejected' is all of the other, "
                f"so one completion would be empty; give the 'prompt' field"
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
        m = rec["margin"]
        if isinstance(m, bool) or not isinstance(m, int | float):
            raise DataError(f"{where}: field 'margin' must be a number, got {m!r}")
        out["margin"] = float(m)
    return out


SKIP_HINT = "or pass --skip-invalid (skip_invalid=true) to drop invalid records and count them"


def skip_reason(e: DataError) -> str:
    """The reason a skipped record is counted under: the message less its place and advice."""
    return str(e).split(": ", 1)[-1].split("; ")[0]


def load_records(
    source: str | Path | list[dict], skip_invalid: bool = False, key: str = "data"
) -> tuple[list[dict], LoadReport]:
    """Read and validate every record of `source`; see the module docstring."""
    if isinstance(source, list):
        name, items = "<list>", [(f"record {i}", r) for i, r in enumerate(source)]
    else:
        name, items = read_items(source, key)
    report = LoadReport(name)
    out = []
    for where, rec in items:
        try:
            if isinstance(rec, DataError):
                raise rec
            out.append(validate_record(rec, where))
            report.where.append(where)
        except DataError as e:
            if not skip_invalid:
                raise DataError(f"{e}; {SKIP_HINT}") from None
            report.skipped[skip_reason(e)] += 1
    report.kept = len(out)
    if not out:
        why = f" ({report.summary()})" if report.skipped else " (it holds no records)"
        raise DataError(
            f"{key}={name}: no valid records{why}; each line must be one JSON object with "
            f"prompt, chosen and rejected (or prompt, completion and label)"
        )
    kinds = {("completion" in r) for r in out}
    if len(kinds) > 1:
        raise DataError(
            f"{key}={name}: mixes paired records (chosen, rejected) and unpaired ones "
            f"(completion, label); use one kind per data set"
        )
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
