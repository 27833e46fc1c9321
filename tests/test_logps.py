"""The log-prob engine against the plain full-logits computation: values and gradients,
padded and packed, odd shapes, fp32 and bf16, and TDPO's chunked sequential KL."""

import pytest
import torch

from preftune import logps
from preftune.layouts import branch_point, build_shared_prompt_batch, build_token_batch
from preftune.logprob import arch, embedding
from preftune.logprob import head as lm_head
from preftune.logprob import prefix as prefix_attention
from preftune.logps import (
    hidden_at_targets,
    plain_sequence_logps,
    sequence_logps,
    sequence_logps_and_kl,
)
from preftune.models import tiny_causal_lm

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16], [3]]
COMPS = [[20, 21, 2], [22, 2], [23, 24, 25, 26, 2], [40, 41, 42, 43, 44, 45, 46, 2]]


def padded(prompts, comps, pad=0):
    T = max(len(p) + len(c) for p, c in zip(prompts, comps))
    ids = torch.full((len(prompts), T), pad)
    am = torch.zeros(len(prompts), T, dtype=torch.long)
    cm = torch.zeros(len(prompts), T)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        s = p + c
        ids[i, : len(s)] = torch.tensor(s)
        am[i, : len(s)] = 1
        cm[i, len(p) : len(s)] = 1
    return ids, am, cm


def per_example(model, prompts, comps):
    out = []
    for p, c in zip(prompts, comps):
        ids, am, cm = padded([p], [c])
        out.append(plain_sequence_logps(model, ids, am, cm)[0])
    return torch.stack(out)


