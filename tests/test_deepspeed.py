"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate, 2 CPU processes over gloo: the same losses and
gradient norms as one process on the same global batch, each process holding half of the
optimizer state, final/ one model plain transformers loads; a run killed with SIGKILL after a
checkpoint and resumed ends bit-equal to an uninterrupted one, and its checkpoints hold no pickle;
LoRA trains under both stages, SGD (no optimizer state) checkpoints; under ZeRO-3 TDPO's and
KTO's frozen reference is partitioned (half per process) and gathered per micro-batch (online
methods: tests/test_online_engines.py).
One torchrun launch per stage runs the jobs (tests/ddp_driver.py), the env what `accelerate
launch` sets from examples/accelerate/zero*_cpu.yaml; then one launch per stage is killed and one
resumes both.

float32 models: DeepSpeed keeps fp32 master weights whatever the model's dtype (a float64 model
would be rounded to float32 at every step), so both sides run float32. Measured (relative, 3 steps):
losses within 1e-6 (the bound is the issue's 1e-5), gradient norms within 3.3e-5 (KTO with
accumulation, AVX-512 host; 1.3e-5 on AVX2; bound 1e-4: float32 sums in another order, the fast
paths on in the 1-process run).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import tiny_run_args
from safetensors.torch import load_file
from test_distributed import (
    ENTRY,
    ENV,
    RESUMED,
    _free_port,
    _killed_after_checkpoint_2,
    _launch,
    _losses,
)
from transformers import AutoModelForCausalLM

from preftune.cli import main
from preftune.models import pickle_files

# In the default run (the test extra installs deepspeed); skipped, saying why, where it is absent.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install 'preftune[deepspeed]')",
)

COMMON = {"dtype": "float32", "max_steps": 3}
LORA = {"lora": True, "lora_r": 4, "share_prefix": False, "save_every": 1}  # as test_distributed
# ZeRO-2 keeps the parameters whole: the frozen reference (TDPO, KTO) is whole too
JOBS = {
    2: {
        "dpo": ("train", {}),
        "tdpo": ("train", {"loss": "tdpo1"}),
        "kto": ("train", {"loss": "kto", "grad_accum": 2, "batch_size": 8}),
        "reward": ("reward", {}),
        # an optimizer that keeps no state (SGD without momentum), checkpointed at each step
        "sgd": ("train", {"optimizer": "sgd", "save_every": 1}),
        "lora": ("train", LORA),
    },
    # ZeRO-3 partitions the frozen reference too, gathered whole for each micro-batch
    3: {
        "dpo": ("train", {}),
        "tdpo": ("train", {"loss": "tdpo1"}),
        "kto": ("train", {"loss": "kto", "grad_accum": 2, "batch_size": 8}),
        "lora": ("train", LORA),
    },
}


# accelerate drops DeepSpeed under ACCELERATE_USE_CPU; DeepSpeed picks its CPU backend itself
DS_ENV = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}


def zero_env(stage: int) -> dict:
    """What `accelerate launch --config_file examples/accelerate/zero{stage}_cpu.yaml` sets."""
    return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage)}


def _args(tiny_dir, out, name, **extra) -> dict:
    return tiny_run_args(tiny_dir, out, name, **{**COMMON, **extra})


@pytest.fixture(scope="module")
def zero_runs(tiny_dir, tmp_path_factory):
    """Every job of JOBS under 2 processes, one launch per stage; returns the output folder."""
    out = tmp_path_factory.mktemp("zero")
    for stage, jobs in JOBS.items():
        env = zero_env(stage)
        todo = [
            {"kind": kind, "env": env, "args": _args(tiny_dir, out, f"z{stage}-{name}", **extra)}
            for name, (kind, extra) in jobs.items()
        ]
        # the uninterrupted run a killed one is compared with, a checkpoint at every step
        todo.append({"kind": "train", "env": env, "args": _args(tiny_dir, out, f"z{stage}-full", **RESUMED)})  # fmt: skip
        run = subprocess.run(_launch(out, f"zero{stage}", todo), env=DS_ENV, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-12000:]
        (out / f"zero{stage}.log").write_text(run.stdout + run.stderr)
    return out


