"""`reference_offload=disk` (preftune/train/offload.py): the reference's decoder layers on disk,
read back per forward. The copy must score exactly as the resident copy does, hold none of its
layers in memory between forwards, stay the initial weights while the policy trains, and leave
no folder behind; whole runs with it equal runs without, to the bit."""

from __future__ import annotations

import copy
import gc
import json

import pytest
import torch
from online_helpers import length_score  # noqa: F401  (the judge the online run imports)
from run_helpers import tiny_run_args
from test_varlen import PAIRS, PROMPTS, _model
from transformers import AutoModelForCausalLM

from preftune.api import train, train_online
from preftune.cli import main
from preftune.logps import hidden_at_targets, sequence_logps
from preftune.train.offload import named_blocks, offloaded_copy, resident_bytes
from preftune.varlen_layout import build_varlen_batch


@pytest.fixture(autouse=True)
def _no_html_report(monkeypatch):
    monkeypatch.setattr("preftune.report.write_report", lambda run_dir: None)


def test_offloaded_copy_scores_as_the_resident_copy_and_holds_no_layer(tmp_path):
    policy = _model(attn="sdpa").float().train()
    frozen = copy.deepcopy(policy).eval().requires_grad_(False)
    ref = offloaded_copy(policy, tmp_path)
    layers = sum(p.numel() * 4 for _, b in named_blocks(policy) for p in b.parameters())
    assert resident_bytes(ref) == resident_bytes(frozen) - layers > 0
    batch = build_varlen_batch(PROMPTS, PAIRS)
    with torch.no_grad():
        want = sequence_logps(frozen, batch)
        torch.testing.assert_close(sequence_logps(ref, batch), want, rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = sequence_logps(frozen, batch)
            torch.testing.assert_close(sequence_logps(ref, batch), low, rtol=0, atol=0)
        h = hidden_at_targets(frozen, batch)
        torch.testing.assert_close(hidden_at_targets(ref, batch), h, rtol=0, atol=0)
        assert resident_bytes(ref) == resident_bytes(frozen) - layers  # offloaded again
        for p in policy.parameters():  # the policy trains on: the reference does not move
            p.add_(0.5)
        torch.testing.assert_close(sequence_logps(ref, batch), want, rtol=0, atol=0)
    folder = ref.offload_folder
    assert folder.parent == tmp_path and any(folder.iterdir())
    del ref
    gc.collect()
    assert not folder.exists()


def _final(run_dir):
    return AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float64)


def _same_runs(a, b, keys):
    la = [json.loads(x) for x in (a.run_dir / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in la if "loss" in x]
    assert steps and len(la) == len(lb)
    for x, y in zip(la, lb):
        assert {k: x.get(k) for k in keys} == {k: y.get(k) for k in keys}
    for (n, x), (_, y) in zip(
        _final(a.run_dir).named_parameters(), _final(b.run_dir).named_parameters()
    ):
        assert torch.equal(x, y), n
    assert not list(b.run_dir.glob(".reference_offload-*"))  # removed when the run ended


def test_online_dpo_with_the_reference_on_disk_equals_it_in_memory(tiny_dir, tmp_path):
    args = dict(
        model=str(tiny_dir),
        output_dir=str(tmp_path),
        data="arithmetic_edit",
        num_train=8,
        num_eval=0,
        batch_size=4,
        max_steps=2,
        num_task_eval=0,
        eval_before=False,
        quiet=True,
        report_to="none",
        lr=1e-3,
        max_new_tokens=6,
        judge="online_helpers:length_score",
        method="online_dpo",
    )
    a = train_online({**args, "run_name": "memory"})
    b = train_online({**args, "run_name": "disk", "reference_offload": "disk"})
    _same_runs(a, b, ("loss", "kl", "reward/mean", "grad_norm", "logps/chosen"))


def test_tdpo_with_the_reference_on_disk_equals_it_in_memory(tiny_dir, tmp_path):
    """TDPO reads the reference's hidden states and its LM head (kept in memory)."""
    extra = dict(loss="tdpo2", reference="frozen", eval_every=1)
    a = train(tiny_run_args(tiny_dir, tmp_path, "memory", **extra))
    b = train(tiny_run_args(tiny_dir, tmp_path, "disk", reference_offload="disk", **extra))
    _same_runs(a, b, ("loss", "grad_norm", "rewards/margins", "eval/loss"))


def test_reference_offload_refused_where_no_frozen_copy_is_held(tmp_path, tiny_dir, capsys):
    bad = [
        ["train", "reference_offload=cpu"],
        ["train", "reference_offload=disk", "reference=precompute"],
        ["online", "method=rso", "reference_offload=disk"],
        ["online", "method=ipo_md", "loss=ipo", "reference_offload=disk"],
    ]
    for cmd, *extra in bad:
        assert main([cmd, "model=/nonexistent", f"output_dir={tmp_path}", *extra]) == 2
    assert not any(tmp_path.iterdir())
    # reference=auto resolves to precompute for DPO: refused once the choice is made
    args = tiny_run_args(tiny_dir, tmp_path, "auto", reference_offload="disk")
    assert main(["train", *[f"{k}={v}" for k, v in args.items()]]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(bad) + 1, err
    assert "reference_offload must be none or disk, got 'cpu'" in err[0]
    assert all("reference_offload" in e and e.startswith("preftune: error:") for e in err)
    assert "samples from the reference" in err[2] and "samples from the reference" in err[3]
    assert "this run's reference is precompute" in err[4]
