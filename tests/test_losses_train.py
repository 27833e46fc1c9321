"""Every registry entry trains end to end through the CLI on a tiny model (parametrized from
the registry, so a new loss is covered the day it is added)."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune.cli import main
from preftune.losses import LOSSES, PreferenceLogps, UnpairedLogps, compute
from preftune.train.trainer import Trainer

# The trainer's log-probs (chunked head, shared prompt, fp32 autocast) against one plain forward
# per sequence in float32: sums of ~10 token log-probs of ~-11 agree to ~1e-5, and the losses
# (at most a few units; DPOP's lambda = 50 multiplies nothing at policy == reference) as well.
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-4


def _run_args(tiny_dir, tmp_path, *extra: str) -> list[str]:
    """Two steps of 4 pairs on the tiny model, no evaluation, into tmp_path/r."""
    common = "data=arithmetic_edit num_train=8 num_eval=4 batch_size=4 max_steps=2 num_task_eval=0"
    common += " eval_before=false report_to=none run_name=r"
    return [f"model={tiny_dir}", f"output_dir={tmp_path}", *common.split(), *extra]


def _plain_logps(model, prompt_ids, completion_ids) -> torch.Tensor:
    """Sum of log p(completion token | everything before it): one forward, full-vocabulary
    log_softmax, gather. Float64 sum of float32 log-probs."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    start = len(prompt_ids)
    targets = ids[0, start:]
    picked = logprobs[start - 1 : start - 1 + len(targets)].gather(1, targets[:, None])
    return picked.double().sum()


def _first_batch_logps(tiny_dir, spec, examples):
    """The loss inputs of the first step, computed independently of preftune's log-prob engine:
    reference == policy (both are the starting weights at step 1)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        if spec.unpaired:
            pol = torch.stack(
                [_plain_logps(model, e["prompt_ids"], e["completion_ids"]) for e in examples]
            )
            # KTO's z0 reads only KL(policy || reference) on mismatched pairs: 0 at step 1
            zeros = torch.zeros(2, dtype=torch.float64)
            return UnpairedLogps(
                policy_logps=pol,
                ref_logps=pol.clone(),
                labels=torch.tensor([bool(e["label"]) for e in examples]),
                kl_policy_logps=zeros,
                kl_ref_logps=zeros.clone(),
                lengths=torch.tensor([len(e["completion_ids"]) for e in examples]),
            )
        chosen = torch.stack(
            [_plain_logps(model, e["prompt_ids"], e["chosen_ids"]) for e in examples]
        )
        rejected = torch.stack(
            [_plain_logps(model, e["prompt_ids"], e["rejected_ids"]) for e in examples]
        )
    ref = spec.needs_reference
    kl = torch.zeros_like(chosen) if spec.needs_seq_kl else None  # TDPO: KL(ref || policy) = 0
    return PreferenceLogps(
        policy_chosen_logps=chosen,
        policy_rejected_logps=rejected,
        ref_chosen_logps=chosen.clone() if ref else None,
        ref_rejected_logps=rejected.clone() if ref else None,
        chosen_lengths=torch.tensor([len(e["chosen_ids"]) for e in examples]),
        rejected_lengths=torch.tensor([len(e["rejected_ids"]) for e in examples]),
        chosen_seq_kl=kl,
        rejected_seq_kl=None if kl is None else kl.clone(),
    )


@pytest.mark.parametrize("name", list(LOSSES))
def test_two_step_cli_run(name, tiny_dir, tmp_path, capsys, monkeypatch):
    """Two steps through the CLI; step 1's logged loss equals the registry function (default
    hyper-parameters) on log-probs of the same first batch computed by a plain forward."""
    first_batch = []
    real_step = Trainer.train_step

    def recording_step(self, batch_idx):
        if not first_batch:
            first_batch.extend(self.data.train[i] for i in batch_idx)
        return real_step(self, batch_idx)

    monkeypatch.setattr(Trainer, "train_step", recording_step)
    args = _run_args(tiny_dir, tmp_path, f"loss={name}", "lr=1e-3")
    assert main(["train", *args]) == 0
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps][:2] == [1, 2]
    assert all(math.isfinite(x["loss"]) for x in steps)
    spec = LOSSES[name]
    assert len(first_batch) == 4
    expected = compute(name, _first_batch_logps(tiny_dir, spec, first_batch)).losses.mean()
    assert steps[0]["loss"] == pytest.approx(float(expected), rel=LOSS_RTOL, abs=LOSS_ATOL)
    err = capsys.readouterr()
    if not spec.needs_reference:
        assert "reference: none" in err.out + err.err
    assert (tmp_path / "r" / "final" / "config.json").exists()


def test_beta_calibration_trains_and_logs(tiny_dir, tmp_path):
    calibration = "beta_calibration={alpha: 0.6, filter_ratio: 0.25}"
    args = _run_args(tiny_dir, tmp_path, "loss=dpo", calibration)
    assert main(["train", *args]) == 0
    first = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("beta", "filtered_fraction", "calibration/M0", "calibration/sigma"):
        assert key in first
    assert first["filtered_fraction"] == pytest.approx(0.25)
