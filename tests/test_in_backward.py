"""optimizer_in_backward: the same updates as the normal step, without holding every gradient."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from run_helpers import tiny_run_args, tiny_run_config, train_killed_while_saving
from safetensors.torch import load_file

from preftune.api import train
from preftune.config import ConfigError
from preftune.models import save_tiny_model_dir
from preftune.train import checkpoint as ckpt
from preftune.train.in_backward import StepInBackward
from preftune.train.setup import TrainingError
from preftune.train.trainer import Trainer


def cfg(tiny_dir, tmp_path, name, **extra):
    extra = {"max_steps": 3, "max_grad_norm": None, "dtype": "float64", **extra}
    return tiny_run_config(tiny_dir, tmp_path, name, **extra)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"gradient_checkpointing": True},
        {"optimizer": "sgd", "weight_decay": 0.1},
        {"scheduler": "linear", "warmup_ratio": 0.5, "weight_decay": 0.1},
        {"optimizer": "rmsprop"},
        {"lora": True, "lr": 1e-2},
        {"untied": True},
        {"bf16": True, "dtype": "float32"},  # the LM head through autograd, not the fused path
    ],
    ids=[
        "adamw",
        "adamw-checkpointing",
        "sgd",
        "adamw-decay-warmup",
        "rmsprop",
        "lora",
        "untied-head",
        "bf16-autocast",
    ],
)
def test_in_backward_updates_equal_the_normal_step(tiny_dir, tmp_path, monkeypatch, request, extra):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    extra = dict(extra)
    if extra.pop("untied", False):
        tiny_dir = save_tiny_model_dir(tmp_path / "untied", seed=0, tied=False)
    # at the end of each backward, only the weights preftune's engine writes itself still hold
    # a gradient: every other one was applied and freed in the backward
    held, real_finish = [], StepInBackward.finish

    def finish(self):
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        held.append(
            {self.names[id(p)] for p in params if id(p) in self._single and p.grad is not None}
        )
        return real_finish(self)

    monkeypatch.setattr(StepInBackward, "finish", finish)
    if extra.get("bf16"):  # accelerate keeps one mixed-precision setting per process
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    runs = {}
    for oib in (False, True):
        t = Trainer(cfg(tiny_dir, tmp_path, f"oib{oib}", optimizer_in_backward=oib, **extra))
        start = {n: p.detach().clone() for n, p in t.policy.named_parameters()}
        metrics = []
        for step, batch in enumerate(([0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11])):
            t.step = step
            metrics.append(t.train_step(batch))
            assert all(p.grad is None for p in t.policy.parameters())
        runs[oib] = (
            start,
            {n: p.detach().clone() for n, p in t.policy.named_parameters()},
            metrics,
        )
    (start, normal, m_normal), (_, inb, m_inb) = runs[False], runs[True]
    assert any((normal[n] - start[n]).abs().max() > 1e-4 for n in normal), "nothing trained"
    for n in normal:  # the optimizer's own update, one parameter at a time: the same numbers
        torch.testing.assert_close(
            inb[n], normal[n], rtol=0, atol=1e-15, msg=lambda m, n=n: f"{n}: {m}"
        )
    assert held == [set()] * 3  # three steps, every hooked gradient applied in backward
    for a, b in zip(m_normal, m_inb):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-12)
        # the same norms summed in another order (torch's foreach norm against one per tensor)
        tol = 1e-6 if extra.get("dtype") == "float32" else 1e-9
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=tol)
        assert a["lr"] == b["lr"]


def test_in_backward_holds_one_gradient_at_a_time(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    live = {}
    for oib in (False, True):
        t = Trainer(cfg(tiny_dir, tmp_path, f"oib{oib}", optimizer_in_backward=oib))
        named = [(n, p) for n, p in t.policy.named_parameters() if p.requires_grad]
        seen = set()
        # registered after the trainer's hook, so it sees each parameter just after its update
        handles = [
            p.register_post_accumulate_grad_hook(
                lambda _p, seen=seen, named=named: seen.add(
                    tuple(n for n, q in named if q.grad is not None)
                )
            )
            for _, p in named
        ]
        t.train_step([0, 1, 2, 3])
        for h in handles:
            h.remove()
        live[oib] = max(seen, key=len)
    assert len(live[False]) == len(named)  # the normal step ends holding every gradient
    # the tied embedding's gradient is written by preftune's engine itself (no in-backward
    # update); it is updated after the backward, all others long freed
    assert live[True] == ("model.embed_tokens.weight",)


def test_in_backward_resumed_equals_uninterrupted(tiny_dir, tmp_path, monkeypatch):
    common = {
        "max_steps": 4,
        "num_train": 20,
        "save_every": 1,
        "optimizer_in_backward": True,
        "dtype": "float32",
    }
    full = train(cfg(tiny_dir, tmp_path, "full", **common))
    train_killed_while_saving(cfg(tiny_dir, tmp_path, "crash", **common), 3, monkeypatch)
    resumed = train(None, [f"resume={tmp_path / 'crash'}"])
    for name in ("final/model.safetensors", "checkpoints/step-4/weights.safetensors"):
        wa, wb = load_file(full.run_dir / name), load_file(resumed.run_dir / name)
        assert wa.keys() == wb.keys()
        for n in wa:
            torch.testing.assert_close(wa[n], wb[n], rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")
    sa, sb = (
        ckpt.read_state(r.run_dir / "checkpoints/step-4")["optimizer"] for r in (full, resumed)
    )
    assert sa["state"].keys() == sb["state"].keys() and len(sa["state"]) == len(wa)
    for i in sa["state"]:  # AdamW's moments and step counts, in-backward and at the end alike
        for k in sa["state"][i]:
            torch.testing.assert_close(sa["state"][i][k], sb["state"][i][k], rtol=0, atol=0)
        assert int(sa["state"][i]["step"]) == 4


@pytest.mark.parametrize(
    "extra, named",
    [({"max_grad_norm": 1.0}, "max_grad_norm=1.0"), ({"grad_accum": 2}, "grad_accum=2")],
)
def test_in_backward_refuses_clipping_and_accumulation(tiny_dir, tmp_path, extra, named):
    with pytest.raises(ConfigError, match=named):
        cfg(tiny_dir, tmp_path, "bad", optimizer_in_backward=True, **extra)


def test_non_finite_gradient_names_the_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    StepInBackward(model, opt, step=lambda: 1)
    x = torch.ones(2, 3)
    model[1].weight.register_hook(lambda g: g * float("nan"))  # the gradient, not the loss
    with pytest.raises(TrainingError, match=r"at step 1: non-finite gradient in 1\.weight"):
        model(x).sum().backward()


def test_second_gradient_in_one_step_is_refused():
    """A parameter whose gradient arrives in two backward calls would be updated with half of it."""
    lin = torch.nn.Linear(3, 1)
    inb = StepInBackward(lin, torch.optim.SGD(lin.parameters(), lr=0.1), step=lambda: 1)
    x = torch.ones(2, 3)
    lin(x).sum().backward()
    with pytest.raises(TrainingError, match="second gradient"):
        lin(x).sum().backward()
    inb.finish()
    lin(x).sum().backward()  # the next step is fine


@pytest.mark.parametrize("method", ["online_dpo", "remax", "reward"])
def test_in_backward_equals_the_normal_step_in_the_other_trainers(
    tiny_dir, tmp_path, monkeypatch, method
):
    """The online loops and the reward trainer end their steps through the same code."""
    from preftune.api import train_online, train_reward

    monkeypatch.setattr("preftune.report.write_report", lambda run_dir: None)
    hooked = []
    real_hook = StepInBackward._hook
    monkeypatch.setattr(  # (hooked parameters of this run, call)
        StepInBackward,
        "_hook",
        lambda self, p: hooked.append(len(self._single)) or real_hook(self, p),
    )
    final = {}
    for oib in (False, True):
        args = tiny_run_args(
            tiny_dir,
            tmp_path,
            f"{method}{oib}",
            num_eval=0,
            dtype="float64",
            max_grad_norm=None,
            optimizer_in_backward=oib,
        )
        if method == "reward":
            res = train_reward(args)
        else:
            res = train_online(
                {
                    **args,
                    "method": method,
                    "max_new_tokens": 6,
                    "judge": "online_helpers:length_score",
                }
            )
        final[oib] = load_file(res.run_dir / "final" / "model.safetensors")
    # whole steps of in-backward updates, at least one (an online step whose pairs all tie
    # trains nothing)
    assert len(hooked) >= hooked[0] > 0 and len(hooked) % hooked[0] == 0
    start = load_file(Path(tiny_dir) / "model.safetensors")
    common = start.keys() & final[False].keys()
    assert any((final[False][n].double() - start[n].double()).abs().max() > 1e-4 for n in common)
    assert final[False].keys() == final[True].keys()
    for n in final[False]:
        torch.testing.assert_close(
            final[True][n], final[False][n], rtol=0, atol=1e-15, msg=lambda m, n=n: f"{n}: {m}"
        )