@pytest.fixture
def model64():
    return tiny_causal_lm(64, seed=1, eos_token_id=2, pad_token_id=0).double()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_batched_masked_equals_per_example(model64, packed, chunk):
    batch = build_token_batch(PROMPTS, COMPS, pad_id=0, packed=packed)
    got = sequence_logps(model64, batch, chunk_size=chunk)
    want = per_example(model64, PROMPTS, COMPS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert batch.lengths.tolist() == [len(c) for c in COMPS]


def test_prompt_tokens_are_not_scored(model64):
    batch = build_token_batch(PROMPTS, COMPS, pad_id=0)
    assert batch.target_ids.tolist() == sum(COMPS, [])


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_last_token_is_a_target_and_not_laid_out(shared, packed):
    """Every laid-out token is a scored position or feeds one: the final token of each
    sequence (each branch) is only a target, so the rows hold one token fewer per completion."""
    if shared:
        batch = build_shared_prompt_batch(
            SHARED_PROMPTS, [[c, r] for c, r in zip(CHOSEN, REJECTED)], pad_id=0, packed=packed
        )
        real = sum(len(p) for p in SHARED_PROMPTS) + sum(len(c) - 1 for c in CHOSEN + REJECTED)
    else:
        batch = build_token_batch(PROMPTS, COMPS, pad_id=0, packed=packed)
        real = sum(len(p) + len(c) - 1 for p, c in zip(PROMPTS, COMPS))
    laid = batch.input_ids.ne(0).sum().item()  # no real token is 0 here
    assert laid == real
    if packed:
        assert batch.input_ids.numel() == real
    # the last scored position of each sequence is the last laid-out token of it
    last_src = torch.zeros(batch.num_seqs, dtype=torch.long).scatter_reduce(
        0, batch.seq_index, batch.target_pos, "amax"
    )
    assert batch.input_ids.view(-1)[last_src].ne(0).all()


def test_sequence_with_nothing_to_score_is_laid_out_whole():
    batch = build_token_batch([[5, 6], [7, 8, 9]], [[], [3, 2]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 0, 0], [7, 8, 9, 3]]
    assert batch.lengths.tolist() == [0, 2]


def test_gradients_match_plain(model64):
    batch = build_token_batch(PROMPTS, COMPS, pad_id=0, packed=True)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    (sequence_logps(model64, batch, chunk_size=4) * w).sum().backward()
    fast = [p.grad.clone() for p in model64.parameters()]
    model64.zero_grad()
    ids, am, cm = padded(PROMPTS, COMPS)
    (plain_sequence_logps(model64, ids, am, cm) * w).sum().backward()
    for a, p in zip(fast, model64.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-7, atol=1e-9)


def test_bf16_autocast_close_to_fp32():
    model = tiny_causal_lm(64, seed=2, eos_token_id=2, pad_token_id=0)
    batch = build_token_batch(PROMPTS, COMPS, pad_id=0, packed=True)
    ref = sequence_logps(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sequence_logps(model, batch)
    assert low.dtype == torch.float32  # log-softmax stays fp32 under autocast
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=0.1)  # bf16 matmuls: ~3 significant digits


def test_seq_kl_matches_full_distributions():
    pol = tiny_causal_lm(64, seed=3, eos_token_id=2, pad_token_id=0).double()
    ref = tiny_causal_lm(64, seed=4, eos_token_id=2, pad_token_id=0).double()
    batch = build_token_batch(PROMPTS, COMPS, pad_id=0, packed=True)
    with torch.no_grad():
        ref_h = hidden_at_targets(ref, batch)
    lp, kl = sequence_logps_and_kl(pol, ref, batch, ref_h, chunk_size=5)
    ids, am, cm = padded(PROMPTS, COMPS)
    lpp = torch.log_softmax(pol(input_ids=ids, attention_mask=am).logits[:, :-1], -1)
    lpr = torch.log_softmax(ref(input_ids=ids, attention_mask=am).logits[:, :-1], -1)
    want = ((lpr.exp() * (lpr - lpp)).sum(-1) * cm[:, 1:]).sum(
        -1
    )  # KL(ref || policy), summed over completion
    torch.testing.assert_close(kl, want, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(lp, per_example(pol, PROMPTS, COMPS), rtol=0, atol=1e-10)
    kl.sum().backward()  # gradients flow to the policy only
    assert all(p.grad is None for p in ref.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pol.parameters())


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="prompt token"):
        build_token_batch([[]], [[1, 2]], pad_id=0)


SHARED_PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16], [3]]
CHOSEN = [[20, 21, 2], [22, 2], [23, 24, 25, 26, 2], [40, 41, 42, 43, 44, 45, 46, 2]]
REJECTED = [[30, 2], [31, 32, 33, 34, 35, 2], [36, 2], [37, 38, 39, 2]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packed", [False, True])
def test_shared_prompt_equals_separate_sequences(attn, packed):
    """One prompt copy with two branches gives each completion exactly its own log-prob."""
    model = tiny_causal_lm(64, seed=5, eos_token_id=2, pad_token_id=0, attn=attn).double()
    shared = build_shared_prompt_batch(
        SHARED_PROMPTS, [[c, r] for c, r in zip(CHOSEN, REJECTED)], pad_id=0, packed=packed
    )
    got = sequence_logps(model, shared, chunk_size=3)
    want = per_example(model, SHARED_PROMPTS * 2, CHOSEN + REJECTED)
    # eager attention takes its softmax in float32 even in a float64 model: rows of different
    # lengths round differently there, hence the looser bound for it
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10 if attn == "sdpa" else 1e-7)
    assert shared.lengths.tolist() == [len(c) for c in CHOSEN + REJECTED]
    # the prompt is laid out once: fewer slots than prompt + completion twice
    assert (
        shared.input_ids.numel()
        < build_token_batch(
            SHARED_PROMPTS * 2, CHOSEN + REJECTED, pad_id=0, packed=packed
        ).input_ids.numel()
    )


