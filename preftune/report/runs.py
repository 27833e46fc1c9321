"""Reading run directories: metrics rows, resolved config, summary and greedy samples."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml


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
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a preftune run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    return json.loads(path.read_text()) if path.exists() else default


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    config = flat_config(yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.exists() else {}
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
