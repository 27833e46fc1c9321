"""Every fast path of the log-prob engine against the plain computation, in each dtype a run
uses: fp32, bf16 autocast over fp32 weights, and bf16 weights.

Fast paths (preftune/logps.py, preftune/layouts.py): padded and packed rows, the shared prompt
(one prompt copy, two branches), the shared completion prefix (an edit pair's common tokens
scored once), the shared prefix run once (folded into the batch under SDPA, or a KV cache
repeated over the rows), the chunked LM head with its hand-written backward
(`_HeadLogpsIntoGrad`, fp32 only) and the generic checkpointed chunks, and the input
embedding's gradient written into `.grad` (`_EmbeddingIntoGrad`). Plain: one padded forward
with full logits, fp32 log_softmax and a gather (`plain_sequence_logps`), on the same weights
under the same dtype. Both are compared in sequence log-probs and in every weight's gradient
of a weighted sum of them, tied and untied LM heads. The exact (fp64) comparisons are in
test_logps.py, whose batches and helpers these tests reuse.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
from test_logps import (
    CHOSEN,
    COMPS,
    EDIT_CHOSEN,
    EDIT_PROMPTS,
    EDIT_REJECTED,
    HEAD,
    HUGE_HEAD,
    PROMPTS,
    REJECTED,
    SHARED_PROMPTS,
    padded,
    per_example,
)

from preftune.layouts import build_shared_prompt_batch, build_token_batch
from preftune.logprob import embedding, head
from preftune.logprob import head as head_module
from preftune.logps import plain_sequence_logps, sequence_logps
from preftune.models import tiny_causal_lm


@dataclass(frozen=True)
class Dtype:
    weights: torch.dtype
    autocast: bool  # bf16 autocast on the CPU
    logp_atol: float  # on sequence log-probs of -5 .. -85 nats (8 to 10 tokens each)
    grad_rtol: float  # on each weight's gradient, as a fraction of its largest entry
    why: str


# Measured when this was written (largest over all paths, tied and untied): fp32 7.6e-6 nats
# and 8e-7 of a gradient's max; bf16 autocast 5.9e-2 nats and 1.1e-2; bf16 weights 1.4e-3
# nats and 1.4e-2. Each bound leaves >= 3.5x room, and each bf16 log-prob bound is under half of
# what scoring wrong tokens changes (test_tolerances_separate_wrong_tokens: >= 0.97 nats here).
DTYPES = {
    "fp32": Dtype(
        torch.float32,
        False,
        logp_atol=1e-4,
        grad_rtol=1e-5,
        why="sums in another order: a few fp32 ulps of |logp| <= 85 (ulp 7.6e-6) per sequence; "
        "gradients summed over rows / branches / the shared prefix in another order",
    ),
    "bf16_autocast": Dtype(
        torch.float32,
        True,
        logp_atol=0.25,
        grad_rtol=5e-2,
        why="bf16 matmuls (8-bit mantissa, eps 3.9e-3) on rows of other shapes (a packed row, "
        "a cached prefix): logits of |z| ~ 10 differ by ~0.04, sums of 10 tokens by < 0.1; "
        "log-softmax in fp32 in both",
    ),
    "bf16_weights": Dtype(
        torch.bfloat16,
        False,
        logp_atol=0.25,
        grad_rtol=5e-2,
        why="as for autocast, and bf16 gradients (each entry rounded to 3 significant digits, "
        "sums of bf16 partial products over rows)",
    ),
}


def _pairs(chosen, rejected):
    return [[c, r] for c, r in zip(chosen, rejected)]


def _prefixed(head):
    return [head + p for p in SHARED_PROMPTS] * 2


# name -> (fast batch, the same sequences as plain prompts and completions)
PATHS = {
    "padded": lambda: (build_token_batch(PROMPTS, COMPS, 0), PROMPTS, COMPS),
    "packed": lambda: (build_token_batch(PROMPTS, COMPS, 0, packed=True), PROMPTS, COMPS),
    "shared_prompt": lambda: (
        build_shared_prompt_batch(SHARED_PROMPTS, _pairs(CHOSEN, REJECTED), 0),
        SHARED_PROMPTS * 2,
        CHOSEN + REJECTED,
    ),
    "shared_prompt_packed": lambda: (
        build_shared_prompt_batch(SHARED_PROMPTS, _pairs(CHOSEN, REJECTED), 0, packed=True),
        SHARED_PROMPTS * 2,
        CHOSEN + REJECTED,
    ),
    "shared_completion_prefix": lambda: (
        build_shared_prompt_batch(EDIT_PROMPTS, _pairs(EDIT_CHOSEN, EDIT_REJECTED), 0),
        EDIT_PROMPTS * 2,
        EDIT_CHOSEN + EDIT_REJECTED,
    ),
    "shared_prefix_folded": lambda: (
        build_token_batch(_prefixed(HEAD), CHOSEN + REJECTED, 0, share_prefix=True),
        _prefixed(HEAD),
        CHOSEN + REJECTED,
    ),
    "shared_prefix_kv_cache": lambda: (
        build_token_batch(_prefixed(HUGE_HEAD), CHOSEN + REJECTED, 0, share_prefix=True),
        _prefixed(HUGE_HEAD),
        CHOSEN + REJECTED,
    ),
}


def _model(dtype: Dtype, tied: bool):
    """A tiny SDPA Llama whose token embeddings (and untied head) are scaled up 8x: token
    log-probs then spread over several nats instead of ln 64 +- 0.1, so a wrong token, position
    or branch moves a sequence's log-prob by far more than any tolerance above."""
    model = tiny_causal_lm(64, seed=11, eos_token_id=2, pad_token_id=0, attn="sdpa", tied=tied)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8)
        if not tied:
            model.get_output_embeddings().weight.mul_(8)
    return model.to(dtype.weights)


