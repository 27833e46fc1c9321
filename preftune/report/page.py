"""The HTML around the figures: configs side by side (differing keys first and highlighted),
summaries side by side, greedy samples before and after, the panels with what to look for."""

from __future__ import annotations

import html

from preftune.report.runs import Run

CSS = (
    "body{font-family:sans-serif;margin:1.5em;max-width:1400px}"
    "table{border-collapse:collapse;margin-bottom:1em}"
    "td,th{border:1px solid #ccc;padding:2px 8px;font-size:12px;text-align:left;vertical-align:top}"
    "tr.diff td,tr.diff th{background:#fff3b0}"
    ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}"
    "figure{margin:0}figure img{width:100%}figcaption{font-size:12px;color:#333}"
    "td.text{font-family:monospace;white-space:pre-wrap;max-width:340px}"
    "details{margin-bottom:1em}"
)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _swatch(color: str) -> str:
    return f"<span style='display:inline-block;width:10px;height:10px;background:{color}'></span> "


def side_by_side(runs: list[Run], colors: dict[str, str], part: str, diff_first: bool) -> str:
    """One row per key, one column per run. With `diff_first` (configs) the keys whose values
    differ between the runs are highlighted and listed first; results differ everywhere, so
    they are listed as logged."""
    tables = [getattr(r, part) for r in runs]
    keys = list(dict.fromkeys(k for t in tables for k in t))
    differs = set()
    if diff_first and len(runs) > 1:
        differs = {k for k in keys if len({repr(t.get(k)) for t in tables}) > 1}
        keys = [k for k in keys if k in differs] + [k for k in keys if k not in differs]
    head = "".join(f"<th>{_swatch(colors[r.name])}{html.escape(r.name)}</th>" for r in runs)
    rows = [f"<table><tr><th>key</th>{head}</tr>"]
    for k in keys:
        cls = " class='diff'" if k in differs else ""
        cells = "".join(f"<td>{_cell(t.get(k, '—'))}</td>" for t in tables)
        rows.append(f"<tr{cls}><th>{html.escape(k)}</th>{cells}</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _prompt(text: str, width: int = 160) -> str:
    """The prompt's last user turn where a chat template left its role names in the text (the
    system prompt is the same in every row), else its last `width` characters."""
    text = text.strip()
    if "\nuser\n" in text:
        text = text.rsplit("\nuser\n", 1)[1].removesuffix("assistant").strip()
    return text if len(text) <= width else "…" + text[-width:]


def samples_table(runs: list[Run], colors: dict[str, str]) -> str:
    """Greedy completions of the same held-out prompts before training and after each run."""
    with_samples = [r for r in runs if r.samples]
    if not with_samples:
        return ""
    first = with_samples[0]
    base = first.samples.get("before") or first.samples.get("after", [])
    prompts = [s["prompt"] for s in base]
    afters = [
        r for r in with_samples if [s["prompt"] for s in r.samples.get("after", [])] == prompts
    ]
    head = "<th>prompt</th><th>chosen / rejected</th><th>before</th>" + "".join(
        f"<th>{_swatch(colors[r.name])}after: {html.escape(r.name)}</th>" for r in afters
    )
    rows = [f"<table><tr>{head}</tr>"]
    for i, s in enumerate(base):
        before = first.samples.get("before", [{}] * len(base))[i].get("completion", "—")
        pair = "\n".join(f"{k}: {s[k]}" for k in ("chosen", "rejected") if k in s) or "—"
        cells = [_prompt(s["prompt"]), pair, before] + [
            r.samples["after"][i]["completion"] for r in afters
        ]
        rows.append(
            "<tr>"
            + "".join(f"<td class='text'>{html.escape(str(c))}</td>" for c in cells)
            + "</tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)


def page(
    title: str, runs: list[Run], colors: dict[str, str], figures: list[tuple[str, str, str]]
) -> str:
    """figures: (title, note, image src)."""
    legend = " ".join(
        f"{_swatch(colors[r.name])}{html.escape(r.name)} ({html.escape(r.loss)})" for r in runs
    )
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{legend}</p>",
        "<p style='font-size:12px'>Thin lines: training batches; thick with markers: held-out pairs "
        "(eval/). One colour per run in every panel.</p>",
        "<h2>Figures</h2><div class='grid'>",
    ]
    for fig_title, note, src in figures:
        parts.append(
            f"<figure><img src='{html.escape(src)}' alt='{html.escape(fig_title)}'>"
            f"<figcaption><b>{html.escape(fig_title)}</b>. {html.escape(note)}</figcaption></figure>"
        )
    parts.append("</div>")
    samples = samples_table(runs, colors)
    if samples:
        parts += ["<h2>Greedy completions of held-out prompts, before and after</h2>", samples]
    parts += ["<h2>Results</h2>", side_by_side(runs, colors, "summary", diff_first=False)]
    parts += [
        "<h2>Configuration</h2><p style='font-size:12px'>Highlighted: keys whose values differ "
        "between the runs (listed first).</p>",
        side_by_side(runs, colors, "config", diff_first=True),
    ]
    parts.append("</body></html>")
    return "\n".join(parts)
