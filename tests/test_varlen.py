"""The varlen layout (preftune/varlen_layout.py, preftune/logprob/varlen.py) against the plain
padded path: every completion's log-prob, every weight's gradient and TDPO's KL, in fp64
(exact up to summation order), bf16 autocast (stated tolerance), with grouped-query attention,
a shared prefix, shared completion tokens, and a completion with nothing laid out; its 4-D mask
fallback (eager attention, gradient checkpointing) against the same; and who gets it."""

from __future__ import annotations

import pytest
import torch
from test_logps import (
    CHOSEN,
    EDIT_CHOSEN,
    EDIT_PROMPTS,
    EDIT_REJECTED,
    HEAD,
    REJECTED,
    SHARED_PROMPTS,
    _tiny_hybrid_lm,
    per_example,
)

from preftune.layouts import build_shared_prompt_batch, fitted_rows
from preftune.logprob import plan, varlen
from preftune.logprob.arch import split_causal_lm
from preftune.logprob.plan import LayoutSettings, layout_settings, plan_forward, varlen_runs
from preftune.logps import hidden_at_targets, sequence_logps, sequence_logps_and_kl
from preftune.models import tiny_causal_lm
from preftune.train.batches import pair_batch
from preftune.varlen_layout import build_varlen_batch, masked

# chat-like pairs: a 10-token head every prompt starts with, then the edit pairs (shared
# leading completion tokens, a one-token completion that lays out nothing) and unrelated ones
PROMPTS = [HEAD + p for p in EDIT_PROMPTS + SHARED_PROMPTS]
PAIRS = [[c, r] for c, r in zip(EDIT_CHOSEN + CHOSEN, EDIT_REJECTED + REJECTED)]
W = torch.linspace(-2.0, 3.0, 2 * len(PAIRS), dtype=torch.float64)


def _model(seed=1, **kw):
    return tiny_causal_lm(64, seed=seed, eos_token_id=2, pad_token_id=0, **kw).double()


def _want(model, prompts=PROMPTS, pairs=PAIRS):
    return per_example(model, prompts * 2, [c for c, _ in pairs] + [r for _, r in pairs])


@pytest.mark.parametrize("kv_heads", [None, 2])
@pytest.mark.parametrize("share_prefix", [False, True])
@pytest.mark.parametrize("share_completions", [False, True])
def test_varlen_equals_each_sequence_alone(kv_heads, share_prefix, share_completions):
    model = _model(attn="sdpa", kv_heads=kv_heads)
    batch = build_varlen_batch(PROMPTS, PAIRS, share_prefix, share_completions)
    assert plan_forward(split_causal_lm(model)[0], batch).varlen
    want = _want(model)
    torch.testing.assert_close(sequence_logps(model, batch, 3), want, rtol=0, atol=1e-10)
    torch.testing.assert_close(sequence_logps(model, masked(batch), 3), want, rtol=0, atol=1e-10)
    # one row, no padding: each prompt once, the head once when shared
    shared = build_shared_prompt_batch(PROMPTS, PAIRS, 0, True, share_prefix, share_completions)
    L0 = 0 if shared.prefix_ids is None else shared.prefix_ids.numel()
    assert batch.input_ids.shape == (1, shared.input_ids.numel() + L0)


@pytest.mark.parametrize("share_prefix", [False, True])
def test_fitted_rows_equal_each_sequence_alone(share_prefix):
    """Padded shared-prompt rows holding several prompt groups (block-diagonal mask) give the
    log-probs and gradients of one group per row, in fewer slots."""
    model = _model(attn="sdpa", kv_heads=2)
    # one long answer: the other groups fit beside it
    prompts, pairs = PROMPTS + [HEAD + [3]], PAIRS + [[list(range(3, 40)) + [2], [4, 2]]]
    one, fit = (
        build_shared_prompt_batch(prompts, pairs, 0, share_prefix=share_prefix, fit_rows=f)
        for f in (False, True)
    )
    assert fit.input_ids.shape[1] == one.input_ids.shape[1]
    assert fit.input_ids.shape[0] < one.input_ids.shape[0]
    want = _want(model, prompts, pairs)
    torch.testing.assert_close(sequence_logps(model, fit, 3), want, rtol=0, atol=1e-10)
    grads = []
    for batch in (one, fit):
        model.zero_grad()
        (sequence_logps(model, batch) * torch.linspace(-2, 3, 2 * len(pairs))).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):  # fp32 RMSNorm inside the fp64 model: fp32 rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def test_fitted_rows_first_fit_decreasing():
    assert fitted_rows([5, 2, 3, 1, 4]) == [[0], [4, 3], [2, 1]]
    assert fitted_rows([7]) == [[0]]
    rows = fitted_rows([3, 3, 3, 3])
    assert sorted(g for r in rows for g in r) == [0, 1, 2, 3] and len(rows) == 4


