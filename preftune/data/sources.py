"""Where records come from: a bundled set, a JSONL or Parquet file, a folder written by
``datasets.save_to_disk``, or a Hugging Face hub id (``owner/name``, the only source that needs the
network).

`read_items` returns ``(where, raw record)`` pairs, `where` naming the file and line (1-based, as an
editor shows it) or row. A line that cannot be read (not UTF-8, not JSON) is returned as a
`DataError` in place of its record, so the caller refuses it or, with ``skip_invalid``, skips and
counts it like any other invalid record. Everything that stops a source being read at all is a
one-line `DataError` saying what to give instead.

`datasets` is imported only by the sources that need it (Parquet, a saved folder, the hub): with
pandas and pyarrow it holds ~0.08 GiB resident, which a run on a JSONL file or a bundled set
does not pay.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from preftune.data import arithmetic
from preftune.errors import UserError
from preftune.hub import check_hub_repo, looks_like_hub_id

# the names `data=` takes for the bundled arithmetic sets, and the file each one reads
BUNDLED = {"arithmetic": "onpolicy", "arithmetic_onpolicy": "onpolicy", "arithmetic_edit": "edit"}
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
KINDS = (
    "a JSONL or Parquet file, a folder written by datasets.save_to_disk, "
    f"a bundled set ({', '.join(BUNDLED)}) or a hub data set id (owner/name)"
)


class DataError(UserError, ValueError):
    """Data that cannot be used: the message names the source, line and field."""


def resolve_source(name: str | Path) -> str | Path:
    """A bundled set's name -> its file; anything else as given."""
    return arithmetic.bundled_path(BUNDLED[name]) if name in BUNDLED else name


def check_source(source: str | Path, key: str = "data") -> None:
    """Refuse, without reading it, a source that is neither a local file or folder nor a data
    set the hub has (one quick request, `preftune.hub`)."""
    path = Path(resolve_source(source))
    if path.is_file() or path.is_dir():
        return
    if path.exists():
        raise DataError(f"{key}={source}: not a regular file or folder; give {KINDS}")
    if path.suffix in FILE_SUFFIXES or not looks_like_hub_id(str(source)):
        raise DataError(f"{key}={source}: no such file or folder; give {KINDS}")
    check_hub_repo(str(source), "dataset", DataError, key)


def read_items(source: str | Path, key: str = "data") -> tuple[str, list[tuple[str, Any]]]:
    """(the source's name, [(where, raw record or DataError), ...]); see the module docstring."""
    check_source(source, key)
    path = Path(resolve_source(source))
    if path.is_dir():
        return str(path), _read_saved(path, key)
    if path.suffix == ".parquet":
        from datasets import Dataset

        ds = _open(lambda: Dataset.from_parquet(str(path)), path, key, "a Parquet file")
        return str(path), [(f"{path} row {i + 1}", row) for i, row in enumerate(ds)]
    if path.is_file():
        return str(path), _read_jsonl(path, key)
    return str(source), _read_hub(str(source), key)


def _open(load, name, key: str, kind: str, errors=(OSError, ValueError)):
    """`load()`, with a failure of the reader one DataError: for a bad file or a folder of
    something else, pyarrow and datasets raise OSError and ValueError subclasses."""
    # datasets logs a failed read at ERROR before raising; the DataError says it in one line
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return load()
    except errors as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"{key}={name}: cannot be read as {kind} ({reason}); give {KINDS}"
        ) from None
    finally:
        logger.setLevel(level)


def _read_saved(path: Path, key: str) -> list[tuple[str, Any]]:
    from datasets import load_from_disk

    ds = _open(lambda: load_from_disk(str(path)), path, key, "a folder saved by datasets")
    if hasattr(ds, "keys"):  # a DatasetDict: take 'train'
        if "train" not in ds:
            raise DataError(
                f"{key}={path}: a DatasetDict without a 'train' split (its splits are "
                f"{list(ds.keys())}); save the split to train on as 'train'"
            )
        ds = ds["train"]
    return [(f"{path} row {i + 1}", row) for i, row in enumerate(ds)]


def _read_jsonl(path: Path, key: str) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    try:
        f = open(path, "rb")  # bytes: a bad byte is one bad line, not a crash mid-file
    except OSError as e:
        raise DataError(
            f"{key}={path}: cannot be opened ({e.strerror}); check its permissions"
        ) from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            items.append((where, _parse_line(raw, lineno, where)))
    return [(where, rec) for where, rec in items if rec is not None]


def _parse_line(raw: bytes, lineno: int, where: str) -> Any:
    """One JSONL line -> its record, None for a blank line, or a DataError saying what is wrong."""
    try:  # an editor's byte-order mark on the first line is not part of the record
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        return DataError(
            f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
            f"save the file as UTF-8"
        )
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return DataError(
            f"{where}: not valid JSON ({e.msg}, column {e.colno}); each line must be one JSON object"
        )


def _read_hub(repo_id: str, key: str) -> list[tuple[str, Any]]:
    # the hub answered; whatever fails now (no 'train' split, a script, the network) is one line
    from datasets import load_dataset

    load = lambda: load_dataset(repo_id, split="train")  # noqa: E731
    ds = _open(load, repo_id, key, "a hub data set", errors=Exception)
    return [(f"{repo_id} row {i + 1}", row) for i, row in enumerate(ds)]