@pytest.fixture(scope="module")
def one_process(tiny_dir, tmp_path_factory):
    out, done = tmp_path_factory.mktemp("one-f32"), {}

    def run(name: str) -> Path:
        if name not in done:
            kind, extra = JOBS[2][name]
            done[name] = ENTRY[kind](_args(tiny_dir, out, name, **extra)).run_dir
        return done[name]

    return run


CASES = [(stage, name) for stage, jobs in JOBS.items() for name in jobs]


@pytest.mark.parametrize(("stage", "name"), CASES)
def test_zero_two_processes_equal_one(zero_runs, one_process, stage, name):
    one, two = one_process(name), zero_runs / f"z{stage}-{name}"
    assert json.loads((two / "summary.json").read_text())["num_processes"] == 2
    for key, rel in (("loss", 1e-5), ("grad_norm", 1e-4)):
        a, b = _losses(one, key), _losses(two, key)
        assert len(a) == len(b) == 3
        for x, y in zip(a, b):
            assert math.isclose(x, y, rel_tol=rel), (key, a, b)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_each_process_holds_half_the_optimizer_state(zero_runs, tiny_dir, stage):
    """AdamW's fp32 master weights and two moments: half of the model's parameters each per
    process (measured on the tiny model: 1,613,984 of 3,227,968; ZeRO-3 also its parameters)."""
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    for r in (0, 1):
        sizes = json.loads((zero_runs / f"z{stage}-dpo" / f"sizes-rank{r}.json").read_text())
        assert sizes["master"] == total // 2, sizes
        assert sizes["optimizer"] == 2 * sizes["master"], sizes
        # ZeRO-2 keeps the parameters whole; ZeRO-3's module holds none outside a forward
        assert sizes["params"] == (total if stage == 2 else 0), sizes


def test_zero3_partitions_the_frozen_reference(zero_runs, tiny_dir):
    """TDPO's frozen reference under ZeRO-3: each process holds half of it at rest (each
    parameter split in 2, the odd one's partition padded by one element; measured 1,613,984 of
    3,227,968), gathered whole only for each micro-batch; under ZeRO-2 it is whole."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    total, count = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
    for r in (0, 1):
        z3 = json.loads((zero_runs / "z3-tdpo" / f"sizes-rank{r}.json").read_text())
        assert total // 2 <= z3["reference"] <= total // 2 + count, z3
        z2 = json.loads((zero_runs / "z2-tdpo" / f"sizes-rank{r}.json").read_text())
        assert z2["reference"] == total, z2


@pytest.mark.parametrize(("stage", "name"), [(2, "dpo"), (3, "dpo"), (2, "lora"), (3, "lora")])
def test_zero_final_loads_with_plain_transformers(zero_runs, one_process, stage, name):
    """final/ is one model, gathered from the partitions under ZeRO-3, with the weights of the
    1-process run up to float32 rounding of the different summation order; a LoRA run's
    adapter/ too. LoRA's bound is wider: AdamW divides LoRA B's near-zero first gradients by
    their own size, so their rounding moves whole fractions of an update (lr 1e-3; measured
    4.5e-5 under ZeRO-2, 2.1e-5 under ZeRO-3; bound 2e-4)."""
    final = zero_runs / f"z{stage}-{name}" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.num_hidden_layers >= 1
    lora = name == "lora"
    files = ["model.safetensors"] + (["adapter/adapter_model.safetensors"] if lora else [])
    atol = 2e-4 if lora else 1e-5
    for f in files:
        a = load_file(one_process(name) / "final" / f)
        b = load_file(final / f)
        assert set(a) == set(b) and a, f
        for n in a:
            torch.testing.assert_close(
                b[n], a[n], rtol=1e-4, atol=atol, msg=lambda m, n=n: f"{n}: {m}"
            )


def test_a_deepspeed_launch_with_use_cpu_is_refused_in_one_line(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    """accelerate drops DeepSpeed under use_cpu (it would run DDP, or single runs): refused
    before anything is set up, saying which setting to change."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    args = _args(tiny_dir, tmp_path, "cpu")
    assert main(["train", *(f"{k}={v}" for k, v in args.items())]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("preftune: error")]
    assert len(errors) == 1 and "use_cpu: false" in errors[0], errors
    assert not (tmp_path / "cpu").exists()


