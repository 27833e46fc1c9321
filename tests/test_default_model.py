"""A few steps on the real embedded model (SmolLM2-135M-Instruct): the loss goes down."""

import json
import math

import pytest
import torch

from preftune.api import train
from preftune.config import build_config


def test_no_argument_config_is_the_default_job():
    cfg = build_config(None)
    assert (cfg.model.model, cfg.data.data, cfg.loss.loss) == ("default", "arithmetic", "dpo")
    assert cfg.data.num_task_eval >= 200 and cfg.eval.eval_before


@pytest.mark.slow
def test_few_steps_on_default_model_lower_the_loss(default_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(default_dir.parent.parent))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = train(
            {
                "output_dir": str(tmp_path),
                "run_name": "real",
                "num_train": 16,
                "num_eval": 8,
                "batch_size": 4,
                "max_steps": 4,
                "lr": 1e-5,
                "warmup_ratio": 0.0,
                "num_task_eval": 0,
                "eval_before": False,
                "quiet": True,
                "report_to": "none",
            }
        )
    finally:
        torch.set_num_threads(threads)
    losses = [
        json.loads(x)["loss"]
        for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in x and "eval/loss" not in x
    ]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert losses[-1] < losses[0] - 0.05, losses
    assert res.metrics["eval/loss"] < math.log(2)
