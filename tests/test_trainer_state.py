"""Reference modes, the reference cache, LoRA output, and resume (SIGKILL and a kill while a
checkpoint is being written)."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from run_helpers import tiny_run_config, train_killed_while_saving
from transformers import AutoModelForCausalLM

from preftune.api import train
from preftune.logps import sequence_logps
from preftune.train import checkpoint as ckpt
from preftune.train.batches import pair_batch
from preftune.train.loop import run
from preftune.train.trainer import Trainer

cfg = tiny_run_config


def first_loss(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_reference_modes_agree(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    trainers = {
        mode: Trainer(cfg(tiny_dir, tmp_path, mode, reference=mode, lora=(mode == "lora")))
        for mode in ("frozen", "precompute", "lora")
    }
    t0 = trainers["frozen"]
    idx = [3, 0, 7]
    batch = pair_batch(t0.data.train, idx, t0.tokenizer.pad_token_id, packed=True)
    want = sequence_logps(t0.reference.model, batch.tokens).double()
    for mode, t in trainers.items():
        got = t.reference.logps(batch.tokens, (batch.index, len(idx))).double()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5, msg=f"reference mode {mode}")
    for t in trainers.values():
        res = run(t)
        assert first_loss(res.run_dir) == pytest.approx(math.log(2), abs=1e-6)


def test_reference_cache_is_reused_and_invalidated(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    a = Trainer(cfg(tiny_dir, tmp_path, "a", reference="precompute"))
    assert a.cache_reused == {"train": False, "eval": False}
    b = Trainer(cfg(tiny_dir, tmp_path, "b", reference="precompute"))
    assert b.cache_reused == {"train": True, "eval": True}
    c = Trainer(
        cfg(tiny_dir, tmp_path, "c", reference="precompute", num_train=12)
    )  # the data changed
    assert c.cache_reused["train"] is False


def test_lora_saves_adapter_and_merged_model(tiny_dir, tmp_path):
    from peft import PeftModel

    res = train(cfg(tiny_dir, tmp_path, "lora", lora=True, lora_r=4, max_steps=3, lr=5e-2))
    final = res.run_dir / "final"
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_dir), final / "adapter"
    ).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    t = Trainer(cfg(tiny_dir, tmp_path, "probe"))
    batch = pair_batch(t.data.train, [0, 1, 2], t.tokenizer.pad_token_id, packed=False)
    with torch.no_grad():
        lm, la, lb = (sequence_logps(m, batch.tokens) for m in (merged, adapted, base))
    torch.testing.assert_close(lm, la, rtol=1e-5, atol=1e-4)
    assert (lm - lb).abs().max() > 1e-3, "the adapter changed nothing: the test could not fail"


def weights(run_dir):
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype="auto")
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_weights(a, b, atol=0.0):
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def test_resume_after_sigkill_equals_uninterrupted(tiny_dir, tmp_path):
    common = {"max_steps": 8, "num_train": 32, "save_every": 1, "keep_checkpoints": 2}
    full = train(cfg(tiny_dir, tmp_path, "full", **common))
    args = [
        f"{k}={v}"
        for k, v in cfg(tiny_dir, tmp_path, "killed", **common).flat().items()
        if k
        in (
            "model",
            "data",
            "output_dir",
            "run_name",
            "num_train",
            "num_eval",
            "batch_size",
            "max_steps",
            "num_task_eval",
            "eval_before",
            "quiet",
            "report_to",
            "lr",
            "save_every",
            "keep_checkpoints",
        )
    ]
    # like with like: the in-process runs use conftest's 1 thread, and a different thread count
    # sums in another order on some CPUs (AVX-512), so bit-equality holds only at equal counts
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "preftune.cli", "train", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    ckroot = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckroot / "step-3").exists() and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = ckpt.latest_checkpoint(ckroot)
    assert done is not None and int(done.name.split("-")[1]) < 8, (
        "the kill came too late to test anything"
    )
    resumed = train(None, [f"resume={tmp_path / 'killed'}"])
    assert resumed.metrics["steps"] == 8
    assert_same_weights(weights(full.run_dir), weights(resumed.run_dir))
    steps = [
        json.loads(x)["step"]
        for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in x and "eval/loss" not in x
    ]
    assert steps == list(range(1, 9)), "metrics.jsonl has each step once"


def test_kill_while_writing_checkpoint_leaves_run_resumable(tiny_dir, tmp_path, monkeypatch):
    common = {"max_steps": 5, "num_train": 20, "save_every": 1}
    full = train(cfg(tiny_dir, tmp_path, "full", **common))
    train_killed_while_saving(cfg(tiny_dir, tmp_path, "crash", **common), 3, monkeypatch)
    root = tmp_path / "crash" / "checkpoints"
    assert (root / ".tmp-step-3").exists() and not (root / "step-3").exists()
    assert ckpt.latest_checkpoint(root).name == "step-2"
    resumed = train(None, [f"resume={tmp_path / 'crash'}"])
    assert_same_weights(weights(full.run_dir), weights(resumed.run_dir))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_on_the_same_global_batch(tiny_dir, tmp_path):
    """torchrun with 2 gloo processes, each taking half of every batch, must train exactly what
    one process does: gradients are averaged over processes before clipping and the step."""
    keys = (
        "model",
        "data",
        "output_dir",
        "run_name",
        "num_train",
        "num_eval",
        "batch_size",
        "max_steps",
        "num_task_eval",
        "eval_before",
        "quiet",
        "report_to",
        "lr",
        "dtype",
        "share_prefix",
    )
    # share_prefix off: a shared prefix's gradient is summed over each process's rows, which
    # Llama's RMSNorm rounds in float32 even in a float64 model, and AdamW magnifies that
    # rounding on near-zero gradients (up to 3e-8 in the weights); its equality is tested alone
    common = {"max_steps": 3, "dtype": "float64", "share_prefix": False}
    one = train(cfg(tiny_dir, tmp_path, "one", **common))
    args = [
        f"{k}={v}" for k, v in cfg(tiny_dir, tmp_path, "two", **common).flat().items() if k in keys
    ]
    # ACCELERATE_USE_CPU: without it accelerate under torchrun on a CPU machine sees 2 single runs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "preftune.cli",
            "train",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["num_processes"] == 2
    losses = [
        [
            json.loads(x)["loss"]
            for x in (r / "metrics.jsonl").read_text().splitlines()
            if '"grad_norm"' in x
        ]
        for r in (one.run_dir, tmp_path / "two")
    ]
    assert len(losses[0]) == 3
    for a, b in zip(*losses):
        assert math.isclose(a, b, rel_tol=1e-9)
    assert_same_weights(weights(one.run_dir), weights(tmp_path / "two"), atol=1e-9)


def test_gradient_checkpointing_recomputes_layers_and_changes_nothing(
    tiny_dir, tmp_path, monkeypatch
):
    """from_pretrained hands back an eval-mode model, where transformers skips checkpointing:
    the trainer must train in train mode, so each layer really runs twice, for the same step."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    results = {}
    for gc in (False, True):
        # share_prefix off: a shared prefix is a forward call of its own, which would count
        t = Trainer(
            cfg(
                tiny_dir,
                tmp_path,
                f"gc{gc}",
                gradient_checkpointing=gc,
                dtype="float64",
                share_prefix=False,
            )
        )
        assert t.policy.training
        calls = []
        # a pre-hook inside the checkpointed forward: the recomputation stops early after the
        # last saved tensor, before any post-hook of the layer or its MLP could fire
        layer = t.policy.model.layers[0].mlp
        handle = layer.register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        m = t.train_step([0, 1, 2, 3])
        handle.remove()
        results[gc] = (len(calls), m["loss"], m["grad_norm"])
    assert results[False][0] == 1 and results[True][0] == 2  # forward, and its recomputation
    assert math.isclose(results[False][1], results[True][1], rel_tol=1e-12)
    assert math.isclose(results[False][2], results[True][2], rel_tol=1e-9)


