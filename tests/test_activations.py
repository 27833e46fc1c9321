"""gradient_checkpointing=selective: the same log-probs and gradients as the plain step."""

from __future__ import annotations

import contextlib

import pytest
import torch

from preftune import activations
from preftune.activations import checkpointing_kwargs
from preftune.config import ConfigError, build_config
from preftune.layouts import build_token_batch
from preftune.logps import sequence_logps
from preftune.models import tiny_causal_lm

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16], [3]]
COMPS = [[20, 21, 2], [22, 2], [23, 24, 25, 26, 2], [40, 41, 42, 43, 44, 45, 46, 2]]


def _grads(mode, dtype: torch.dtype, autocast: bool, calls: list | None = None):
    model = tiny_causal_lm(64, seed=4, eos_token_id=2, pad_token_id=0, attn="sdpa").to(dtype)
    model.train()
    if mode:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=checkpointing_kwargs(mode)
        )
    batch = build_token_batch(PROMPTS, COMPS, pad_id=0, packed=False)
    weights = torch.linspace(-1.0, 2.0, len(PROMPTS), dtype=dtype)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        lp = sequence_logps(model, batch)
    (lp * weights).sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "dtype, autocast, tol",
    # fp64: the same operations on the same values, only run twice, so equal to rounding; bf16
    # autocast: the recomputed casts round the same fp32 values the same way
    [(torch.float64, False, 1e-12), (torch.float32, True, 1e-6)],
    ids=["fp64", "bf16-autocast"],
)
def test_selective_checkpointing_gives_the_plain_gradients(monkeypatch, dtype, autocast, tol):
    kept = []
    policy = activations._policy

    def counting(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        kept.append(decision == activations.CheckpointPolicy.MUST_SAVE)
        return decision

    monkeypatch.setattr(activations, "_policy", counting)
    plain_lp, plain = _grads(False, dtype, autocast)
    lp, grads = _grads("selective", dtype, autocast)
    # the policy ran, and both kept (matmuls) and recomputed (the rest) some ops
    assert any(kept) and not all(kept)
    torch.testing.assert_close(lp, plain_lp, rtol=0, atol=tol)
    assert plain.keys() == grads.keys()
    for name in plain:
        torch.testing.assert_close(
            grads[name], plain[name], rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_gradient_checkpointing_key():
    assert build_config(
        None, ["gradient_checkpointing=selective"]
    ).model.gradient_checkpointing == ("selective")
    assert build_config(None, ["gradient_checkpointing=true"]).model.gradient_checkpointing is True
    with pytest.raises(
        ConfigError, match="gradient_checkpointing must be true, false or selective"
    ):
        build_config(None, ["gradient_checkpointing=some"])
