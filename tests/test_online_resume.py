"""The online methods resume exactly after SIGKILL: a run killed after its checkpoint, in the
middle of the next step (its samples drawn and judged, no optimizer step yet), then resumed,
ends with the weights of the uninterrupted run, bit for bit.

What must come back for that: torch's global RNG (sampling, the mixture sampler's too), the
prompt order, the optimizer and scheduler, the reference (the initial model, not the
checkpoint's policy) and the trainer's own state.

One subprocess (imports paid once) forks a child per method; each child trains until it
SIGKILLs itself, while this process trains the uninterrupted runs. The killed runs use this
process's thread count, since other counts sum in another order on some CPUs."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune.api import train_online
from preftune.train import checkpoint as ckpt

TESTS = Path(__file__).parent
KILL_AFTER = 2  # checkpoint step-2 is written; step 3 dies after generating and judging

# argv: the step after which to die, then a JSON list of one CLI argument list per run
KILL_DRIVER = r"""
import json, os, signal, sys
from preftune.train import entry  # every import before the forks, so each child pays none
from preftune.train import group, ipo_md, online_dpo
at, runs = int(sys.argv[1]), json.loads(sys.argv[2])
real_score = online_dpo.OnlineTrainer._score
def score(self, prompts, comps):
    if self.step == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_score(self, prompts, comps)
online_dpo.OnlineTrainer._score = score
codes = []
for args in runs:
    pid = os.fork()
    if pid == 0:
        try:
            entry.train_online(None, args)
        finally:
            os._exit(3)  # only reached when the kill did not happen
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""

METHODS = {
    "online_dpo": {"method": "online_dpo"},
    "grpo": {"method": "grpo", "num_generations": 3},
    "ipo_md": {"method": "ipo_md", "loss": "ipo", "mixture_beta": 0.3},
}


def run_args(model_dir, out_dir, name, method) -> dict:
    return {
        "model": str(model_dir),
        "output_dir": str(out_dir),
        "run_name": name,
        "data": "arithmetic_edit",
        "num_train": 12,
        "num_eval": 0,
        "batch_size": 3,
        "max_steps": 3,
        "save_every": KILL_AFTER,
        "num_task_eval": 0,
        "eval_before": False,
        "quiet": True,
        "report_to": "none",
        "lr": 1e-2,
        "max_new_tokens": 5,
        "judge": "online_helpers:length_score",
        "missing_eos_penalty": 0.5,
        **METHODS[method],
    }


class KilledRuns:
    """The subprocess that trains every method until its SIGKILL; `wait()` -> exit codes."""

    def __init__(self, model_dir, out_dir):
        self.out_dir, self.codes = out_dir, None
        runs = [
            [f"{k}={v}" for k, v in run_args(model_dir, out_dir, m, m).items()] for m in METHODS
        ]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(torch.get_num_threads()),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", KILL_DRIVER, str(KILL_AFTER), json.dumps(runs)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait(self) -> dict:
        if self.codes is None:
            out, err = self.proc.communicate(timeout=600)
            assert self.proc.returncode == 0, err[-3000:]
            self.codes = dict(zip(METHODS, json.loads(out.strip().splitlines()[-1])))
        return self.codes


@pytest.fixture(scope="module")
def killed_runs(tiny_dir, tmp_path_factory):
    runs = KilledRuns(tiny_dir, tmp_path_factory.mktemp("killed"))
    yield runs
    if runs.proc.poll() is None:
        runs.proc.kill()
        runs.proc.wait()


def weights(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", list(METHODS))
def test_online_run_killed_after_a_checkpoint_resumes_bit_equal(
    tiny_dir, tmp_path, killed_runs, method
):
    full = train_online(run_args(tiny_dir, tmp_path, "full", method))
    assert killed_runs.wait()[method] == -signal.SIGKILL
    killed = killed_runs.out_dir / method
    assert ckpt.latest_checkpoint(killed / "checkpoints").name == f"step-{KILL_AFTER}"
    assert not (killed / "final").exists()
    resumed = train_online(None, [f"resume={killed}"])
    assert resumed.metrics["steps"] == 3
    want, got, initial = (
        weights(d) for d in (full.run_dir / "final", resumed.run_dir / "final", tiny_dir)
    )
    assert any(not torch.equal(want[n], initial[n]) for n in want), "nothing trained"
    for n in want:
        assert torch.equal(want[n], got[n]), f"{method}: {n} differs after the resume"
    rows = [json.loads(x) for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2, 3]
