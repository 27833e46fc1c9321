"""Runs a user can trust with hours of compute: one run per directory, resume that applies an
override or refuses it, checkpoints that are never unpickled and fall back past a corrupt one,
divergence that is stopped and said."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_helpers import tiny_run_args, tiny_run_config
from safetensors.torch import load_file

from preftune.api import train
from preftune.cli import main
from preftune.config import ConfigError
from preftune.errors import UserError
from preftune.train import checkpoint as ckpt
from preftune.train.guards import DivergedError, DivergenceGuard


def metric_rows(run_dir) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "grad_norm" in r]


def assert_same_final(a, b) -> None:
    wa, wb = load_file(a / "final/model.safetensors"), load_file(b / "final/model.safetensors")
    assert wa.keys() == wb.keys()
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")


def test_a_finished_run_is_never_written_again(tiny_dir, tmp_path):
    first = train(tiny_run_config(tiny_dir, tmp_path, "run", max_steps=1))
    before = {p: p.stat().st_mtime_ns for p in first.run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a run; continue it with resume="):
        train(tiny_run_config(tiny_dir, tmp_path, "run", max_steps=1))
    assert {p: p.stat().st_mtime_ns for p in first.run_dir.rglob("*") if p.is_file()} == before
    again = train(tiny_run_config(tiny_dir, tmp_path, "run", max_steps=2, overwrite=True))
    assert len(metric_rows(again.run_dir)) == 2  # replaced, not appended to


def test_default_names_started_in_the_same_second_get_their_own_folders(
    tiny_dir, tmp_path, monkeypatch
):
    from preftune.train import rundir

    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20261202-000000")
    a = train(tiny_run_config(tiny_dir, tmp_path, None, max_steps=1))
    b = train(tiny_run_config(tiny_dir, tmp_path, None, max_steps=1))
    assert (a.run_dir.name, b.run_dir.name) == ("dpo-20261202-000000", "dpo-20261202-000000-2")
    assert len(metric_rows(a.run_dir)) == len(metric_rows(b.run_dir)) == 1


def test_config_is_written_first_with_absolute_paths_and_resumes_from_elsewhere(
    tiny_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    rel_model = os.path.relpath(tiny_dir, tmp_path)
    args = tiny_run_args(tiny_dir, "runs", "rel", model=rel_model, max_steps=3, save_every=1)
    full = train(tiny_run_config(tiny_dir, tmp_path, "full", max_steps=3))
    # killed by an exception right after its first checkpoint
    real = ckpt.save_checkpoint

    def stop_after_first(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_checkpoint", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        train(args)
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    saved = (tmp_path / "runs/rel/config.yaml").read_text()
    assert f"model: {tiny_dir}" in saved and f"output_dir: {tmp_path / 'runs'}" in saved
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resumed = train(None, [f"resume={tmp_path / 'runs/rel'}"])
    assert resumed.metrics["steps"] == 3
    assert_same_final(full.run_dir, resumed.run_dir)


def _cut_run(tiny_dir, tmp_path, name, **extra):
    """A 4-step run stopped after its checkpoint at step 2 (by max_steps, then extended)."""
    args = tiny_run_args(tiny_dir, tmp_path, name, **{"max_steps": 2, "save_every": 1, **extra})
    train(args)
    return tmp_path / name


def test_resume_applies_lr_and_says_so(tiny_dir, tmp_path, capsys):
    run = _cut_run(tiny_dir, tmp_path, "lr", scheduler="constant", warmup_ratio=0.0)
    res = train(None, [f"resume={run}", "lr=1e-4", "max_steps=4"])  # quiet, as saved
    err = capsys.readouterr().err  # said whatever quiet says
    assert "resume: lr 0.001 -> 0.0001" in err and "resume: max_steps 2 -> 4" in err
    lrs = [r["lr"] for r in metric_rows(res.run_dir)]
    assert lrs[:2] == [1e-3, 1e-3] and lrs[2:] == pytest.approx([1e-4, 1e-4])
    assert "lr: 0.0001" in (run / "config.yaml").read_text()


def test_resume_may_switch_compile_on(tiny_dir, tmp_path, capsys):
    """compile changes how the step runs, not what it trains (tests/test_compile.py): a resume
    may turn it on, and says so."""
    run = _cut_run(tiny_dir, tmp_path, "compile")
    res = train(None, [f"resume={run}", "compile=true", "max_steps=3"])
    assert "resume: compile False -> True" in capsys.readouterr().err
    assert [r["step"] for r in metric_rows(res.run_dir)] == [1, 2, 3]
    assert "compile: true" in (run / "config.yaml").read_text()


def _files(run) -> dict:
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


def test_a_finished_run_resumed_without_more_steps_is_refused_and_left_as_it_was(
    tiny_dir, tmp_path
):
    # its last checkpoint is at step 2 of 3: the run, not the checkpoint, says it finished
    run = tmp_path / "done"
    train(tiny_run_args(tiny_dir, tmp_path, "done", max_steps=3, save_every=2))
    before = _files(run)
    with pytest.raises(ConfigError, match=r"finished at step 3 of 3.*max_steps=6"):
        train(None, [f"resume={run}", "lr=1e-5"])
    assert _files(run) == before  # config.yaml does not claim an lr that trained nothing


def test_a_run_stopped_after_final_but_before_its_end_is_resumed_and_finishes(tiny_dir, tmp_path):
    run = tmp_path / "tail"
    train(tiny_run_args(tiny_dir, tmp_path, "tail", max_steps=2, save_every=1))
    summary = json.loads((run / "summary.json").read_text())
    del summary["finished"]  # as a kill in the evaluation after final/ leaves it
    (run / "summary.json").write_text(json.dumps(summary))
    res = train(None, [f"resume={run}"])
    assert res.metrics["finished"] is True and res.metrics["steps"] == 2
    assert res.metrics["loss"] == summary["loss"]  # the last step's metrics are kept


def test_a_damaged_metrics_line_before_the_last_stops_a_resume_naming_it(tiny_dir, tmp_path):
    run = _cut_run(tiny_dir, tmp_path, "damaged")
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([rows[0][:9], *rows[1:]]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:1: not a JSON row .*remove that line"):
        train(None, [f"resume={run}", "max_steps=3"])


def test_resume_passes_over_a_partial_metrics_line_and_an_empty_summary(tiny_dir, tmp_path, capsys):
    run = _cut_run(tiny_dir, tmp_path, "torn")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # killed mid-write
    (run / "summary.json").write_text("")  # as a kill inside a non-atomic write left it
    res = train(None, [f"resume={run}", "max_steps=3"])
    assert "dropped a partial last line" in capsys.readouterr().err
    assert [r["step"] for r in metric_rows(res.run_dir)] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


@pytest.mark.parametrize("override", ["beta=0.5", "loss=ipo", "batch_size=2", "seed=3"])
def test_resume_refuses_a_changed_key_by_name(tiny_dir, tmp_path, override):
    run = _cut_run(tiny_dir, tmp_path, "refuse")
    before = (run / "config.yaml").read_text()
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"resume=.*: {key}=.* differs from the run's {key}="):
        train(None, [f"resume={run}", override])
    assert (run / "config.yaml").read_text() == before


def test_corrupt_newest_checkpoint_falls_back_to_the_newest_intact_one(tiny_dir, tmp_path, capsys):
    # a constant schedule, so that extending max_steps from 2 to 4 trains what 4 steps would
    common = {"save_every": 1, "keep_checkpoints": 3, "scheduler": "constant", "warmup_ratio": 0.0}
    full = train(tiny_run_config(tiny_dir, tmp_path, "full", max_steps=4, **common))
    run = _cut_run(tiny_dir, tmp_path, "cut", **common)
    weights = run / "checkpoints/step-2/weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\x00" * 8  # same size, other bytes: only the checksum can tell
    weights.write_bytes(bytes(data))
    resumed = train(None, [f"resume={run}", "max_steps=4", "quiet=false"])
    out = capsys.readouterr()
    assert "warning: checkpoint" in out.err and "step-2 is incomplete or corrupt" in out.err
    assert "moved step-2 to" in out.err and (run / "checkpoints/unusable/step-2").exists()
    assert "resumed from" in out.out and "step-1 at step 1" in out.out
    assert_same_final(full.run_dir, resumed.run_dir)


def test_a_checkpoint_holding_a_pickle_is_refused_not_executed(tiny_dir, tmp_path, capsys):
    run = _cut_run(tiny_dir, tmp_path, "evil")
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (run / "checkpoints/step-2/trainer.pt").write_bytes(pickle.dumps(Payload()))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "max_steps=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # refused before the model loads
    assert len(err) == 1 and err[0].startswith("preftune: error: ")
    assert "trainer.pt, a pickle file" in err[0] and "Traceback" not in err[0]
    assert not marker.exists()


def test_divergence_stops_with_the_checkpoint_before_it_and_a_report(tiny_dir, tmp_path):
    args = tiny_run_args(
        tiny_dir,
        tmp_path,
        "boom",
        lr=1e4,
        max_grad_norm=None,
        max_steps=6,
        save_every=1,
        scheduler="constant",
        warmup_ratio=0.0,
    )
    with pytest.raises(DivergedError) as info:
        train(args)
    err = info.value
    root = tmp_path / "boom/checkpoints"
    assert "training diverged at step" in str(err) and "lower lr" in str(err)
    left = ckpt.list_checkpoints(root)
    assert all(ckpt.step_of(p) < err.first - 1 for p in left)
    assert (root / "diverged" / f"step-{max(err.first - 1, 1)}").exists()
    for path in left:  # what is kept was taken before the weights blew up
        w = load_file(path / "weights.safetensors")
        assert max(float(t.abs().max()) for t in w.values()) < 10
    summary = json.loads((tmp_path / "boom/summary.json").read_text())
    assert summary["diverged"] and (tmp_path / "boom/report.html").exists()


def test_divergence_reaches_the_cli_as_one_line(tiny_dir, tmp_path, capsys):
    args = tiny_run_args(tiny_dir, tmp_path, "boomcli", lr=1e4, max_grad_norm=None, max_steps=6)
    argv = ["train", *[f"{k}={'null' if v is None else v}" for k, v in args.items()]]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("preftune: error:")]
    assert len(lines) == 1 and lines[0].startswith("preftune: error: training diverged at step")


KILL_DRIVER = r"""
import os, signal, sys
from preftune.train import checkpoint as ckpt
from preftune.train.step import StepEngine
from preftune.api import train
where, at = sys.argv[1], int(sys.argv[2])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if where == "step":  # after the backward of step `at`, before its optimizer step
    real_clip = StepEngine.clip_and_check
    def clip(self, step):
        if step == at:
            die()
        return real_clip(self, step)
    StepEngine.clip_and_check = clip
