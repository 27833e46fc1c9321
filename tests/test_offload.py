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
from preftune.errors import ConfigError
from preftune.logps import hidden_at_targets, sequence_logps
from preftune.train import offload
from preftune.train import reference as reference_module
from preftune.train.offload import named_blocks, offloaded_copy
from preftune.validation import check_reference_offload
from preftune.varlen_layout import build_varlen_batch


@pytest.fixture(autouse=True)
def _no_html_report(monkeypatch):
    monkeypatch.setattr("preftune.report.write_report", lambda run_dir: None)


@pytest.fixture
def copies(monkeypatch):
    """The folders `offloaded_copy` wrote, each checked to hold the layers when made."""
    made = []

    def counted(policy, folder):
        ref = offload.offloaded_copy(policy, folder)
        assert resident_bytes(ref) < resident_bytes(policy) and any(folder.iterdir())
        made.append(folder)
        return ref

    monkeypatch.setattr(reference_module, "offloaded_copy", counted)
    return made


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of `model`'s parameters held in memory now (meta placeholders hold none)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)


def test_offloaded_copy_scores_as_the_resident_copy_and_holds_no_layer(tmp_path):
    policy = _model(attn="sdpa").float().train()
    frozen = copy.deepcopy(policy).eval().requires_grad_(False)
    folder = tmp_path / ".reference_offload-0-test"
    ref = offloaded_copy(policy, folder)
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
    assert any(folder.iterdir())
    del ref
    gc.collect()
    assert not folder.exists()


def _final(run_dir):
    return AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float64)


def _same_runs(a, b, keys, copies):
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
    assert len(copies) == 1 and copies[0].parent == b.run_dir  # the run with it, only that one
    assert copies[0].name.startswith(".reference_offload-0-")
    assert not copies[0].exists()  # removed when the run ended


def test_online_dpo_with_the_reference_on_disk_equals_it_in_memory(tiny_dir, tmp_path, copies):
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
    _same_runs(a, b, ("loss", "kl", "reward/mean", "grad_norm", "logps/chosen"), copies)


def test_tdpo_with_the_reference_on_disk_equals_it_in_memory(tiny_dir, tmp_path, copies):
    """TDPO reads the reference's hidden states and its LM head (kept in memory)."""
    extra = dict(loss="tdpo2", reference="frozen", eval_every=1)
    a = train(tiny_run_args(tiny_dir, tmp_path, "memory", **extra))
    b = train(tiny_run_args(tiny_dir, tmp_path, "disk", reference_offload="disk", **extra))
    _same_runs(a, b, ("loss", "grad_norm", "rewards/margins", "eval/loss"), copies)


def test_reference_offload_refused_where_no_frozen_copy_is_held(tmp_path, tiny_dir, capsys):
    """Explicit settings at config time; what `reference=auto` resolves to, and the engine,
    before the model loads (the run directory released: nothing left behind)."""
    bad = [
        ["train", "reference_offload=cpu"],
        ["train", "reference_offload=disk", "reference=precompute"],
        ["online", "method=rso", "reference_offload=disk"],
        ["online", "method=ipo_md", "loss=ipo", "reference_offload=disk"],
    ]
    for cmd, *extra in bad:
        assert main([cmd, "model=/nonexistent", f"output_dir={tmp_path}", *extra]) == 2
    resolved = [  # DPO: auto = precompute; TDPO with LoRA: the adapter off; SimPO: none
        ("train", {}),
        ("train", {"lora": "true", "loss": "tdpo2"}),
        (
            "online",
            {"method": "online_dpo", "loss": "simpo", "judge": "online_helpers:length_score"},
        ),
    ]
    for cmd, extra in resolved:
        args = tiny_run_args(tiny_dir, tmp_path, "auto", reference_offload="disk", **extra)
        assert main([cmd, *[f"{k}={v}" for k, v in args.items()]]) == 2
    assert not any(tmp_path.iterdir())
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(bad) + len(resolved), err
    assert all(e.startswith("preftune: error: reference_offload") for e in err)
    assert "reference_offload must be none or disk, got 'cpu'" in err[0]
    assert "samples from the reference" in err[2] and "samples from the reference" in err[3]
    assert "log-probs are computed before training" in err[1] and "reference=precompute" in err[1]
    assert "log-probs are computed before training" in err[4] and "reference=auto" in err[4]
    assert "the LoRA model with its adapter off" in err[5]
    assert "loads no reference model" in err[6]


def test_no_room_or_a_failed_write_is_one_line_and_leaves_nothing(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    """Free space is checked before writing (a memory-mapped write on a full disk would end the
    process with SIGBUS); a write that fails anyway removes its folder; either way one line,
    exit 2, and the run directory released."""
    args = tiny_run_args(
        tiny_dir, tmp_path, "x", loss="tdpo2", reference="frozen", reference_offload="disk"
    )
    cmd = ["train", *[f"{k}={v}" for k, v in args.items()]]
    monkeypatch.setattr(offload, "_free_bytes", lambda path: 1 << 20)
    assert main(cmd) == 2
    monkeypatch.undo()

    def full(index, folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(offload, "save_offload_index", full)
    assert main(cmd) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(
        e.startswith("preftune: error: reference_offload=disk") for e in err
    )
    assert "need" in err[0] and "MiB free" in err[0]
    assert "No space left on device" in err[1]
    assert not any(tmp_path.iterdir())


def test_a_killed_runs_copies_are_swept_and_the_engine_refusal(tmp_path):
    for name in (".reference_offload-0-dead", ".reference_offload-1-dead"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w.dat").write_bytes(b"left by a killed run")
    (tmp_path / "checkpoints").mkdir()
    offload.sweep(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoints"]
    with pytest.raises(ConfigError, match="reference_offload=disk under FSDP2: the engine shards"):
        check_reference_offload("disk", "frozen", "reference=frozen", "FSDP2")
    check_reference_offload("none", "precompute", "reference=auto", "FSDP2")  # nothing asked
