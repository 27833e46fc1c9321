"""Every registry entry trains end to end through the CLI on a tiny model (parametrized from
the registry, so a new loss is covered the day it is added)."""

import json

import pytest

from preftune.cli import main
from preftune.losses import LOSSES


@pytest.mark.parametrize("name", list(LOSSES))
def test_two_step_cli_run(name, tiny_dir, tmp_path, capsys):
    args = [f"model={tiny_dir}", "data=arithmetic_edit", f"loss={name}", "num_train=8", "num_eval=4",
            "batch_size=4", "max_steps=2", "num_task_eval=0", "eval_before=false", "report_to=none",
            f"output_dir={tmp_path}", "run_name=r", "lr=1e-3"]
    assert main(["train", *args]) == 0
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps][:2] == [1, 2]
    assert all(abs(x["loss"]) < 1e6 for x in steps)
    err = capsys.readouterr()
    spec = LOSSES[name]
    if not spec.needs_reference:
        assert "reference: none" in err.out + err.err
    assert (tmp_path / "r" / "final" / "config.json").exists()


def test_beta_calibration_trains_and_logs(tiny_dir, tmp_path):
    args = [f"model={tiny_dir}", "data=arithmetic_edit", "loss=dpo", "num_train=8", "num_eval=4",
            "batch_size=4", "max_steps=2", "num_task_eval=0", "eval_before=false", "report_to=none",
            f"output_dir={tmp_path}", "run_name=r", "beta_calibration={alpha: 0.6, filter_ratio: 0.25}"]
    assert main(["train", *args]) == 0
    first = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("beta", "filtered_fraction", "calibration/M0", "calibration/sigma"):
        assert key in first
    assert first["filtered_fraction"] == pytest.approx(0.25)
