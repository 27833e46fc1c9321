"""Reading run directories: metrics rows, resolved config, summary and greedy samples."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from preftune.errors import UserError


@dataclass
class Run:
    """One run directory as the report reads it; every part but `rows` may be empty."""

    name: str
    rows: list[dict]
    config: dict = field(default_factory=dict)  # flat: key -> value, loss_args as loss_args.KEY
    summary: dict = field(default_factory=dict)
    samples: dict[str, list[dict]] = field(default_factory=dict)  # "before"/"after" -> rows

    @property
    def loss(self) -> str:
        return str(self.config.get("loss", ""))

    def hparam(self, key: str, default=None):
        return self.config.get(f"loss_args.{key}", default)


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl. A partial last line (a run killed, or still writing) is left
    out with a note on stderr; a damaged line anywhere else is an error naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).exists():
        raise UserError(f"{run_dir} does not exist; give the folder of a run, e.g. runs/<run_name>")
    if not path.is_file():
        raise UserError(
            f"{run_dir} is not a preftune run directory (no metrics.jsonl); give the folder a run "
            f"wrote, e.g. runs/<run_name>"
        )
    numbered = [(i, ln) for i, ln in enumerate(_text(path).splitlines(), 1) if ln.strip()]
    rows = []
    for i, line in numbered:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i != numbered[-1][0]:
                raise UserError(
                    f"{path}:{i}: not a JSON row ({err.msg} at column {err.colno}); the file is "
                    f"damaged, remove that line to read this run"
                ) from None
            print(f"[preftune] note: {path}:{i} is a partial last line; left out", file=sys.stderr)
    return rows


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read ({err}); is the run directory intact?") from None


def flat_config(raw: dict) -> dict:
    """config.yaml ({key: value}, with loss_args and beta_calibration as mappings) -> {key:
    value} with a mapping's entries spelled KEY.SUBKEY, so two runs' configs compare key by key."""
    out: dict = {}
    for k, v in raw.items():
        if isinstance(v, dict):
            out.update({f"{k}.{sub}": sv for sub, sv in v.items()})
        else:
            out[k] = v
    return out


def _json(path: Path, default):
    """A run's JSON file; `default` where it is missing, or empty (cut short by a kill)."""
    text = _text(path) if path.exists() else ""
    if not text.strip():
        return default
    try:
        return json.loads(text)
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err}); is the run directory intact?") from None


def _config(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        raw = yaml.safe_load(_text(path)) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(
            f"{path}: expected a mapping of config keys, found a {type(raw).__name__}; restore "
            f"the config.yaml the run wrote (or remove it to compare without configs)"
        )
    return flat_config(raw)


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    config = _config(run_dir / "config.yaml")
    samples = {}
    for tag in ("before", "after"):
        rows = _json(run_dir / f"greedy_{tag}.json", None)
        if rows is None:  # runs from before greedy samples: the task's own samples
            rows = _json(run_dir / f"samples_{tag}.json", [])[:4]
        if rows:
            samples[tag] = rows
    return Run(
        run_dir.name, read_metrics(run_dir), config, _json(run_dir / "summary.json", {}), samples
    )


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the rows that hold a number for it."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return [p[0] for p in pts], [float(p[1]) for p in pts]