def test_shared_prompt_gradients_and_kl_match_separate():
    pol = tiny_causal_lm(64, seed=6, eos_token_id=2, pad_token_id=0).double()
    ref = tiny_causal_lm(64, seed=7, eos_token_id=2, pad_token_id=0).double()
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25, 2.0, -0.5], dtype=torch.float64)
    grads, kls = [], []
    for batch in (
        build_shared_prompt_batch(
            SHARED_PROMPTS, [[c, r] for c, r in zip(CHOSEN, REJECTED)], pad_id=0, packed=True
        ),
        build_token_batch(SHARED_PROMPTS * 2, CHOSEN + REJECTED, pad_id=0, packed=False),
    ):
        pol.zero_grad()
        with torch.no_grad():
            ref_h = hidden_at_targets(ref, batch)
        lp, kl = sequence_logps_and_kl(pol, ref, batch, ref_h, chunk_size=4)
        ((lp + kl) * w).sum().backward()
        grads.append([p.grad.clone() for p in pol.parameters()])
        kls.append(kl.detach())
    torch.testing.assert_close(kls[0], kls[1], rtol=1e-9, atol=1e-10)
    # Forward values are bit-identical; gradients differ at float32 precision only because
    # Llama's RMSNorm computes in float32 even in a float64 model, and the shared prompt's
    # norm backward sums the two branches' gradients before that rounding, not after.
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


# completions sharing leading tokens: an edit pair, one a prefix of the other, identical ones,
# one-token ones, and none shared
EDIT_PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [3], [14, 15], [16, 17]]
EDIT_CHOSEN = [[20, 21, 22, 23, 2], [24, 25, 2], [26, 27, 2], [28, 2], [29], [30, 31, 2]]
EDIT_REJECTED = [[20, 21, 40, 23, 2], [24, 25, 2, 41, 2], [26, 27, 2], [42, 2], [29], [43, 2]]


def test_branch_point():
    assert branch_point([[20, 21, 22, 23, 2], [20, 21, 40, 23, 2]]) == 2
    assert branch_point([[24, 25, 2], [24, 25, 2, 41, 2]]) == 3  # the shorter one ends inside
    assert branch_point([[26, 27, 2], [26, 27, 2]]) == 2  # identical: the last predicts nothing
    assert branch_point([[29], [29]]) == 0
    assert branch_point([[30, 31, 2], [43, 2]]) == 0


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("fused_head", [True, False])
@pytest.mark.parametrize("share_prefix", [False, True])
def test_shared_completion_prefix_equals_separate_sequences(
    packed, fused_head, share_prefix, monkeypatch
):
    """Completions' common leading tokens laid out and scored once give every completion its
    own log-prob and the same gradients as separate sequences."""
    if not fused_head:
        monkeypatch.setattr(lm_head, "fused_head", lambda *a: False)
    model = tiny_causal_lm(64, seed=8, eos_token_id=2, pad_token_id=0).double()
    prompts = [[50, 51, 52, 53, 54, 55, 56, 57, 58] + p for p in EDIT_PROMPTS]  # a 9-token head
    branches = [[c, r] for c, r in zip(EDIT_CHOSEN, EDIT_REJECTED)]
    w = torch.linspace(-2, 3, 2 * len(prompts), dtype=torch.float64)
    got, grads = [], []
    for share in (True, False):
        batch = build_shared_prompt_batch(
            prompts,
            branches,
            pad_id=0,
            packed=packed,
            share_prefix=share_prefix,
            share_completion_prefix=share,
        )
        if share:  # the edit pair's "20 21" is laid out once and scored once
            assert lm_head.distinct_targets(batch.target_pos, batch.target_ids) is not None
            trunk_tokens = batch.input_ids.ne(0).sum()
        else:
            assert trunk_tokens < batch.input_ids.ne(0).sum()
        model.zero_grad()
        lp = sequence_logps(model, batch, chunk_size=3)
        (lp * w).sum().backward()
        got.append(lp.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    want = per_example(model, prompts * 2, EDIT_CHOSEN + EDIT_REJECTED)
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1], want, rtol=0, atol=1e-10)
    for a, b in zip(*grads):  # float32 RMSNorm inside, as in the test above
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def test_shared_completion_prefix_tdpo_kl_matches_separate():
    pol = tiny_causal_lm(64, seed=9, eos_token_id=2, pad_token_id=0).double()
    ref = tiny_causal_lm(64, seed=10, eos_token_id=2, pad_token_id=0).double()
    branches = [[c, r] for c, r in zip(EDIT_CHOSEN, EDIT_REJECTED)]
    out = []
    for batch in (
        build_shared_prompt_batch(EDIT_PROMPTS, branches, pad_id=0),
        build_token_batch(EDIT_PROMPTS * 2, EDIT_CHOSEN + EDIT_REJECTED, pad_id=0),
    ):
        with torch.no_grad():
            out.append(sequence_logps_and_kl(pol, ref, batch, hidden_at_targets(ref, batch)))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_shared_group_length_is_what_the_layout_lays_out():
    from preftune.layouts import shared_group_length

    for p, c, r in zip(EDIT_PROMPTS, EDIT_CHOSEN, EDIT_REJECTED):
        for share in (True, False):
            b = build_shared_prompt_batch([p], [[c, r]], pad_id=0, share_completion_prefix=share)
            assert b.input_ids.shape[1] == shared_group_length(p, [c, r], share)