else:  # files of checkpoint `at` (or of final/) written and fsynced, not yet published
    name = ".tmp-final" if where == "final" else f".tmp-step-{at}"
    real_fsync = ckpt.fsync_tree
    def fsync(path):
        real_fsync(path)
        if path.name == name:
            die()
    ckpt.fsync_tree = fsync
train(None, sys.argv[3:])
"""


@pytest.mark.parametrize(
    "where,at",
    [("step", 2), ("step", 5), ("checkpoint", 3), ("final", 0)],
    ids=["before-first-checkpoint", "mid-step", "inside-checkpoint-write", "inside-final-save"],
)
def test_sigkill_at_any_moment_then_resume_equals_uninterrupted(tiny_dir, tmp_path, where, at):
    common = {"max_steps": 6, "num_train": 24, "save_every": 3}
    full = train(tiny_run_config(tiny_dir, tmp_path, "full", **common))
    args = [f"{k}={v}" for k, v in tiny_run_args(tiny_dir, tmp_path, "killed", **common).items()]
    # the same thread count as this process: bit-equality holds for equal counts only
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DRIVER, where, str(at), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tmp_path / "killed/final").exists()
    if where == "final":  # the training's summary was written before the final save began
        summary = json.loads((tmp_path / "killed/summary.json").read_text())
        assert summary["steps"] == 6 and "loss" in summary and "train_seconds" in summary
    resumed = train(None, [f"resume={tmp_path / 'killed'}"])
    assert resumed.metrics["steps"] == 6
    assert_same_final(full.run_dir, resumed.run_dir)
    steps = [r["step"] for r in metric_rows(resumed.run_dir)]
    assert steps == list(range(1, 7)), "metrics.jsonl has each step once"


def test_resume_with_another_thread_count_says_it_will_not_be_bit_equal(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    run = _cut_run(tiny_dir, tmp_path, "threads")
    saved = ckpt.read_state(run / "checkpoints/step-2")["torch_threads"]
    assert saved == torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: saved + 2)
    train(None, [f"resume={run}", "max_steps=3"])  # it finished at 2
    err = capsys.readouterr().err
    assert f"written by a run with {saved} torch threads and this one has {saved + 2}" in err


def test_overwrite_puts_the_old_run_back_when_the_new_one_cannot_start(tiny_dir, tmp_path):
    first = train(tiny_run_config(tiny_dir, tmp_path, "keep", max_steps=1))
    before = {p: p.read_bytes() for p in first.run_dir.rglob("*") if p.is_file()}
    bad = tiny_run_args(
        tiny_dir, tmp_path, "keep", overwrite=True, data=str(tmp_path / "nope.jsonl")
    )
    with pytest.raises(UserError):
        train(bad)
    assert {p: p.read_bytes() for p in first.run_dir.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".replaced-*"))


def test_an_edited_config_yaml_cannot_change_what_a_resume_trains(tiny_dir, tmp_path):
    run = _cut_run(tiny_dir, tmp_path, "edited")
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("seed: 0", "seed: 7"))
    with pytest.raises(ConfigError, match="seed=7 differs from the run's seed=0"):
        train(None, [f"resume={run}", "max_steps=3"])


def test_a_run_directory_in_use_is_refused_and_a_stale_lock_taken_over(tiny_dir, tmp_path):
    run = _cut_run(tiny_dir, tmp_path, "locked")
    (run / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(ConfigError, match="is being written by another preftune run"):
        train(None, [f"resume={run}", "max_steps=3"])
    (run / ".lock").write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname()}))
    assert train(None, [f"resume={run}", "max_steps=3"]).metrics["steps"] == 3
    assert not (run / ".lock").exists()


def test_a_lock_held_by_a_zombie_is_taken_over(tiny_dir, tmp_path):
    """A SIGKILLed rank whose launcher died too stays a zombie where nothing reaps it (CI
    containers): os.kill(pid, 0) still succeeds, but the run is over."""
    run = _cut_run(tiny_dir, tmp_path, "zombie")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.time() < deadline, "the child never exited"
        time.sleep(0.05)
    try:
        (run / ".lock").write_text(json.dumps({"pid": child.pid, "host": socket.gethostname()}))
        assert train(None, [f"resume={run}", "max_steps=3"]).metrics["steps"] == 3
    finally:
        child.wait()


@pytest.mark.parametrize("name", ["../outside", "a/b", ".."])
def test_run_name_is_a_plain_folder_name(tiny_dir, tmp_path, name):
    with pytest.raises(ConfigError, match="must be a plain folder name"):
        train(tiny_run_config(tiny_dir, tmp_path, name, overwrite=True))


def test_save_every_minutes_checkpoints_a_long_run_by_default(tiny_dir, tmp_path, monkeypatch):
    from preftune.train import loop

    clock = iter(range(0, 10**6, 31 * 60))  # 31 minutes pass between two looks at the clock
    monkeypatch.setattr(loop.time, "monotonic", lambda: next(clock))
    res = train(tiny_run_config(tiny_dir, tmp_path, "timed", max_steps=3, keep_checkpoints=5))
    assert [p.name for p in ckpt.list_checkpoints(res.run_dir / "checkpoints")] == [
        "step-1",
        "step-2",
        "step-3",
    ]


def test_guard_rules():
    g = DivergenceGuard(factor=100.0)
    for step in range(1, 7):
        g.check(step, 0.7, 1.0 + 0.1 * step)
    g.check(7, 0.7, 50.0)  # 35x the median: large, not divergence
    with pytest.raises(DivergedError, match="is 714x the median 1.4 of the last 7 steps") as info:
        g.check(8, 0.7, 1000.0)
    assert info.value.first == 8
    g = DivergenceGuard(factor=100.0)
    for step in range(1, 5):
        g.check(step, 0.0, 0.0)  # a hinge loss at exactly 0: converged, not vanished
        g.check(step, float("nan"), 0.0)  # an online step without pairs trained nothing
    assert g.history == []
    g.check(5, 0.5, 0.0)
    with pytest.raises(DivergedError, match="exactly 0 for 2 steps") as info:
        g.check(6, 0.5, 0.0)
    assert info.value.first == 5
    with pytest.raises(DivergedError, match="gradient norm inf"):
        DivergenceGuard(None).check(1, 0.5, float("inf"))