def _logps_and_grads(model, dtype: Dtype, compute):
    model.zero_grad(set_to_none=True)
    amp = (
        torch.autocast("cpu", dtype=torch.bfloat16) if dtype.autocast else contextlib.nullcontext()
    )
    with amp:
        lp = compute()
    weights = torch.linspace(-2.0, 3.0, lp.numel())  # signs mixed: no cancellation hides a bug
    (lp * weights).sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _spy(monkeypatch, fn_class) -> list:
    calls, real = [], fn_class.apply
    monkeypatch.setattr(fn_class, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


MATRIX = [
    (path, dt, fused)
    for path in PATHS
    for dt in DTYPES
    for fused in (True, False)
    if fused
    or (dt == "fp32" and path in ("padded", "packed", "shared_completion_prefix"))
    or (dt == "bf16_autocast" and path == "padded")  # the generic head under autocast (DDP's)
]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize(("path", "dtype_name", "fused_allowed"), MATRIX)
def test_fast_path_matches_plain(path, dtype_name, fused_allowed, tied, monkeypatch):
    """`fused_allowed=False` forces the generic checkpointed head where fp32 would take the
    hand-written one (fp32 weights, with or without bf16 autocast), so both are compared (bf16
    weights never take the hand-written one)."""
    dtype = DTYPES[dtype_name]
    if not fused_allowed:
        monkeypatch.setattr(head, "fused_head", lambda *a: False)
    head_calls = _spy(monkeypatch, head.HeadLogpsIntoGrad)
    embed_calls = _spy(monkeypatch, embedding.EmbeddingIntoGrad)
    model = _model(dtype, tied)
    batch, prompts, comps = PATHS[path]()
    fast, fast_grads = _logps_and_grads(model, dtype, lambda: sequence_logps(model, batch, 3))
    assert fast.dtype == torch.float32  # log-softmax in fp32, whatever the weights
    assert head_calls == ([1] if fused_allowed and dtype.weights == torch.float32 else [])
    assert embed_calls, "the embedding gradient was not written into .grad by the engine"
    ids, attention, completion = padded(prompts, comps)
    plain, plain_grads = _logps_and_grads(
        model, dtype, lambda: plain_sequence_logps(model, ids, attention, completion)
    )
    assert batch.lengths.tolist() == [len(c) for c in comps]
    torch.testing.assert_close(fast, plain, rtol=0, atol=dtype.logp_atol, msg=dtype.why)
    for name, want in plain_grads.items():
        got, scale = fast_grads[name].float(), want.float().abs().max().item()
        assert scale > 0, f"{name} got no gradient from the plain computation"
        torch.testing.assert_close(
            got, want.float(), rtol=0, atol=dtype.grad_rtol * scale, msg=f"{name}: {dtype.why}"
        )


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_tolerances_separate_wrong_tokens(dtype_name):
    """Each log-prob tolerance is < 1/2 of what scoring the wrong tokens changes (every
    completion token replaced by another id, as a target row misaligned by a layout bug would
    be), so the comparisons above can fail."""
    dtype = DTYPES[dtype_name]
    model = _model(dtype, tied=True)
    wrong = [[(t % 60) + 3 for t in c] for c in COMPS]
    with torch.no_grad():
        right_lp, wrong_lp = per_example(model, PROMPTS, COMPS), per_example(model, PROMPTS, wrong)
    assert ((right_lp - wrong_lp).abs() > 2 * dtype.logp_atol).all(), (right_lp, wrong_lp)


def test_the_head_fast_path_equals_the_generic_one_under_bf16_autocast(monkeypatch):
    """Under CPU bf16 autocast both heads multiply bf16 operands into bf16 products and take the
    log-softmax in fp32: values to 1e-5, hidden and weight gradients to 1% of their largest
    entry (bf16 products summed in another order), and the weight's gradient stays fp32."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 300, bias=False)
    hidden0 = torch.randn(50, 32)
    targets = torch.randint(0, 300, (50,))
    g = torch.randn(50)

    def run(fused: bool):
        monkeypatch.setattr(head_module, "fused_head", lambda *a: fused)
        head.weight.grad = None
        hidden = hidden0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head_module.head_token_logps(head, None, None, hidden, targets, 16)
        (out * g).sum().backward()
        return out.detach(), hidden.grad, head.weight.grad

    calls = _spy(monkeypatch, head_module.HeadLogpsIntoGrad)
    fast = run(True)
    assert calls == [1] and fast[0].dtype == torch.float32 and fast[2].dtype == torch.float32
    generic = run(False)
    assert calls == [1]  # the generic path did not take it
    torch.testing.assert_close(fast[0], generic[0], rtol=0, atol=1e-5)
    for a, b in zip(fast[1:], generic[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0.01 * float(b.abs().max()))