def test_zero_on_cpus_builds_no_shared_memory_all_reduce(zero_runs):
    """DeepSpeed's shared-memory all-reduce (only its inference_all_reduce uses it) is neither
    compiled nor loaded: DeepSpeed prints "... built successfully" whenever it loads that op."""
    for stage in (2, 3):
        log = (zero_runs / f"zero{stage}.log").read_text()
        assert "deepspeed_shm_comm" not in log and "built successfully" not in log, log[-2000:]


@pytest.fixture(scope="module")
def zero_resumed(zero_runs, tiny_dir):
    """Per stage, a run like z{stage}-full SIGKILLed (torchrun and both ranks) once its checkpoint
    2 is on disk, then both resumed in one 2-process launch, with one more job there: the ZeRO-2
    run resumed under ZeRO-3, which must be refused."""
    out, resume = zero_runs, []
    for stage in (2, 3):
        name, env = f"z{stage}-killed", zero_env(stage)
        job = [{"kind": "train", "env": env, "args": _args(tiny_dir, out, name, **RESUMED)}]
        _killed_after_checkpoint_2(out, name, job, DS_ENV)
        resume.append({"kind": "train", "env": env, "args": {"resume": str(out / name)}})
    other_stage = {"resume": str(out / "z2-full"), "max_steps": 6}
    resume.append({"kind": "train", "env": zero_env(3), "args": other_stage})
    done = subprocess.run(_launch(out, "resume", resume), env=DS_ENV, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-12000:]
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_killed_and_resumed_equals_uninterrupted(zero_resumed, stage):
    """The fp32 masters, AdamW's moments and step count, the working weights, scheduler and RNG
    come back: final/ is bit-equal to the uninterrupted run's (measured: equal to the bit, so the
    bound is 0), the per-step losses equal, and final/ loads with plain transformers. Each
    process wrote its block of the whole fp32 tensors."""
    out, name = zero_resumed, f"z{stage}-killed"
    errors = sorted(out.glob(f"{name}.error-rank*"))
    assert not errors, errors[0].read_text()
    shards = sorted(p.name for p in (out / name / "checkpoints" / "step-5" / "shards").iterdir())
    assert shards == ["rank-0.safetensors", "rank-1.safetensors"], shards
    a = load_file(out / f"z{stage}-full" / "final" / "model.safetensors")
    b = load_file(out / name / "final" / "model.safetensors")
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")
    assert _losses(out / name) == _losses(out / f"z{stage}-full")
    assert len(_losses(out / name)) == RESUMED["max_steps"]
    assert AutoModelForCausalLM.from_pretrained(out / name / "final").config.num_hidden_layers >= 1


def test_zero_checkpoints_hold_no_pickle(zero_resumed):
    """Only safetensors and JSON, and no file that starts as a pickle (protocol 2+) or as
    torch.save's zip archive does, whatever its name."""
    folders = [
        zero_resumed / f"z{s}-{k}" / "checkpoints" for s in (2, 3) for k in ("full", "killed")
    ]
    files = [f for d in folders for f in d.rglob("*") if f.is_file()]
    assert any(f.parent.name == "shards" for f in files)
    for f in files:
        assert f.suffix in (".json", ".safetensors"), f
        head = f.read_bytes()[:4]
        assert head[:1] != b"\x80" and head != b"PK\x03\x04", f
    assert not [p for d in folders for p in d.rglob("*") if p.is_dir() and pickle_files(p)]


def test_a_zero_checkpoint_resumed_under_another_stage_is_refused_in_one_line(zero_resumed):
    errors = [(zero_resumed / f"z2-full.error-rank{r}").read_text() for r in (0, 1)]
    assert errors[0] == errors[1] and "\n" not in errors[0], errors
    assert "a DeepSpeed ZeRO-2 run" in errors[0] and "this run is DeepSpeed ZeRO-3" in errors[0]


def test_a_zero_checkpoint_resumed_with_another_process_count_is_refused_in_one_line(zero_resumed):
    """One process (the env torchrun would give it) resuming the 2-process ZeRO-2 run: exit 2,
    one error line, and the run left as it was."""
    run = zero_resumed / "z2-full"
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    one = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "preftune.cli", "train", f"resume={run}",
                           "max_steps=6", "--quiet"], env={**DS_ENV, **zero_env(2), **one},
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    errors = [x for x in done.stderr.splitlines() if x.startswith("preftune: error")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1 and "written by 2 processes and this run has 1" in errors[0], errors
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
