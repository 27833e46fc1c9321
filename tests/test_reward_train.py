"""`preftune reward`: the Bradley–Terry trainer end to end on a tiny model (CLI, metrics, a
final/ that plain transformers and the reward-model judge load), last-real-token pooling with
pad == eos, the margin column, and held-out accuracy on the bundled arithmetic pairs.

The loss values themselves are METHODS.md §16 vectors, tested in test_reward_loss.py."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from preftune.api import train_reward
from preftune.cli import main
from preftune.config import build_config
from preftune.judges import RewardModelJudge
from preftune.reward.loss import bradley_terry_loss
from preftune.reward.model import load_reward_model, pad_right, sequence_rewards
from preftune.train.reward import RewardTrainer


@pytest.fixture(autouse=True)
def _no_html_report(monkeypatch):
    """The run report (plots, seconds per run) is tested with the report; not needed here."""
    monkeypatch.setattr("preftune.report.write_report", lambda run_dir: None)


def reward_args(tiny_dir, tmp_path, name="rm", **extra):
    args = {
        "model": str(tiny_dir),
        "output_dir": str(tmp_path),
        "run_name": name,
        "data": "arithmetic_edit",
        "num_train": 16,
        "num_eval": 8,
        "batch_size": 4,
        "max_steps": 2,
        "quiet": True,
        "report_to": "none",
        "lr": 1e-3,
    }
    args.update(extra)
    return args


def test_cli_reward_writes_metrics_and_a_loadable_reward_model(tiny_dir, tmp_path, tokenizer):
    args = reward_args(tiny_dir, tmp_path, eval_every=1, grad_accum=2)
    assert main(["reward", *[f"{k}={v}" for k, v in args.items()]]) == 0
    run = tmp_path / "rm"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2]
    assert {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "accuracy",
        "grad_norm",
        "lr",
        "eval/accuracy",
        "eval/loss",
    } <= set(lines[0])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "reward" and 0 <= summary["eval/accuracy"] <= 1
    assert (run / "config.yaml").exists()
    model = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    # the judge reads the saved model at the same position the trainer trained it on
    judge = RewardModelJudge(run / "final")
    prompt = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    answers = ["2 + 3 = 5<|im_end|>", "6<|im_end|>"]
    ids, mask = pad_right(
        [tokenizer(prompt + a, add_special_tokens=False)["input_ids"] for a in answers],
        tokenizer.pad_token_id,
    )
    with torch.no_grad():
        mine = sequence_rewards(model.eval(), ids, mask)
    assert judge.score([prompt, prompt], answers) == pytest.approx(mine.tolist(), abs=1e-5)


def test_reference_keys_refused_by_reward_in_one_line(tiny_dir, tmp_path, capsys):
    """A reward model has no reference: `reference=` and `reference_offload=` are refused, not
    ignored, before the model loads (no run directory)."""
    for key, value in (("reference", "frozen"), ("reference_offload", "disk")):
        args = reward_args(tiny_dir, tmp_path, **{key: value})
        assert main(["reward", *[f"{k}={v}" for k, v in args.items()]]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err == [
            f"preftune: error: {key}={value} with `preftune reward`: a reward model is trained "
            f"against no reference; drop {key}"
        ]
    assert not any(tmp_path.iterdir())


def test_reward_is_read_at_the_last_real_token_with_pad_equal_to_eos(tiny_dir):
    model = load_reward_model(str(tiny_dir), pad_token_id=7).eval()
    eos = 7  # pad == eos: a completion ends with the pad id, which must still be scored
    rows = [[5, 9, 11, eos], [5, 9, 13, 17, 19, eos], [21, eos]]
    ids, mask = pad_right(rows, pad_id=eos)
    with torch.no_grad():
        batched = sequence_rewards(model, ids, mask)
        one_by_one = []
        for r in rows:
            hidden = model.model(input_ids=torch.tensor([r])).last_hidden_state
            one_by_one.append(model.score(hidden)[0, -1, 0])  # the trailing EOS position
        hf = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(batched, torch.stack(one_by_one), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched, hf, atol=1e-4)  # HF's pooling skips the trailing EOS


def test_margin_column_and_centering_enter_the_loss(tiny_dir, tmp_path):
    rows = [
        {"prompt": f"Q{i}:", "chosen": f" yes {i}", "rejected": " no", "margin": 0.5 * i}
        for i in range(6)
    ]
    data = tmp_path / "margins.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = RewardTrainer(
        build_config(
            reward_args(
                tiny_dir,
                tmp_path,
                data=str(data),
                task=None,
                num_eval=1,
                batch_size=2,
                center_rewards_coefficient=0.01,
            )
        )
    )
    with torch.no_grad():
        out, _, _ = trainer._loss(trainer.data.train, [1, 3], None, train=False)
    exs = [trainer.data.train[i] for i in (1, 3)]
    seqs = [e["prompt_ids"] + e["chosen_ids"] for e in exs] + [
        e["prompt_ids"] + e["rejected_ids"] for e in exs
    ]
    ids, mask = pad_right(seqs, trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        r = sequence_rewards(trainer.policy, ids, mask)
    margins = torch.tensor([e["margin"] for e in exs])  # which records train is drawn by seed
    assert margins.abs().sum() > 0
    want = bradley_terry_loss(r[:2], r[2:], margins, 0.01)
    torch.testing.assert_close(out.losses, want)
    assert not torch.allclose(out.losses, bradley_terry_loss(r[:2], r[2:]))


def test_reward_model_ranks_held_out_bundled_pairs(tiny_dir, tmp_path):
    """A small config that reaches >= 90% held-out pairwise accuracy on the bundled on-policy
    arithmetic pairs within seconds (the real default model: see docs/online.md)."""
    res = train_reward(
        reward_args(
            tiny_dir,
            tmp_path,
            data="arithmetic",
            num_train=128,
            num_eval=64,
            batch_size=8,
            max_steps=24,
            lr=3e-3,
            warmup_ratio=0.0,
        )
    )
    assert res.metrics["eval/accuracy"] >= 0.9, res.metrics