def test_distinct_targets():
    pos, ids = torch.tensor([4, 7, 4, 9, 4]), torch.tensor([1, 2, 1, 2, 3])
    first, inverse = lm_head.distinct_targets(pos, ids)
    assert torch.equal(pos[first][inverse], pos) and torch.equal(ids[first][inverse], ids)
    assert len(first) == 4
    assert lm_head.distinct_targets(torch.tensor([1, 2]), torch.tensor([5, 5])) is None


def test_shared_prompt_bad_shapes():
    with pytest.raises(ValueError, match="same number"):
        build_shared_prompt_batch([[1], [2]], [[[3]], [[4], [5]]], pad_id=0)
    with pytest.raises(ValueError, match="prompt token"):
        build_shared_prompt_batch([[]], [[[3], [4]]], pad_id=0)


def test_default_chunk_holds_a_fixed_logit_budget():
    from preftune.logprob.head import LOGIT_BUDGET, MIN_CHUNK, chunk_tokens

    for vocab, want in ((32768, 1024), (49152, 682), (262144, 128), (1 << 24, 2)):
        head = torch.nn.Linear(8, vocab, bias=False, device="meta")
        assert chunk_tokens(head, None) == max(MIN_CHUNK, want)
        assert chunk_tokens(head, None) * vocab <= max(LOGIT_BUDGET, MIN_CHUNK * vocab)
        assert chunk_tokens(head, 7) == 7  # an explicit size wins


# A chat-like batch: every prompt starts with the same 10-token head (a system prompt).
HEAD = list(range(50, 60))
LONG_HEAD = list(range(44, 64))  # longer than the padded rows: folded, the rows padded to it
HUGE_HEAD = list(range(3, 63)) + list(range(3, 43))  # 100 > R·T: its own forward, a KV cache
PREFIXED = [HEAD + p for p in SHARED_PROMPTS]


def _prefixed_batches(packed, head=HEAD):
    """(shared-prefix batch, the same sequences built without a prefix) for each layout."""
    PREFIXED = [head + p for p in SHARED_PROMPTS]
    pairs = [[c, r] for c, r in zip(CHOSEN, REJECTED)]
    out = [
        (
            build_shared_prompt_batch(PREFIXED, pairs, 0, packed=packed, share_prefix=True),
            build_shared_prompt_batch(PREFIXED, pairs, 0, packed=packed),
        )
    ]
    if not packed:
        out.append(
            (
                build_token_batch(PREFIXED * 2, CHOSEN + REJECTED, 0, share_prefix=True),
                build_token_batch(PREFIXED * 2, CHOSEN + REJECTED, 0),
            )
        )
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("head", [HEAD, LONG_HEAD, HUGE_HEAD])
def test_shared_prefix_equals_full_sequences(attn, packed, head):
    """The prefix run once (folded into the batch as row 0 under SDPA, or as a KV cache repeated
    over the rows) gives every completion the log-prob of its full prompt + completion."""
    model = tiny_causal_lm(64, seed=8, eos_token_id=2, pad_token_id=0, attn=attn).double()
    want = per_example(model, [head + p for p in SHARED_PROMPTS] * 2, CHOSEN + REJECTED)
    for cached, full in _prefixed_batches(packed, head):
        assert cached.prefix_ids.tolist() == head
        assert cached.input_ids.shape[1] < full.input_ids.shape[1]  # the head left the rows
        tol = 1e-10 if attn == "sdpa" else 1e-7  # eager: fp32 softmax, as above
        torch.testing.assert_close(sequence_logps(model, cached, 3), want, rtol=0, atol=tol)
        torch.testing.assert_close(
            sequence_logps(model, cached.without_prefix(), 3), want, rtol=0, atol=tol
        )


