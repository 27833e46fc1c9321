"""The report and compare pages: every panel for every loss of the registry (metrics recorded by
the trainer's own _record/_summarise from each loss's real output), no missing-key crash, no
empty panel, one colour per run, IPO's target line, spikes that do not set the loss scale,
configs side by side; and both pages opened in headless Chromium with every image loading."""

import json
import re
import shutil
import subprocess

import matplotlib
import pytest
import torch
import yaml

from preftune.calibrate import BetaCalibration
from preftune.errors import UserError
from preftune.losses import LOSSES, PreferenceLogps, UnpairedLogps, compute
from preftune.report import PANELS, compare_runs, load_run, read_metrics, write_report
from preftune.report.panels import run_colors
from preftune.train.metrics import record, summarise

matplotlib.use("Agg")


def _logps(loss: str, step: int, g: torch.Generator):
    B = 8
    drift = 0.5 * step
    if LOSSES[loss].unpaired:
        return UnpairedLogps(
            policy_logps=torch.randn(B, generator=g) - 20 + drift,
            ref_logps=torch.full((B,), -20.0),
            labels=torch.arange(B) % 2 == 0,
            kl_policy_logps=torch.randn(B, generator=g) - 30,
            kl_ref_logps=torch.full((B,), -30.0),
            lengths=torch.full((B,), 6),
        )
    return PreferenceLogps(
        policy_chosen_logps=torch.randn(B, generator=g) - 20 + drift,
        policy_rejected_logps=torch.randn(B, generator=g) - 25 - 3 * drift,
        ref_chosen_logps=torch.full((B,), -20.0),
        ref_rejected_logps=torch.full((B,), -25.0),
        chosen_lengths=torch.full((B,), 6),
        rejected_lengths=torch.full((B,), 7),
        chosen_seq_kl=torch.rand(B, generator=g),
        rejected_seq_kl=torch.rand(B, generator=g),
    )


def _metrics(loss: str, step: int, g, calibration, prefix: str = "") -> dict:
    spec = LOSSES[loss]
    logps = _logps(loss, step, g)
    state = spec.init_state() if spec.stateful else None
    if calibration is not None and not prefix:
        out = calibration(loss, logps, {})
    else:
        out = compute(loss, logps, state=state)
    rec = {k: [] for k in ("loss", "chosen", "rejected", "lp_c", "lp_r")}
    extra: dict = {}
    record(rec, extra, out, logps)
    return summarise(rec, extra, prefix=prefix)


