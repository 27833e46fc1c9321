"""`preftune claim`: the compared runs differ only in the method, overrides reach every run, and
each claim runs end to end on the embedded model at reduced size."""

import pytest

from preftune.claims import CLAIMS, run_claim, run_settings
from preftune.cli import CLAIM_NAMES, main
from preftune.losses import LOSSES

# what a claim's runs may differ in: the method (and, for IPO's second run, the lr it is about)
METHOD_KEYS = {"loss", "run_name", "length_normalized", "beta_calibration", "dpop_lambda"}


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_compared_runs_differ_only_in_the_method(tmp_path, name):
    claim = CLAIMS[name]
    settings = {label: run_settings(claim, label, {}, tmp_path) for label in claim.runs}
    base = settings[next(iter(settings))]
    for label, s in settings.items():
        differing = {k for k in set(s) | set(base) if s.get(k) != base.get(k)} - METHOD_KEYS
        allowed = {"lr"} if label == "ipo_high_lr" else set()
        assert differing <= allowed, (label, differing)
        if LOSSES[s["loss"]].has_beta:
            assert s["beta"] == claim.shared["beta"]  # same β for every method compared


def test_overrides_reach_every_run_and_loss_keys_only_the_losses_that_have_them(tmp_path):
    claim = CLAIMS["dpop"]
    over = {"beta": 0.2, "dpop_lambda": 5.0, "max_steps": 3}
    dpo, dpop = (run_settings(claim, label, over, tmp_path) for label in ("dpo", "dpop"))
    assert dpo["beta"] == dpop["beta"] == 0.2 and dpo["max_steps"] == dpop["max_steps"] == 3
    assert dpop["dpop_lambda"] == 5.0 and "dpop_lambda" not in dpo


def test_an_lr_override_keeps_the_high_lr_run_five_times_higher(tmp_path):
    claim = CLAIMS["ipo"]
    low, high = (
        run_settings(claim, label, {"lr": 2e-6}, tmp_path) for label in ("ipo", "ipo_high_lr")
    )
    assert low["lr"] == 2e-6 and high["lr"] == pytest.approx(1e-5)


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path):
    from preftune.claims import _same_settings
    from preftune.config import build_config
    from preftune.precision import settle_bf16

    settings = run_settings(CLAIMS["dpop"], "dpo", {}, tmp_path)
    run = tmp_path / "runs" / "dpo"
    run.mkdir(parents=True)
    cfg = build_config(settings)
    settle_bf16(cfg)  # as a run stores it: bf16=auto decided, true or false
    cfg.save(run / "config.yaml")
    assert cfg.train.bf16 in (True, False)
    assert _same_settings(run, settings)
    assert not _same_settings(run, run_settings(CLAIMS["dpop"], "dpo", {"beta": 0.1}, tmp_path))


def test_cli_rejects_an_unknown_claim_and_its_help_names_every_claim(capsys):
    assert main(["claim", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("preftune: error: unknown claim 'nonsense'") and "dpop" in err
    assert CLAIM_NAMES == tuple(CLAIMS)  # what `preftune claim --help` lists


def _runs_end_to_end(name: str, out, overrides: dict | None = None) -> None:
    result = run_claim(name, overrides, out=out / name, small=True)
    text = result.read_text()
    assert "**verdict**: " in text and "wall time:" in text
    assert (out / name / "compare.html").exists()
    for fig in CLAIMS[name].figures:
        assert (out / name / "compare_plots" / f"{fig}.png").exists(), fig
    again = run_claim(name, overrides, out=out / name, small=True).read_text()  # reuses the runs
    assert "reused" in again and again.split("**verdict**")[1] == text.split("**verdict**")[1]


@pytest.mark.slow
def test_a_claim_runs_end_to_end_on_the_embedded_model(tmp_path):
    _runs_end_to_end("dpop", tmp_path)


# the other claims' runs, figures and verdicts on the tiny model: the embedded model's path is
# the one above, and each claim on it costs about a minute of the suite's budget
@pytest.mark.parametrize("name", sorted(set(CLAIMS) - {"dpop"}))
def test_every_other_claim_runs_end_to_end_on_a_tiny_model(tmp_path, tiny_dir, name):
    _runs_end_to_end(name, tmp_path, {"model": str(tiny_dir)})
