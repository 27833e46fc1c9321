"""The report's panels: each shows one thing the methods' papers argue about.

A panel is a function (ax, runs, colours) -> bool that draws on one matplotlib axis and says
whether it drew anything; a panel with nothing to show is left out of the page, never drawn
empty. Every run keeps one colour in every panel (`run_colors`); train curves are thin lines,
held-out (eval/) curves thick with markers; line style tells the series apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from preftune.report.runs import Run, series

SEGMENT_KEYS = (
    ("prefix", "shared prefix"),
    ("chosen_edit", "y_w edit token"),
    ("rejected_edit", "y_l edit token"),
    ("chosen_suffix", "y_w suffix"),
    ("rejected_suffix", "y_l suffix"),
    ("prefix_dropped", "prefix | y_w fell"),
    ("chosen_edit_dropped", "y_w edit | y_w fell"),
    ("chosen_suffix_dropped", "y_w suffix | y_w fell"),
)


@dataclass(frozen=True)
class Panel:
    name: str
    title: str
    note: str  # what to look for, under the figure
    draw: Callable[..., bool]
    over_steps: bool = True  # x axis is the training step
    fraction: bool = False  # y in [0, 1], drawn whole so that 0.4 looks like 0.4


def run_colors(runs: list[Run]) -> dict[str, str]:
    """One colour per run (tab10 in run order), the same in every panel."""
    palette = [
        "#1f77b4",
        "#d62728",
        "#2ca02c",
        "#ff7f0e",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    return {r.name: palette[i % len(palette)] for i, r in enumerate(runs)}


def _line(ax, run: Run, color: str, key: str, style: str = "-", label: str | None = None) -> bool:
    xs, ys = series(run.rows, key)
    if not xs:
        return False
    ev = key.startswith("eval/")
    ax.plot(
        xs,
        ys,
        style,
        color=color,
        lw=2.0 if ev else 1.0,
        alpha=1.0 if ev else 0.75,
        marker="o" if ev or len(xs) < 3 else None,
        ms=3.5,
        label=f"{run.name}: {label or key}",
    )
    return True


def _lines(keys: list[tuple[str, str, str]]) -> Callable[..., bool]:
    """A panel drawing (key, line style, label) for every run, train and eval."""

    def draw(ax, runs: list[Run], colors: dict[str, str]) -> bool:
        drawn = False
        for run in runs:
            for key, style, label in keys:
                drawn |= _line(ax, run, colors[run.name], key, style, label)
        return drawn

    return draw


def _with_zero(draw: Callable[..., bool]) -> Callable[..., bool]:
    def wrapped(ax, runs, colors) -> bool:
        drawn = draw(ax, runs, colors)
        if drawn:
            ax.axhline(0.0, color="black", lw=0.8, zorder=0)
        return drawn

    return wrapped


def _loss(ax, runs: list[Run], colors: dict[str, str]) -> bool:
    """Loss on a y-range that survives spikes: when the largest value lies far above the bulk
    (DPOP's penalty, a diverging step), the axis stops above the 95th percentile and a note
    gives the clipped maximum."""
    drawn = _lines([("loss", "-", "loss"), ("eval/loss", "--", "eval/loss")])(ax, runs, colors)
    values = sorted(v for r in runs for k in ("loss", "eval/loss") for v in series(r.rows, k)[1])
    if drawn and len(values) >= 5:
        lo, hi, p95 = values[0], values[-1], values[int(0.95 * (len(values) - 1))]
        if hi - lo > 4 * max(p95 - lo, 1e-12):
            top = p95 + 0.5 * (p95 - lo) + 1e-6
            ax.set_ylim(lo - 0.05 * (top - lo), top)
            ax.text(
                1.0,
                1.01,
                f"y clipped at {top:.3g}; max {hi:.3g}",
                transform=ax.transAxes,
                ha="right",
                va="bottom",
                fontsize=7,
                color="#a00",
            )  # above the axes: no legend there
    return drawn


def _ipo_target(run: Run, per_token: bool) -> float | None:
    """1/(2 tau) where `run` trains IPO and its margin form matches `per_token`."""
    if run.loss != "ipo":
        return None
    normalized = run.hparam("length_normalized", True) in (True, "true", "True")
    tau = run.hparam("beta")
    return 1 / (2 * float(tau)) if tau and normalized == per_token else None


def _margin(per_token: bool) -> Callable[..., bool]:
    key = "logratio/margin_per_token" if per_token else "logratio/margin"

    def draw(ax, runs: list[Run], colors: dict[str, str]) -> bool:
        if per_token and not any(_ipo_target(r, True) for r in runs):
            return False  # only IPO's length-normalised form is read per token
        drawn = _lines([(key, "-", "h"), ("eval/" + key, "--", "eval h")])(ax, runs, colors)
        for run in runs:
            target = _ipo_target(run, per_token)
            if drawn and target:
                ax.axhline(
                    target,
                    color=colors[run.name],
                    ls=":",
                    lw=1.5,
                    label=f"{run.name}: IPO target 1/(2τ) = {target:.3g}",
                )
        if drawn:
            ax.axhline(0.0, color="black", lw=0.8, zorder=0)
        return drawn

    return draw


def _const_lines(key: str, label: str, sub: Callable[[Run], object]):
    """A metric per run, with the setting it is driven by as a dotted line in the run's colour."""

    def draw(ax, runs: list[Run], colors: dict[str, str]) -> bool:
        drawn = False
        for run in runs:
            if _line(ax, run, colors[run.name], key, "-", key):
                drawn = True
                value = sub(run)
                if value is not None:
                    ax.axhline(
                        float(value),
                        color=colors[run.name],
                        ls=":",
                        lw=1.2,
                        label=f"{run.name}: {label} = {value}",
                    )
        return drawn

    return draw


def _filter_ratio(run: Run):
    if not any(k.startswith("beta_calibration") for k in run.config):
        return None
    return run.config.get("beta_calibration.filter_ratio", 0.2)


def _segments_of(tag: str):
    """The segments panel's drawing for `tag` ("eval": held-out pairs; "train": the probe)."""

    def draw(ax, runs: list[Run], colors: dict[str, str]) -> bool:
        return _segments(ax, runs, colors, tag)

    return draw


def _segments(ax, runs: list[Run], colors: dict[str, str], tag: str = "eval") -> bool:
    """Bars: the last evaluation's mean change (policy - reference, nats) per segment."""
    lasts = {
        r.name: next((x for x in reversed(r.rows) if f"{tag}/segments/prefix" in x), None)
        for r in runs
    }
    shown = [
        (k, lab)
        for k, lab in SEGMENT_KEYS
        if any(last and f"{tag}/segments/{k}" in last for last in lasts.values())
    ]
    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        last = lasts[run.name]
        if last is None:
            continue
        pts = [
            (j + i * width, last[f"{tag}/segments/{k}"])
            for j, (k, _) in enumerate(shown)
            if f"{tag}/segments/{k}" in last
        ]
        fell = last.get(f"{tag}/pairs/chosen_below_ref") if tag == "eval" else None
        note = "" if fell is None else f"; y_w fell on {fell:.0%} of pairs"
        ax.bar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            width,
            color=colors[run.name],
            label=f"{run.name} (step {last['step']}{note})",
        )
    if shown:
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shown))])
        ax.set_xticklabels([lab for _, lab in shown], rotation=25, ha="right", fontsize=7)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_ylabel("nats (policy − reference)", fontsize=8)
    return bool(shown)


