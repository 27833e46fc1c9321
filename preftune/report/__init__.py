"""Plots and an HTML report from run directories: one run (`report.html` in the run) or several
side by side (`preftune compare runA runB ...`, one colour per run in every panel).

The panels (panels.py) show what the methods' papers claim: rewards against a zero line, the
fraction of pairs below the reference, the log-ratio margin in nats against IPO's 1/(2τ), where
on a pair the log-prob moved, β and the filtered fraction on their own axes; page.py puts the
runs' configs and results side by side and the greedy samples before and after.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from preftune.errors import UserError
from preftune.report.page import page
from preftune.report.panels import PANELS, Panel, run_colors
from preftune.report.runs import Run, load_run, read_metrics

__all__ = ["PANELS", "compare_runs", "draw_panels", "load_run", "read_metrics", "write_report"]


def draw_panels(runs: list[Run], folder: Path, src_prefix: str) -> list[tuple[str, str, str]]:
    """Every panel with something to show, as PNGs in `folder`: [(title, note, src)]. One
    figure is reused and margins are fixed (tight_layout costs more than the drawing)."""
    folder.mkdir(parents=True, exist_ok=True)
    colors = run_colors(runs)
    figures = []
    # a Figure of its own (no pyplot): no global backend or figure registry is touched
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    for panel in PANELS:
        ax.clear()
        path = folder / f"{panel.name}.png"
        if not panel.draw(ax, runs, colors):
            path.unlink(missing_ok=True)  # a stale plot from an earlier report
            continue
        _style(fig, ax, panel)
        fig.savefig(path, dpi=100)
        figures.append((panel.title, panel.note, f"{src_prefix}{panel.name}.png"))
    return figures


def _style(fig, ax, panel: Panel) -> None:
    ax.set_title(panel.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2 if len(ax.get_legend_handles_labels()[0]) > 6 else 1)
    if panel.fraction:
        ax.set_ylim(-0.03, 1.03)
    if panel.over_steps:
        ax.set_xlabel("step")
    fig.subplots_adjust(left=0.11, right=0.98, top=0.91, bottom=0.14 if panel.over_steps else 0.27)


def write_report(run_dir: str | Path) -> Path:
    run = load_run(run_dir)
    run_dir = Path(run_dir)
    figures = draw_panels([run], run_dir / "plots", "plots/")
    out = run_dir / "report.html"
    out.write_text(page(f"preftune run {run.name}", [run], run_colors([run]), figures))
    return out


def compare_runs(run_dirs: list[str], out: str | Path = "compare.html") -> Path:
    out = Path(out)
    runs = [load_run(d) for d in run_dirs]
    if len({r.name for r in runs}) != len(runs):
        raise UserError(
            f"compare {' '.join(map(str, run_dirs))}: two runs share a folder name; the page "
            f"tells runs apart by it, so give them distinct names"
        )
    plots = out.parent / f"{out.stem}_plots"
    figures = draw_panels(runs, plots, f"{plots.name}/")
    out.write_text(page("preftune: runs compared", runs, run_colors(runs), figures))
    return out