def test_shared_prefix_gradients_and_kl_match_full_sequences():
    pol = tiny_causal_lm(64, seed=9, eos_token_id=2, pad_token_id=0).double()
    ref = tiny_causal_lm(64, seed=10, eos_token_id=2, pad_token_id=0).double()
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25, 2.0, -0.5], dtype=torch.float64)

    def run(batch):
        pol.zero_grad()
        with torch.no_grad():
            ref_h = hidden_at_targets(ref, batch)
        lp, kl = sequence_logps_and_kl(pol, ref, batch, ref_h, chunk_size=4)
        ((lp + kl) * w).sum().backward()
        return lp.detach(), kl.detach(), [p.grad.clone() for p in pol.parameters()]

    for cached, full in (
        _prefixed_batches(False)
        + _prefixed_batches(False, LONG_HEAD)
        + _prefixed_batches(False, HUGE_HEAD)
    ):
        (lp_a, kl_a, g_a), (lp_b, kl_b, g_b) = run(cached), run(full)
        torch.testing.assert_close(lp_a, lp_b, rtol=0, atol=1e-10)
        torch.testing.assert_close(kl_a, kl_b, rtol=1e-9, atol=1e-10)
        # the prefix's gradient is the sum over rows through the cache repeat; RMSNorm's fp32
        # internals round that sum differently from per-row copies (as for the shared prompt)
        for a, b in zip(g_a, g_b):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
        assert all(g.abs().sum() > 0 for g in g_a)  # every weight, embeddings included, is reached