@pytest.mark.parametrize("share_prompt", ["true", "false"])
def test_shared_prefix_changes_nothing_but_the_work(tiny_dir, tmp_path, monkeypatch, share_prompt):
    """The bundled set's chat prompts share their system head: with share_prefix it runs once
    per micro-batch, and the step (loss, gradient norm, reference log-probs) is the same."""
    results = {}
    for share in (True, False):
        monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / f"cache{share}"))  # no reuse
        t = Trainer(
            cfg(
                tiny_dir,
                tmp_path,
                f"prefix{share}{share_prompt}",
                share_prefix=share,
                share_prompt=share_prompt,
                reference="precompute",
                dtype="float64",
            )
        )
        tokens = t._pair_batch(t.data.train, [0, 1, 2, 3]).tokens
        if tokens.paths is not None:  # varlen layout: the prefix leads the row, in every path
            assert all(spans[0][0] == 0 for spans, _ in tokens.paths) == share
        else:
            assert (tokens.prefix_ids is not None) == share
        m = t.train_step([0, 1, 2, 3])
        assert t.cache_reused["train"] is False
        results[share] = (m["loss"], m["grad_norm"], t.reference.chosen.clone())
    assert math.isclose(results[True][0], results[False][0], rel_tol=1e-12)
    assert math.isclose(results[True][1], results[False][1], rel_tol=1e-7)
    torch.testing.assert_close(results[True][2], results[False][2], rtol=0, atol=1e-10)


