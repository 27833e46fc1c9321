"""The trainer end to end on a tiny random model: CLI, metrics, saved model, first-step loss,
reference modes, accumulation, resume."""

import json
import math

import pytest
import torch
from run_helpers import assert_final_weights_moved, assert_finite_metrics
from transformers import AutoModelForCausalLM

from preftune.api import train
from preftune.cli import main

METRIC_KEYS = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
    "lr",
    "tokens_per_second",
}


def tiny_args(tiny_dir, tmp_path, name="run", **extra):
    args = {
        "model": str(tiny_dir),
        "output_dir": str(tmp_path),
        "run_name": name,
        "num_train": 16,
        "num_eval": 8,
        "batch_size": 4,
        "max_steps": 2,
        "num_task_eval": 4,
        "eval_max_new_tokens": 3,
        "quiet": True,
        "report_to": "none",
        "lr": 1e-3,
        "data": "arithmetic_edit",
    }
    args.update(extra)
    return args


def as_cli(d):
    return [f"{k}={v}" for k, v in d.items()]


def test_cli_train_writes_metrics_and_loadable_model(tiny_dir, tmp_path):
    args = tiny_args(tiny_dir, tmp_path, report_to="tensorboard")
    assert main(["train", *as_cli(args)]) == 0
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x][:2] == [1, 2]
    assert METRIC_KEYS <= set(lines[0])
    assert_finite_metrics(lines[0])
    assert_finite_metrics(lines[-1], prefix="eval/")
    summary = json.loads((run / "summary.json").read_text())
    assert "task/accuracy_before" in summary and "task/accuracy_after" in summary
    assert_final_weights_moved(run, tiny_dir)
    assert (run / "config.yaml").exists()
    assert list(run.glob("**/events.out.tfevents*")), "TensorBoard events written"


def test_first_step_dpo_loss_is_ln2_with_frozen_reference(tiny_dir, tmp_path):
    res = train(tiny_args(tiny_dir, tmp_path, max_steps=1, reference="frozen", eval_before=False))
    first = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_bad_config_fails_before_model_loads(tmp_path, capsys):
    assert main(["train", "beta=-1", f"output_dir={tmp_path}"]) == 2
    assert "beta" in capsys.readouterr().err
    assert main(["train", "lerning_rate=1"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_empty_data_is_rejected(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["train", *as_cli(tiny_args(tiny_dir, tmp_path)), f"data={empty}"]) == 2
    assert "no valid records" in capsys.readouterr().err


def _params(run_dir):
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_accumulation_equals_full_batch(tiny_dir, tmp_path, loss):
    # share_prefix off: a shared prefix's gradient is summed over the rows of each micro-batch,
    # and Llama's RMSNorm rounds that sum in float32 even in a float64 model, so another grouping
    # differs at ~1e-7 (which Adam can magnify); the prefix itself is tested against full
    # sequences in test_logps.py and test_trainer_state.py
    common = dict(
        loss=loss,
        batch_size=8,
        max_steps=3,
        num_train=24,
        eval_before=False,
        num_task_eval=0,
        dtype="float64",
        max_grad_norm=None,
        warmup_ratio=0.0,
        share_prefix=False,
    )
    a = train(tiny_args(tiny_dir, tmp_path, "full", grad_accum=1, **common))
    b = train(tiny_args(tiny_dir, tmp_path, "accum", grad_accum=4, **common))
    la = [
        json.loads(x)["loss"]
        for x in (a.run_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in x
    ][:3]
    lb = [
        json.loads(x)["loss"]
        for x in (b.run_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in x
    ][:3]
    assert la == pytest.approx(lb, rel=1e-10, abs=1e-12)
    pa, pb = _params(a.run_dir), _params(b.run_dir)
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], rtol=1e-9, atol=1e-9)


def test_python_api_trains_twice_in_one_process(tiny_dir, tmp_path):
    """`preftune.train` stays the function after the subpackage preftune.train is imported (it
    used to be replaced by the module on the first run, so a second call raised TypeError)."""
    import preftune

    first = preftune.train(tiny_args(tiny_dir, tmp_path, "api-1", max_steps=1, eval_before=False))
    second = preftune.train(tiny_args(tiny_dir, tmp_path, "api-2", max_steps=1, eval_before=False))
    assert (first.run_dir / "final").is_dir() and (second.run_dir / "final").is_dir()
    assert callable(preftune.train) and callable(preftune.train_reward)


def test_logged_lr_is_the_lr_the_step_used(tiny_dir, tmp_path):
    # 4 steps, 2 of warm-up: the factors used by steps 1..4 are 1/3, 2/3, 1, 1/2
    args = tiny_args(
        tiny_dir,
        tmp_path,
        max_steps=4,
        warmup_ratio=0.5,
        num_task_eval=0,
        eval_before=False,
        num_eval=0,
    )
    train(args)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [x["lr"] for x in lines if "lr" in x]
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 0.5e-3])