@pytest.mark.parametrize(
    ("attn", "head", "packed", "folded"),
    [
        ("sdpa", HEAD, False, True),
        ("sdpa", LONG_HEAD, False, True),  # 20 > 13 and 11 row tokens: rows padded to 20
        ("sdpa", HUGE_HEAD, False, False),  # 100 > 4 x 13 and 8 x 11: the KV-cache path
        ("sdpa", LONG_HEAD, True, False),  # one packed row: folding would double it
        ("eager", HEAD, False, False),
    ],
)
def test_shared_prefix_folded_only_under_sdpa_and_no_longer_than_the_rows(
    attn, head, packed, folded, monkeypatch
):
    calls = []

    def spy(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return folded_attention(module, *args, **kwargs)

    folded_attention = prefix_attention.folded_prefix_attention
    monkeypatch.setattr(prefix_attention, "folded_prefix_attention", spy)
    model = tiny_causal_lm(64, seed=8, eos_token_id=2, pad_token_id=0, attn=attn)
    for cached, _ in _prefixed_batches(packed, head):
        calls.clear()
        sequence_logps(model, cached).sum().backward()
        assert calls == ([0, 1] if folded else [])  # once per layer
        assert model.config._attn_implementation == attn  # restored after the forward


def test_short_prefix_before_long_rows_is_not_folded(monkeypatch):
    """Row 0 is padded to the rows' width: with T > R·L0 folding runs more token slots than
    laying the prefix out in every row, so the KV-cache path runs it; same log-probs."""
    calls = []
    fold = logps.hidden_folded
    monkeypatch.setattr(logps, "hidden_folded", lambda *a: calls.append(1) or fold(*a))
    model = tiny_causal_lm(64, seed=8, eos_token_id=2, pad_token_id=0, attn="sdpa").double()
    prompts, comps = [HEAD + [5], HEAD + [6, 7]], [list(range(20, 45)) + [2], [30, 31, 2]]
    want = per_example(model, prompts, comps)
    long_rows = build_token_batch(prompts, comps, 0, share_prefix=True)  # R=2, T=27 > 2·10
    short = [list(range(20, 29)) + [2], [30, 2]]
    short_rows = build_token_batch(prompts, short, 0, share_prefix=True)  # T=11: 10 <= 11 <= 20
    for batch, folded in [(long_rows, False), (short_rows, True)]:
        calls.clear()
        got = sequence_logps(model, batch)
        assert calls == ([1] if folded else [])
        if not folded:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # rows without padding: laid out (no mask, SDPA's causal kernel) instead of the KV cache
    even = [list(range(20, 45)) + [2], list(range(30, 55)) + [2]]
    unpadded = build_token_batch([HEAD + [5], HEAD + [6]], even, 0, share_prefix=True)
    assert bool(unpadded.attention_mask.all()) and unpadded.prefix_ids is not None
    laid = []
    without = logps.TokenBatch.without_prefix
    monkeypatch.setattr(logps.TokenBatch, "without_prefix", lambda b: laid.append(1) or without(b))
    got = sequence_logps(model, unpadded)
    assert laid == [1] and calls == [1]  # calls: from the short rows above, nothing new
    want = per_example(model, [HEAD + [5], HEAD + [6]], even)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    laid.clear()
    sequence_logps(model, long_rows)
    assert laid == []  # padded rows keep the cache


def test_shared_prefix_under_gradient_checkpointing_is_laid_out_in_the_rows():
    """transformers drops a KV cache inside checkpointed layers; the engine then lays the prefix
    out in every row instead of silently losing it."""
    model = tiny_causal_lm(64, seed=11, eos_token_id=2, pad_token_id=0).double()
    cached, full = _prefixed_batches(packed=False)[0]
    want = sequence_logps(model, full)
    model.gradient_checkpointing_enable()
    model.train()
    got = sequence_logps(model, cached)
    got.sum().backward()
    torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=1e-10)