@pytest.mark.parametrize("max_norm", [1e-3, 1e6, None])
def test_clipping_equals_torchs_clip_grad_norm(max_norm):
    """The trainer skips clip_grad_norm_'s multiply-by-1.0 pass when nothing is clipped; the
    gradients and the returned norm stay torch's, clipped or not."""
    from accelerate import Accelerator

    from preftune.models import tiny_causal_lm
    from preftune.train.step import StepEngine

    a, b = tiny_causal_lm(64, seed=3), tiny_causal_lm(64, seed=3)
    torch.manual_seed(0)
    for pa, pb in zip(a.parameters(), b.parameters()):
        pa.grad = torch.randn_like(pa)
        pb.grad = pa.grad.clone()
    got = StepEngine(Accelerator(cpu=True), a, None, None, max_norm).clip_and_check(step=1)
    want = torch.nn.utils.clip_grad_norm_(list(b.parameters()), max_norm or float("inf"))
    assert got == float(want)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)
    clipped = max_norm is not None and max_norm < got
    assert clipped == (max_norm == 1e-3)


def _file_backed(t: torch.Tensor, name: str) -> bool:
    """Whether the tensor's memory lies in a mapping of a file called `name`."""
    addr = t.untyped_storage().data_ptr()
    for line in open("/proc/self/maps"):
        span, *rest = line.split()
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= addr < hi:
            return rest[-1].endswith(name)
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
@pytest.mark.parametrize("lora", [False, True])
def test_trained_weights_leave_the_file_mapping(tiny_dir, tmp_path, lora):
    """transformers maps safetensors weights copy-on-write; a trained policy's weights are copied
    into process memory at load (so its first optimizer step takes no copy-on-write fault per
    page), tied weights stay tied, values unchanged; a LoRA base stays frozen and mapped."""
    from preftune.models import load_causal_lm
    from preftune.train.setup import load_policy

    mapped = load_causal_lm(str(tiny_dir))
    assert _file_backed(mapped.model.layers[0].mlp.up_proj.weight, "model.safetensors")
    model, _, _ = load_policy(cfg(tiny_dir, tmp_path, "own", lora=lora))
    base = model.get_base_model() if lora else model
    w = base.model.layers[0].mlp.up_proj.weight
    assert _file_backed(w, "model.safetensors") == lora
    assert torch.equal(w, mapped.model.layers[0].mlp.up_proj.weight)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    if not lora:  # with a GPU the move to the device copies them; no host copy first
        from preftune.models import own_weights

        with pytest.MonkeyPatch.context() as m:
            m.setattr(torch.accelerator, "is_available", lambda: True)
            again = load_causal_lm(str(tiny_dir))
            own_weights(again)
            assert _file_backed(again.model.layers[0].mlp.up_proj.weight, "model.safetensors")


def test_optimizer_state_created_up_front_updates_bit_identically():
    """AdamW's moments allocated before the first step (setup.create_optimizer_state) give the
    same parameters and state, bit for bit, as torch creating them inside its first step."""
    from preftune.train.setup import create_optimizer_state

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    models = [base, copy.deepcopy(base)]
    opts = [
        torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=True) for m in models
    ]
    create_optimizer_state(opts[1])
    assert len(opts[1].state) == 4 and not opts[0].state  # created now, not at the first step
    for step in range(3):
        x = torch.randn(4, 7, generator=torch.Generator().manual_seed(step))
        for m, o in zip(models, opts):
            o.zero_grad(set_to_none=True)
            m(x).pow(2).sum().backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            o.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opts[0].state.values(), opts[1].state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    create_optimizer_state(opts[1])  # a populated (e.g. resumed) state is left alone
    assert torch.equal(opts[1].state[models[1][0].weight]["step"], torch.tensor(3.0))
    sgd = torch.optim.SGD(base.parameters(), lr=0.1)
    create_optimizer_state(sgd)
    assert not sgd.state