def fake_run(path, loss: str, calibrated: bool = False, spike: bool = False, seed: int = 0):
    """A run directory as the trainer writes it, with metrics from `loss`'s real output."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    cal = BetaCalibration(alpha=0.6, filter_ratio=0.2) if calibrated else None
    rows = []
    for step in range(1, 7):
        row = {
            "step": step,
            **_metrics(loss, step, g, cal),
            "lr": 1e-6 * step,
            "tokens_per_second": 100.0,
        }
        if step % 2 == 0:
            row.update(_metrics(loss, step, g, None, prefix="eval/"))
            segments = {
                "shared_fraction": 1.0,
                "prefix": -0.5 * step,
                "chosen_edit": 0.3,
                "rejected_edit": -1.0,
                "chosen_suffix": -0.1,
                "rejected_suffix": -0.2,
            }
            for tag in ("eval", "train"):  # held-out pairs, and the training probe
                row.update({f"{tag}/segments/{k}": v for k, v in segments.items()})
        if spike and step == 3:
            row["loss"] = 500.0
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"loss": rows[-1]["loss"], "steps": 6}))
    config = {
        "loss": loss,
        "loss_args": dict(LOSSES[loss].defaults),  # as Config.save writes it
        "beta_calibration": {"alpha": 0.6, "filter_ratio": 0.2} if calibrated else None,
        "lr": 5e-6,
        "seed": seed,
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    samples = [
        {
            "prompt": f"What is {i} + 1?",
            "completion": f"{i + 1}",
            "chosen": f"{i + 1}",
            "rejected": f"{i + 2}",
        }
        for i in range(3)
    ]
    for tag in ("before", "after"):
        (path / f"greedy_{tag}.json").write_text(json.dumps(samples))
    return path


def _images(page: str) -> list[str]:
    return re.findall(r"<img src='([^']+)'", page)


def _has_data(panel, run) -> bool:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    drawn = panel.draw(ax, [run], run_colors([run]))
    data = [
        ln
        for ln in ax.lines
        if not ln.get_label().startswith("_")
        and len(ln.get_xdata()) >= 2
        and "=" not in ln.get_label()
    ] + list(ax.patches)
    plt.close(fig)
    return drawn and len(data) > 0


def _expected_panels(loss: str) -> set[str]:
    spec = LOSSES[loss]
    expected = {"loss", "rewards", "accuracies", "segments", "segments_train", "lr", "speed"}
    if not spec.unpaired:
        expected |= {"logps", "margins"}
    if spec.needs_reference and not spec.unpaired:
        expected |= {"below_ref", "margin_nats", "direction"}
    if spec.has_beta and not spec.unpaired:
        expected |= {"beta", "filtered", "calibration"}
    return expected


def _calibrated(loss: str) -> bool:
    return LOSSES[loss].has_beta and not LOSSES[loss].unpaired


def test_every_panel_draws_for_every_loss_or_is_left_out(tmp_path):
    # drawing only (no PNG) for all losses keeps this fast; the next test writes the pages
    for loss in sorted(LOSSES):
        run = load_run(fake_run(tmp_path / loss, loss, calibrated=_calibrated(loss)))
        drawn = {panel.name for panel in PANELS if _has_data(panel, run)}
        assert _expected_panels(loss) <= drawn, (loss, _expected_panels(loss) - drawn)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "kto", "simpo", "tdpo1"])
def test_report_page_shows_every_panel_with_data_and_no_empty_one(tmp_path, loss):
    run_dir = fake_run(tmp_path / loss, loss, calibrated=_calibrated(loss))
    page = write_report(run_dir).read_text()
    shown = {src.split("/")[-1][:-4] for src in _images(page)}
    for src in _images(page):
        assert (run_dir / src).stat().st_size > 5000, src
    run = load_run(run_dir)
    for panel in PANELS:
        assert (panel.name in shown) == _has_data(panel, run), panel.name  # drawn iff it has data
    assert _expected_panels(loss) <= shown
    assert "What is 0 + 1?" in page and "Configuration" in page


def test_ipo_target_line_and_clipped_spikes(tmp_path):
    import matplotlib.pyplot as plt

    ipo = fake_run(tmp_path / "ipo", "ipo", spike=True)
    cfg = yaml.safe_load((ipo / "config.yaml").read_text())
    cfg["loss_args"].update(beta=0.5, length_normalized=False)
    (ipo / "config.yaml").write_text(yaml.safe_dump(cfg))
    run = load_run(ipo)
    panels = {p.name: p for p in PANELS}
    fig, ax = plt.subplots()
    panels["margin_nats"].draw(ax, [run], run_colors([run]))
    targets = [ln for ln in ax.lines if "IPO target" in ln.get_label()]
    assert len(targets) == 1 and list(targets[0].get_ydata()) == [1.0, 1.0]
    fig2, ax2 = plt.subplots()
    panels["loss"].draw(ax2, [run], run_colors([run]))
    assert ax2.get_ylim()[1] < 50  # the 500 spike does not set the scale
    assert any("clipped" in t.get_text() for t in ax2.texts)
    plt.close("all")
    # the per-token panel is drawn only for length-normalised IPO
    assert not panels["margin_per_token"].draw(plt.subplots()[1], [run], run_colors([run]))


def test_compare_puts_configs_side_by_side_with_one_colour_per_run(tmp_path):
    a, b = fake_run(tmp_path / "dpo", "dpo"), fake_run(tmp_path / "dpop", "dpop", seed=1)
    out = compare_runs([str(a), str(b)], tmp_path / "cmp.html")
    page = out.read_text()
    assert "cmp_plots/rewards.png" in page and (tmp_path / "cmp_plots" / "below_ref.png").exists()
    # differing keys highlighted and listed first; one header column per run
    config = page.split("<h2>Configuration")[1]
    rows = re.findall(r"<tr( class='diff')?><th>([^<]+)</th>", config)[1:]  # after the header
    flags = [bool(cls) for cls, _ in rows]
    assert flags == sorted(flags, reverse=True) and 0 < sum(flags) < len(flags)
    assert {"loss", "seed", "loss_args.beta"} <= {k for cls, k in rows if cls}
    assert "lr" in {k for cls, k in rows if not cls}
    assert config.count("<th><span") == 2
    colors = run_colors([load_run(a), load_run(b)])
    assert colors["dpo"] != colors["dpop"] and page.count(colors["dpo"]) >= 2


def test_missing_run_dir_says_so(tmp_path):
    with pytest.raises(UserError, match="nothing does not exist"):
        write_report(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a preftune run directory"):
        write_report(tmp_path / "empty")


def test_a_partial_last_metrics_line_is_left_out_and_a_damaged_one_named(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    good = json.dumps({"step": 1, "loss": 0.69})
    (run / "metrics.jsonl").write_text(good + "\n" + '{"step": 2, "lo')
    assert read_metrics(run) == [{"step": 1, "loss": 0.69}]
    assert "metrics.jsonl:2 is a partial last line" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text('{"step": 1, "lo\n' + good + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:1: not a JSON row"):
        read_metrics(run)
    (run / "metrics.jsonl").write_text(good + "\n")
    (run / "summary.json").write_text("")  # a kill before the atomic write existed
    assert load_run(run).summary == {}
    (run / "config.yaml").write_text("- a list\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_run(run)


CHECK_IMAGES = """<script>window.addEventListener('load', () => {
  const bad = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src);
  document.body.setAttribute('data-images', document.images.length);
  document.body.setAttribute('data-broken', JSON.stringify(bad));
});</script>"""


def _chromium() -> str | None:
    return next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH (apt-get install -y chromium)")
def test_report_and_compare_load_every_image_in_a_real_browser(tmp_path):
    a, b = fake_run(tmp_path / "dpo", "dpo"), fake_run(tmp_path / "ipo", "ipo", seed=1)
    pages = [write_report(a), compare_runs([str(a), str(b)], tmp_path / "compare.html")]
    for page in pages:
        html = page.read_text().replace("</body>", CHECK_IMAGES + "</body>")
        probe = page.with_name(page.stem + "_probe.html")
        probe.write_text(html)
        dom = subprocess.run(
            [
                _chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--allow-file-access-from-files",
                "--virtual-time-budget=5000",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        n = int(re.search(r'data-images="(\d+)"', dom).group(1))
        broken = re.search(r'data-broken="([^"]*)"', dom).group(1)
        assert n >= 8 and n == len(_images(html)), (page, n)
        assert broken == "[]", broken