def test_shared_prefix_length_rules():
    from preftune.layouts import MIN_SHARED_PREFIX, shared_prefix_length

    long = list(range(100, 100 + MIN_SHARED_PREFIX + 4))
    assert shared_prefix_length([long + [1], long + [2]]) == len(long)
    assert shared_prefix_length([long, long]) == len(long) - 1  # each keeps a token of its own
    assert shared_prefix_length([long + [1]]) == 0  # one row: nothing to share
    short = long[: MIN_SHARED_PREFIX - 1]
    assert shared_prefix_length([short + [1], short + [2]]) == 0  # too short to pay
    # no common head: the builders fall back to the plain layout
    b = build_token_batch([[1, 2], [3, 4]], [[5], [6]], 0, share_prefix=True)
    assert b.prefix_ids is None
    # the packed separate layout has no mask a cache could extend: never shared
    assert build_token_batch(PREFIXED, CHOSEN, 0, packed=True, share_prefix=True).prefix_ids is None


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_gradient_added_in_place_equals_autograds(tied, monkeypatch):
    """The engine's embedding lookup adds its rows into weight.grad in place (no dense
    (vocab, hidden) gradient per forward): the same gradients as autograd's nn.Embedding on the
    same layout, over two backward passes (accumulation), with the padding row (id 0 here, also
    inside a prompt) never updated, tied to the LM head or not, with and without a shared
    prefix; and the plain full-logits gradients without one."""
    model = tiny_causal_lm(64, seed=4, eos_token_id=2, pad_token_id=0).double()
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    emb = model.get_input_embeddings()
    assert (model.lm_head.weight is emb.weight) == tied
    assert "inputs_embeds" in embedding.decoder_inputs(model.model, torch.tensor([[1, 2]]))
    with torch.no_grad():
        assert "input_ids" in embedding.decoder_inputs(model.model, torch.tensor([[1, 2]]))
    head = [9, 10, 11, 12, 13, 14, 15, 16, 17]
    prompts = [head + [0, 5], head + [6], head + [7, 0, 8]]
    comps = [[20, 21, 2], [22, 2], [23, 0, 25, 2]]
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        for scale in (1.0, 0.5):  # two backward passes accumulate
            (loss_fn() * w * scale).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    def by_module(_decoder, ids, fast_grads=True):
        return {"input_ids": ids}

    fast = {}
    for prefix in (True, False):
        batch = build_token_batch(prompts, comps, pad_id=0, share_prefix=prefix)
        assert (batch.prefix_ids is not None) == prefix
        fast[prefix] = grads(lambda b=batch: sequence_logps(model, b))
        with monkeypatch.context() as m:
            m.setattr(logps, "decoder_inputs", by_module)  # the rows' forward
            m.setattr(prefix_attention, "decoder_inputs", by_module)  # the folded one
            want = grads(lambda b=batch: sequence_logps(model, b))
        for a, b in zip(fast[prefix], want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    ids, am, cm = padded(prompts, comps)
    plain = grads(lambda: plain_sequence_logps(model, ids, am, cm))
    for a, b in zip(fast[False], plain):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    if not tied:  # a tied padding row still gets the LM head's gradient
        assert emb.weight.grad[0].abs().max() == 0
    assert emb.weight.grad[5].abs().max() > 0


def _tiny_windowed_lm(kind, window, attn):
    """A random-weight sliding-window model: Mistral (every layer slides) or Qwen2 with
    max_window_layers=1 (layer 0 full, layer 1 sliding: one mask per layer type)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        eos_token_id=2, pad_token_id=0, bos_token_id=None, tie_word_embeddings=True,
    )  # fmt: skip
    if kind == "mistral":
        cfg, cls = MistralConfig(sliding_window=window, **common), MistralForCausalLM
    else:
        cfg = Qwen2Config(
            use_sliding_window=True, sliding_window=window, max_window_layers=1, **common
        )
        cls = Qwen2ForCausalLM
    cfg._attn_implementation = attn
    torch.manual_seed(3)
    return cls(cfg).double().eval()


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [6, 64])
def test_sliding_window_models_match_their_own_masks(kind, attn, window):
    """Every layout (padded, packed, shared prompt, shared prefix) gives a sliding-window model
    the log-probs transformers computes for each sequence alone with its own windowed mask; a
    window of 6 is shorter than every sequence here (a 10-token head + prompt + completion)."""
    model = _tiny_windowed_lm(kind, window, attn)
    prompts = [HEAD + p for p in SHARED_PROMPTS]
    want = per_example(model, prompts * 2, CHOSEN + REJECTED)
    pairs = [[c, r] for c, r in zip(CHOSEN, REJECTED)]
    tol = 1e-10 if attn == "sdpa" else 1e-7  # eager: fp32 softmax, as above
    for packed in (False, True):
        for share_prefix in (False, True):
            shared = build_shared_prompt_batch(
                prompts, pairs, 0, packed=packed, share_prefix=share_prefix
            )
            torch.testing.assert_close(sequence_logps(model, shared), want, rtol=0, atol=tol)
        separate = build_token_batch(
            prompts * 2, CHOSEN + REJECTED, 0, packed=packed, share_prefix=not packed
        )
        torch.testing.assert_close(sequence_logps(model, separate), want, rtol=0, atol=tol)
    if window == 6:  # the window changes the answer: the test above can tell
        model.config.sliding_window = 1000
        model.model.config.sliding_window = 1000
        full = per_example(model, prompts * 2, CHOSEN + REJECTED)
        assert (full - want).abs().max() > 1e-3


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_fused_head_equals_autograds_chunks(tied, chunk, monkeypatch):
    """The LM head's fast path (`_HeadLogpsIntoGrad`: logits recomputed in one reused buffer,
    the weight's gradient added into .grad in place) against autograd through the generic
    checkpointed chunks: values, every parameter's gradient over two accumulating backward
    passes, tied and untied heads, one and many chunks; a frozen head gets no gradient."""
    model = tiny_causal_lm(64, seed=11, eos_token_id=2, pad_token_id=0).double()
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    batch = build_token_batch(PROMPTS, COMPS, pad_id=0)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)

    def run():
        model.zero_grad(set_to_none=True)
        for scale in (1.0, 0.5):
            lp = sequence_logps(model, batch, chunk_size=chunk)
            (lp * w * scale).sum().backward(retain_graph=True)
        (lp * w).sum().backward()  # again through the same graph: the kept logits are gone
        return lp.detach(), [p.grad.clone() for p in model.parameters()]

    assert lm_head.fused_head(model.lm_head, None, None, torch.zeros(1, 64, dtype=torch.float64))
    lp_fast, g_fast = run()
    with monkeypatch.context() as m:
        m.setattr(lm_head, "fused_head", lambda *a: False)
        lp_want, g_want = run()
    torch.testing.assert_close(lp_fast, lp_want, rtol=0, atol=1e-12)
    for a, b in zip(g_fast, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lp_fast, per_example(model, PROMPTS, COMPS), rtol=0, atol=1e-10)
    if not tied:
        model.lm_head.weight.requires_grad_(False)
        model.zero_grad(set_to_none=True)
        sequence_logps(model, batch, chunk_size=chunk).sum().backward()
        assert model.lm_head.weight.grad is None
        assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_fold_with_grouped_query_attention_and_only_for_attention_backend_models(monkeypatch):
    """Folding joins row 0's keys before the rows' at the key/value-head count: grouped-query
    attention (4 query heads, 2 KV heads) gives the full-sequence log-probs. A decoder class that
    does not look its attention function up at call time (`_supports_attention_backend` False,
    e.g. Falcon) never folds."""
    from transformers import LlamaModel

    calls = []
    fold = logps.hidden_folded
    monkeypatch.setattr(logps, "hidden_folded", lambda *a: calls.append(1) or fold(*a))
    model = tiny_causal_lm(64, seed=12, eos_token_id=2, pad_token_id=0, attn="sdpa", kv_heads=2)
    model = model.double()
    want = per_example(model, PREFIXED * 2, CHOSEN + REJECTED)
    for backend in (True, False):
        monkeypatch.setattr(LlamaModel, "_supports_attention_backend", backend)
        for cached, _ in _prefixed_batches(False):
            calls.clear()
            got = sequence_logps(model, cached)
            assert calls == ([1] if backend else [])
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def _tiny_hybrid_lm():
    """LFM2: a convolution layer before an attention layer; the convolution reads whole rows."""
    from transformers import Lfm2Config, Lfm2ForCausalLM

    cfg = Lfm2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention"],
        pad_token_id=0, eos_token_id=2, bos_token_id=None, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(13)
    return Lfm2ForCausalLM(cfg).double().eval()


def test_hybrid_models_get_padded_rows_with_the_prefix_laid_out():
    """A model with convolution / recurrent layers: the shared prefix is laid out in its rows
    (same log-probs as each sequence alone); the packed and shared-prompt layouts, where a
    convolution would read across sequences, are refused with what to set instead."""
    model = _tiny_hybrid_lm()
    assert arch.token_mixers(model.config) == {"conv", "full_attention"}
    assert not arch.attention_only(model.config)
    assert arch.attention_only(tiny_causal_lm(64).config)
    want = per_example(model, PREFIXED * 2, CHOSEN + REJECTED)
    prefixed = build_token_batch(PREFIXED * 2, CHOSEN + REJECTED, 0, share_prefix=True)
    assert prefixed.prefix_ids is not None
    torch.testing.assert_close(sequence_logps(model, prefixed), want, rtol=0, atol=1e-10)
    pairs = [[c, r] for c, r in zip(CHOSEN, REJECTED)]
    for batch in (
        build_shared_prompt_batch(PREFIXED, pairs, 0),
        build_token_batch(PREFIXED * 2, CHOSEN + REJECTED, 0, packed=True),
    ):
        with pytest.raises(ValueError, match="share_prompt=false"):
            sequence_logps(model, batch)