PANELS = [
    Panel(
        "rewards",
        "implicit rewards β·(log π − log π_ref)",
        "Below zero: the policy made that completion less likely than the reference did. "
        "A positive mean can hide many pairs below zero (next panel).",
        _with_zero(
            _lines(
                [
                    ("rewards/chosen", "-", "chosen"),
                    ("rewards/rejected", "--", "rejected"),
                    ("eval/rewards/chosen", "-", "eval chosen"),
                    ("eval/rewards/rejected", "--", "eval rejected"),
                ]
            )
        ),
    ),
    Panel(
        "below_ref",
        "fraction of pairs below the reference",
        "Pairs whose chosen (solid) or rejected (dashed) log-prob ended below the reference's; "
        "0 at step 1, where policy = reference.",
        _lines(
            [
                ("pairs/chosen_below_ref", "-", "chosen"),
                ("pairs/rejected_below_ref", "--", "rejected"),
                ("eval/pairs/chosen_below_ref", "-", "eval chosen"),
                ("eval/pairs/rejected_below_ref", "--", "eval rejected"),
            ]
        ),
        fraction=True,
    ),
    Panel(
        "margin_nats",
        "log-ratio margin h in nats",
        "h = (log π − log π_ref)(y_w) − (…)(y_l), without β. IPO drives it to 1/(2τ) "
        "(dotted), DPO's keeps growing.",
        _margin(False),
    ),
    Panel(
        "margin_per_token",
        "log-ratio margin per token (IPO length-normalised)",
        "Each log-ratio divided by its completion length: the quantity length-normalised IPO "
        "drives to 1/(2τ) (dotted).",
        _margin(True),
    ),
    Panel(
        "loss",
        "training objective",
        "Train (solid) and held-out (dashed). Spikes do not set the scale (see the note).",
        _loss,
    ),
    Panel(
        "margins",
        "implicit reward margin β·h",
        "What TRL logs as rewards/margins: h scaled by each run's β.",
        _with_zero(
            _lines(
                [("rewards/margins", "-", "margin"), ("eval/rewards/margins", "--", "eval margin")]
            )
        ),
    ),
    Panel(
        "accuracies",
        "reward accuracy (fraction of pairs with h > 0)",
        "1 − this = pairs with h ≤ 0.",
        _lines([("rewards/accuracies", "-", "train"), ("eval/rewards/accuracies", "--", "eval")]),
        fraction=True,
    ),
    Panel(
        "segments",
        "where the log-prob moved, on pairs sharing leading tokens",
        "Change (policy − reference, nats) of the shared prefix, the first differing token and "
        "the suffix; '| y_w fell': over the pairs whose chosen ended below the reference.",
        _segments_of("eval"),
        over_steps=False,
    ),
    Panel(
        "segments_train",
        "the same on the training probe (the first 64 training pairs)",
        "As above, on the training pairs followed through the run (evaluate.train_probe).",
        _segments_of("train"),
        over_steps=False,
    ),
    Panel(
        "direction",
        "pairs whose chosen and rejected moved the same way",
        "Both up or both down (solid); both down (dashed).",
        _lines(
            [
                ("pairs/same_direction", "-", "same way"),
                ("pairs/both_down", "--", "both down"),
                ("eval/pairs/same_direction", "-", "eval same way"),
                ("eval/pairs/both_down", "--", "eval both down"),
            ]
        ),
        fraction=True,
    ),
    Panel(
        "logps",
        "policy log-probs of the completions (summed)",
        "Chosen solid, rejected dashed.",
        _lines(
            [
                ("logps/chosen", "-", "chosen"),
                ("logps/rejected", "--", "rejected"),
                ("eval/logps/chosen", "-", "eval chosen"),
                ("eval/logps/rejected", "--", "eval rejected"),
            ]
        ),
    ),
    Panel(
        "beta",
        "β-DPO: the batch's β",
        "Dotted: β0. β = β0(1 + α(mean kept gap − M0)).",
        _const_lines("beta", "β0", lambda r: r.hparam("beta")),
    ),
    Panel(
        "filtered",
        "β-DPO: fraction of each batch filtered",
        "Dotted: filter_ratio. The kept count is int(N(1 − ratio)), truncated as in the paper's "
        "code, so batch 8 at 0.2 keeps 6 and filters 0.25.",
        _const_lines("filtered_fraction", "filter_ratio", _filter_ratio),
        fraction=True,
    ),
    Panel(
        "calibration",
        "β-DPO: running gap statistics",
        "M0 (solid) and σ (dashed), in nats.",
        _lines([("calibration/M0", "-", "M0"), ("calibration/sigma", "--", "σ")]),
    ),
    Panel("lr", "learning rate used by each step", "", _lines([("lr", "-", "lr")])),
    Panel("speed", "throughput (tokens/s)", "", _lines([("tokens_per_second", "-", "tokens/s")])),
]
