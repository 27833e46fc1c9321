"""Plots and an HTML report from run directories: one run (`report.html` in the run) or
several side by side (`preftune compare runA runB ...`).

The panels are chosen to show what the methods do: the chosen and rejected log-probs (DPO on
near-identical pairs lowers *both*, the chosen one included — DPOP's penalty stops that), the
implicit reward margin and accuracy, and β with the calibration statistics when β-DPO moves it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

PANELS = [
    ("loss", ["loss", "eval/loss"], "training objective"),
    ("logps", ["logps/chosen", "logps/rejected"], "policy log-probs of the completions (summed)"),
    ("margins", ["rewards/margins", "eval/rewards/margins"], "implicit reward margin"),
    ("accuracies", ["rewards/accuracies", "eval/rewards/accuracies"], "reward accuracy"),
    ("beta", ["beta", "calibration/M0", "calibration/sigma", "filtered_fraction"], "β-DPO: β and its statistics"),
    ("speed", ["tokens_per_second"], "throughput (tokens/s)"),
]


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a preftune run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and isinstance(r[key], int | float)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(runs: dict[str, list[dict]], keys: list[str], title: str, out: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    drawn = False
    for run_name, rows in runs.items():
        for key in keys:
            xs, ys = _series(rows, key)
            if not xs:
                continue
            label = key if len(runs) == 1 else f"{run_name}: {key}"
            ax.plot(xs, ys, marker="o" if len(xs) < 3 else None, label=label)
            drawn = True
    if drawn:
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def _page(title: str, summary_rows: list[tuple[str, dict]], images: list[tuple[str, str]]) -> str:
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for name, summary in summary_rows:
        parts.append(f"<h2>{html.escape(name)}</h2><table>")
        for k, v in summary.items():
            val = f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))
            parts.append(f"<tr><th>{html.escape(k)}</th><td>{val}</td></tr>")
        parts.append("</table>")
    for caption, src in images:
        parts.append(f"<figure><img src='{src}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    images = []
    for name, keys, title in PANELS:
        if _plot({run_dir.name: rows}, keys, title, plots / f"{name}.png"):
            images.append((title, f"plots/{name}.png"))
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    out = run_dir / "report.html"
    out.write_text(_page(f"preftune run {run_dir.name}", [("summary", summary)], images))
    return out


def compare_runs(run_dirs: list[str], out: str | Path = "compare.html") -> Path:
    out = Path(out)
    runs = {Path(d).name: read_metrics(Path(d)) for d in run_dirs}
    if len(runs) != len(run_dirs):
        raise ValueError("two runs share a folder name; give runs distinct names to compare them")
    plots = out.parent / f"{out.stem}_plots"
    plots.mkdir(parents=True, exist_ok=True)
    images = []
    for name, keys, title in PANELS:
        if _plot(runs, keys, title, plots / f"{name}.png"):
            images.append((title, f"{plots.name}/{name}.png"))
    summaries = []
    for d in run_dirs:
        p = Path(d) / "summary.json"
        summaries.append((Path(d).name, json.loads(p.read_text()) if p.exists() else {}))
    out.write_text(_page("preftune: runs compared", summaries, images))
    return out