def test_varlen_runs_attention_per_path(monkeypatch):
    """The per-path SDPA is what runs (one call per path and layer), not a fallback."""
    model = _model(attn="sdpa")
    batch = build_varlen_batch(PROMPTS, PAIRS)
    calls = []
    real = varlen.sdpa_attention_forward
    monkeypatch.setattr(
        varlen, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    sequence_logps(model, batch)
    assert len(calls) == len(batch.paths) * model.config.num_hidden_layers
    # a completion with nothing to lay out (a one-token answer) has no path of its own
    assert len(batch.paths) < 2 * len(PAIRS)


def _grads_and_kl(pol, ref, batch):
    pol.zero_grad()
    with torch.no_grad():
        ref_h = hidden_at_targets(ref, batch)
    lp, kl = sequence_logps_and_kl(pol, ref, batch, ref_h, chunk_size=4)
    ((lp + kl) * W).sum().backward()
    return [p.grad.clone() for p in pol.parameters()], lp.detach(), kl.detach()


def test_varlen_gradients_and_kl_match_padded():
    pol, ref = _model(seed=6, attn="sdpa", kv_heads=2), _model(seed=7, attn="sdpa", kv_heads=2)
    fast = _grads_and_kl(pol, ref, build_varlen_batch(PROMPTS, PAIRS))
    plain = _grads_and_kl(pol, ref, build_shared_prompt_batch(PROMPTS, PAIRS, 0))
    torch.testing.assert_close(fast[1], plain[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(fast[2], plain[2], rtol=1e-9, atol=1e-10)
    # Llama's RMSNorm computes in fp32 even in an fp64 model: gradients agree to fp32 rounding
    for a, b in zip(fast[0], plain[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


@pytest.mark.parametrize("fallback", ["eager", "checkpointing"])
def test_varlen_batch_under_its_mask_where_per_path_attention_cannot_run(fallback):
    """Eager attention and gradient checkpointing run the same row under the 4-D mask."""
    model = _model(attn="eager" if fallback == "eager" else "sdpa")
    if fallback == "checkpointing":
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
    batch = build_varlen_batch(PROMPTS, PAIRS)
    assert not varlen_runs(split_causal_lm(model)[0])
    with pytest.raises(ValueError, match="masked"):
        plan_forward(split_causal_lm(model)[0], batch)
    # eager attention takes its softmax in fp32 even in an fp64 model
    tol = 1e-7 if fallback == "eager" else 1e-10
    torch.testing.assert_close(sequence_logps(model, batch), _want(model), rtol=0, atol=tol)


def test_varlen_bf16_autocast_close_to_padded():
    """bf16 autocast: both layouts round differently (other matmul shapes), within the
    tolerance test_logps.py states for bf16 against fp32."""
    model = tiny_causal_lm(64, seed=2, eos_token_id=2, pad_token_id=0, attn="sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = sequence_logps(model, build_varlen_batch(PROMPTS, PAIRS))
        plain = sequence_logps(model, build_shared_prompt_batch(PROMPTS, PAIRS, 0))
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, plain, rtol=2e-2, atol=0.1)


class _Train:
    packed, share_prompt, share_prefix, share_completion_prefix = False, "auto", True, True


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("share", ["auto", "true", "false"])
def test_who_gets_the_varlen_layout(attn, share, monkeypatch):
    monkeypatch.setattr(plan, "LONG_PAIR", 20)  # these pairs count as long (21-32 tokens)
    cfg = _Train()
    cfg.share_prompt = share
    model = _model(attn=attn)
    lay = layout_settings(cfg, model.config)
    assert lay.varlen == (attn == "sdpa" and share != "false")
    examples = [
        {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, (c, r) in zip(PROMPTS, PAIRS)
    ]
    b = pair_batch(examples, list(range(len(PAIRS))), 0, **_kwargs(lay))
    assert (b.tokens.paths is not None) == lay.varlen
    torch.testing.assert_close(sequence_logps(model, b.tokens), _want(model), rtol=0, atol=1e-7)


def test_short_pairs_keep_the_padded_layout():
    """Below LONG_PAIR tokens a pair batch keeps one padded row per prompt group."""
    examples = [
        {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, (c, r) in zip(PROMPTS, PAIRS)
    ]
    assert max(len(p) + len(c) + len(r) for p, (c, r) in zip(PROMPTS, PAIRS)) < plan.LONG_PAIR
    b = pair_batch(examples, list(range(len(PAIRS))), 0, False, True, varlen=True)
    assert b.tokens.paths is None and b.tokens.input_ids.shape[0] == len(PAIRS)


def _kwargs(lay: LayoutSettings) -> dict:
    return {
        "packed": lay.packed,
        "share_prompt": lay.share_prompt,
        "hidden_size": lay.hidden_size,
        "share_prefix": lay.share_prefix,
        "share_completion_prefix": lay.share_completion_prefix,
        "varlen": lay.varlen,
    }


def test_hybrid_models_refuse_the_varlen_layout():
    """A convolution layer reads the whole row: refused like the packed and shared layouts,
    and never chosen for such a model."""
    model = _tiny_hybrid_lm()
    with pytest.raises(ValueError, match="share_prompt=false"):
        sequence_logps(model, build_varlen_batch(PROMPTS, PAIRS))
    cfg = _Train()
    cfg.share_prompt = "true"
    assert not layout_settings(cfg, model.config).varlen
    assert not layout_settings(_Train(), _model(attn="sdpa").config, checkpointing=True).varlen


def test_trainer_step_same_with_the_varlen_layout(tiny_dir, tmp_path, monkeypatch):
    """A DPO step through the trainer (reference precompute, loss, clipping) is the same with
    the varlen row as with the padded rows (fp64)."""
    from run_helpers import tiny_run_config

    from preftune.train.trainer import Trainer

    results = {}
    for long in (1, 10**9):  # every pair long (varlen) / none (padded rows)
        monkeypatch.setattr(plan, "LONG_PAIR", long)
        monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / f"cache{long}"))  # no reuse
        t = Trainer(
            tiny_run_config(tiny_dir, tmp_path, f"v{long}", reference="precompute", dtype="float64")
        )
        tokens = t._pair_batch(t.data.train, [0, 1, 2, 3]).tokens
        assert (tokens.paths is not None) == (long == 1)
        m = t.train_step([0, 1, 2, 3])
        results[long] = (m["loss"], m["grad_norm"], t.reference.chosen.clone())
    (a, b) = results.values()
    assert a[0] == pytest.approx(b[0], rel=1e-12) and a[1] == pytest.approx(b[1], rel=1e-7)
    torch.testing.assert_close(a[2], b[2], rtol=0, atol=1e-10)
