"""`compile=true` (preftune/compiling.py): decoder layers compiled by torch.compile give the plain
step's losses and gradients — fp32 to rounding, bf16 autocast within a stated tolerance — over
micro-batches of different lengths without compiling again, on the varlen row (W6's layout,
its attention left eager) and the padded rows with a folded prefix; the key is checked, and a
run that cannot compile says why in one line and trains uncompiled.

Compilation on CPU is the cost here: each test compiles its own graphs (forward and backward,
dynamic shapes, shared by both layers): ~40-50 s each from a cold inductor cache on 2 busy cores,
~5-10 s once inductor's on-disk cache holds them. The bf16 and folded-prefix tests are marked
slow for that; the fp32 one is the check every run makes."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from online_helpers import word_tokenizer
from torch._dynamo.utils import counters

from preftune.compiling import blocker, compiled, decoder_blocks
from preftune.config import build_config
from preftune.errors import ConfigError
from preftune.generation import SamplingConfig, generate
from preftune.generation_mixture import generate_mixture
from preftune.layouts import build_shared_prompt_batch
from preftune.logprob.arch import split_causal_lm
from preftune.logprob.plan import plan_forward
from preftune.logps import sequence_logps
from preftune.models import tiny_causal_lm
from preftune.train.setup import prepare_model
from preftune.varlen_layout import build_varlen_batch

HEAD = list(range(50, 58))  # a chat head every prompt starts with: the shared prefix


def _pairs(seed: int, n: int, longest: int):
    """`n` chat-like pairs: the head, a prompt, two answers that share nothing (as W6's)."""
    rng = random.Random(seed)

    def words(k):
        return [rng.randrange(3, 64) for _ in range(k)]

    prompts = [HEAD + words(rng.randrange(2, 9)) for _ in range(n)]
    pairs = [[words(rng.randrange(4, longest)) + [2] for _ in range(2)] for _ in range(n)]
    return prompts, pairs


# W6's layout: micro-batches of different lengths, each one unpadded row (varlen, its
# attention left eager); and padded rows with the shared prefix folded in as row 0
P1, B1 = _pairs(0, 3, 30)
P2, B2 = _pairs(1, 4, 45)
P3, B3 = _pairs(2, 4, 8)
VARLEN = [build_varlen_batch(P1, B1), build_varlen_batch(P2, B2)]
FOLDED = [build_shared_prompt_batch(P3, B3, 0, packed=False, share_prefix=True)]


def _model(compile_layers: bool):
    """The tiny sdpa Llama (2 layers, grouped-query heads), through `prepare_model` as a run's
    policy is, with `compile` on or off."""
    model = tiny_causal_lm(64, seed=3, eos_token_id=2, pad_token_id=0, attn="sdpa", kv_heads=2)
    cfg = build_config({"compile": compile_layers, "quiet": True})
    return prepare_model(cfg, model, "CAUSAL_LM")


def _step(model, batches, autocast: bool = False):
    """A DPO step's losses (reference log-probs 0), gradients, one backward per micro-batch, and
    the number of graphs compiled so far after each micro-batch."""
    model.zero_grad(set_to_none=True)
    losses, graphs = [], []
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logps = sequence_logps(model, batch, chunk_size=7)
        n = batch.num_seqs // 2  # completion k of prompt i is sequence k * n + i
        loss = -F.logsigmoid(0.1 * (logps[:n] - logps[n:])).mean()
        loss.backward()
        losses.append(loss.detach())
        graphs.append(counters["stats"]["unique_graphs"])
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return torch.stack(losses), grads, graphs


@pytest.fixture(scope="module")
def models():
    torch._dynamo.reset()
    counters.clear()
    plain, fast = _model(False), _model(True)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def test_the_layouts_are_the_ones_meant(models):
    plain, fast = models
    for model in models:
        decoder = split_causal_lm(model)[0]
        assert [plan_forward(decoder, b).varlen for b in VARLEN] == [True, True]
        assert plan_forward(decoder, FOLDED[0]).prefix == "fold"
    assert VARLEN[0].input_ids.shape[1] != VARLEN[1].input_ids.shape[1]
    assert all(compiled(m) for m in decoder_blocks(fast))
    assert not any(compiled(m) for m in decoder_blocks(plain))


def _assert_close(got, want, rtol):
    """Losses within `rtol` relative; each gradient within `rtol` of its largest entry."""
    (got_loss, got_grads, _), (want_loss, want_grads, _) = got, want
    torch.testing.assert_close(got_loss, want_loss, rtol=rtol, atol=0)
    for name, g in want_grads.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(got_grads[name], g, rtol=rtol, atol=rtol * scale, msg=name)


def test_compiled_fp32_step_equals_plain_and_compiles_once(models):
    """fp32: fused kernels sum in another order, so the same up to rounding (measured 1.7e-7 on
    the losses, 4.8e-7 of the largest gradient entry); a second, longer row compiles nothing."""
    plain, fast = models
    before = counters["stats"]["unique_graphs"]
    want = _step(plain, VARLEN)
    assert want[2][-1] == before  # the plain model runs nothing compiled
    got = _step(fast, VARLEN)
    first, second = got[2]
    assert first > before  # the compiled layers ran
    assert second == first  # another length, the same graphs (dynamic shapes)
    _assert_close(got, want, rtol=1e-5)
    assert _step(fast, VARLEN)[2][-1] == first  # and a second step neither


def test_generation_runs_compiled_layers_eagerly(models):
    """A decode step hands each layer a KV cache, which a compiled layer guards on its index (a
    graph per layer): generation, plain and IPO-MD's mixture, compiles nothing and decodes the
    plain model's tokens."""
    plain, fast = models
    tok, prompts = word_tokenizer(), ["a b c", "one plus two equals"]
    greedy = SamplingConfig(do_sample=False, max_new_tokens=5)
    before = counters["stats"]["unique_graphs"]
    got = [c.token_ids for c in generate(fast, tok, prompts, greedy)]
    assert got == [c.token_ids for c in generate(plain, tok, prompts, greedy)]
    mixed = generate_mixture(fast, plain, tok, prompts, SamplingConfig(max_new_tokens=5), 0.5)
    assert len(mixed) == len(prompts)
    assert counters["stats"]["unique_graphs"] == before


@pytest.mark.slow
def test_compiled_bf16_autocast_step_close_to_plain(models):
    """bf16 autocast: inductor keeps a fused kernel's intermediates in fp32 where eager rounds
    each op's output to bf16, so the two differ by bf16 rounding, not bit for bit. Stated
    tolerance 2e-2 (losses relative, gradients of their largest entry); measured 3e-5 and 8e-3."""
    plain, fast = models
    _assert_close(_step(fast, VARLEN, autocast=True), _step(plain, VARLEN, autocast=True), 2e-2)


@pytest.mark.slow
def test_compiled_padded_rows_with_folded_prefix_equal_plain(models):
    """Padded rows with the prefix folded in (SDPA under a 4-D mask, traced inside the layers;
    W1's short pairs take it): graphs of their own, batch size above 1."""
    plain, fast = models
    _assert_close(_step(fast, FOLDED), _step(plain, FOLDED), rtol=1e-5)


@pytest.mark.parametrize(
    "value, message",
    [
        ("sometimes", "'compile' must be true or false, got 'sometimes'"),
        (3, "'compile' must be true or false, got 3"),
    ],
)
def test_compile_key_is_checked(value, message):
    assert build_config({}).train.compile is False
    assert build_config(None, ["compile=true"]).train.compile is True
    with pytest.raises(ConfigError) as e:
        build_config({"compile": value})
    assert str(e.value) == message


def test_compile_with_gradient_checkpointing_is_refused():
    for mode in (True, "selective"):
        with pytest.raises(ConfigError) as e:
            build_config({"compile": True, "gradient_checkpointing": mode})
        msg = str(e.value)
        assert "\n" not in msg and f"gradient_checkpointing={str(mode).lower()} " in msg
        assert msg.endswith("Set compile=false or gradient_checkpointing=false")


def test_a_run_that_cannot_compile_says_why_and_stays_plain(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU branch on any host
    model = tiny_causal_lm(64, seed=3, attn="sdpa")
    assert blocker(model) is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cfg = build_config({"compile": True, "quiet": True})
    model = prepare_model(cfg, model, "CAUSAL_LM")
    assert not any(compiled(m) for m in decoder_blocks(model))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "[preftune] warning: compile=true switched off: DeepSpeed launch: its engine wraps the "
        "layers' parameters; not checked here"
    ]
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert blocker(model).startswith("2 processes: compiled layers under DDP or FSDP2")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert blocker(model).startswith("no C++ compiler for inductor")
