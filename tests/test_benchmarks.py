"""The benchmark harness on a tiny model: the same work for both tools (per-step losses agree),
the FLOP model."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from common import model_flops, run_worker  # noqa: E402


def spec(tiny_dir, tool):
    return {
        "tool": tool,
        "model": str(tiny_dir),
        "data": "arithmetic_edit",
        "num_train": 8,
        "steps": 2,
        "batch_size": 4,
        "lr": 1e-3,
        "beta": 0.1,
        "max_length": 512,
        "max_prompt_length": 256,
        "bf16": False,
        "threads": 1,
        "seed": 0,
    }


def test_preftune_worker_reports_what_the_tables_need(tiny_dir):
    r = run_worker(spec(tiny_dir, "preftune"))
    assert r["ok"], r.get("log_tail")
    assert len(r["steps"]) == 2 and r["reference_mode"] == "precompute"
    assert r["counted_tokens"] > 0 and len(r["seq_lengths"]) == 2 * 2 * 4
    assert r["peak_rss"] >= r["rss_after_init"] > 0
    assert r["timed_s"] == pytest.approx(r["precompute_s"] + r["train_s"])


def test_both_tools_do_the_same_work(tiny_dir):
    # trl is in the `test` extra: without it this fails (the trl worker reports its ImportError)
    # rather than skipping, so the only check against TRL cannot vanish from a run unseen
    a = run_worker(spec(tiny_dir, "preftune"))
    b = run_worker(spec(tiny_dir, "trl"))
    assert a["ok"] and b["ok"], (a.get("log_tail"), b.get("log_tail"))
    assert a["counted_tokens"] == b["counted_tokens"]
    for x, y in zip(a["steps"], b["steps"]):  # step 2 checks the update too (lr 1e-3)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-3)
        assert x["logps_chosen"] == pytest.approx(y["logps_chosen"], rel=1e-4)


def test_model_flops_counts_dense_and_attention_terms():
    # 6P + 2P per counted token; attention (12 + 4) L d n^2 per sequence
    assert model_flops(10, 2, 4, counted_tokens=5, seq_lengths=[3]) == 8 * 10 * 5 + 16 * 2 * 4 * 9


def test_step_profiler_counts_matmul_flops_and_time():
    import torch
    from profile_step import OpTimer

    a, b, c = torch.randn(3, 5), torch.randn(5, 7), torch.randn(7)
    timer = OpTimer()
    with timer:
        (a @ b).sum()
        torch.addmm(c, a, b)
        torch.bmm(a[None].expand(2, 3, 5), b[None].expand(2, 5, 7))
    assert timer.mm_flops == 2 * 3 * 5 * 7 * (1 + 1 + 2)
    assert timer.calls["aten.mm.default"] == 1 and timer.calls["aten.addmm.default"] == 1
    assert all(t >= 0 for t in timer.time.values()) and timer.time["aten.mm.default"] > 0


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and glibc's mallinfo2")
def test_memory_phases_sampler_sees_a_phase_s_peak_and_the_heap():
    import ctypes

    import torch
    from memory_phases import PhaseSampler

    # free heap that an earlier test in this process kept (keep_freed_memory) would serve the
    # tensor without growing the resident set: hand it back first
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    sampler = PhaseSampler()
    sampler.enter("idle")
    sampler.enter("hold 64 MB")
    x = torch.ones(16 * 2**20)  # 64 MB, touched
    sampler.enter("freed")
    del x
    sampler.enter("end")
    assert sampler.peaks["hold 64 MB"] - sampler.peaks["idle"] > 0.06
    used, free, mapped = sampler.heap["hold 64 MB"]
    assert used + mapped > 0.06  # the tensor, in the heap or in its own mapping


def test_w6_records_are_chat_pairs_with_long_unrelated_answers(tokenizer):
    """W6's data: seeded (the same records twice), a system + user prompt, answers of 50-250
    words that tokenize to about as many tokens and share no leading text."""
    from workloads import conversational_pairs

    from preftune.data.tokenize import tokenize_records

    records = conversational_pairs(tokenizer, 6, seed=3)
    assert records == conversational_pairs(tokenizer, 6, seed=3)
    assert [m["role"] for m in records[0]["prompt"]] == ["system", "user"]
    examples, _ = tokenize_records(records, tokenizer, 1024, 256)
    for r, e in zip(records, examples):
        assert r["chosen"][0]["content"][:20] != r["rejected"][0]["content"][:20]
        for key in ("chosen_ids", "rejected_ids"):
            assert 50 <= len(e[key]) <= 300, (key, len(e[key]))


def test_online_floor_counts_the_step_s_unavoidable_work(tiny_dir):
    """W5's floor (benchmarks/online_floor.py), one pass: the decoder once for every distinct
    prefix that predicts or feeds (prompts sharing a head, samples sharing a start, a sample's
    last token feeding nothing), the LM head once for every distinct prefix predicting a needed
    token, the last layer's non-key/value weights skipped where nothing is predicted. Sampling
    needs every sampled token; scoring a pair only those after its samples part, none for an
    identical pair. The model's counts: linear weights without the head, the head, the last
    layer's non-key/value weights."""
    import torch
    from online_floor import pass_flops, sampling_rows, scoring_rows, shape

    from preftune.models import load_causal_lm

    # prompts (1, 2, 3) and (1, 2, 9); samples (4, 5), (4, 6) of the first, (8,) twice of the
    # second. Prefixes fed: (1) (1,2) (1,2,3) (1,2,3,4) (1,2,9); predicting a sampled token:
    # (1,2,3) (1,2,3,4) (1,2,9); (1) and (1,2) predict nothing. Linear 10, head 5, last layer 4.
    rows = [((1, 2, 3), (4, 5)), ((1, 2, 3), (4, 6)), ((1, 2, 9), (8,)), ((1, 2, 9), (8,))]
    m = {"linear": 10, "head": 5, "last_not_kv": 4}
    assert pass_flops(sampling_rows(rows), m) == 2 * (10 * 5 + 5 * 3 - 4 * 2) == 114
    # scoring: the second pair is identical; the first parts after its shared 4: only (1,2,3,4)
    # predicts a needed token, of the 4 prefixes fed
    assert scoring_rows(rows) == [((1, 2, 3), (4, 5), 1), ((1, 2, 3), (4, 6), 1)]
    assert pass_flops(scoring_rows(rows), m) == 2 * (10 * 4 + 5 * 1 - 4 * 3) == 66
    # a prompt that is a prefix of another: (1,2) predicts for the first, feeds the second
    nested = [((1, 2), (3,)), ((1, 2), (4,)), ((1, 2, 3), (5,)), ((1, 2, 3), (6,))]
    assert pass_flops(sampling_rows(nested), m) == 2 * (10 * 3 + 5 * 2 - 4 * 1) == 72
    model = load_causal_lm(str(tiny_dir))
    m, c = shape(model), model.config
    head = model.get_output_embeddings().weight.numel()
    assert m["head"] == head == c.vocab_size * c.hidden_size
    assert m["params"] == sum(p.numel() for p in model.parameters())  # a tied head counted once
    layers = model.model.layers
    lin = [x.weight.numel() for x in layers.modules() if isinstance(x, torch.nn.Linear)]
    assert m["linear"] == sum(lin)
    attn = layers[-1].self_attn
    kv = attn.k_proj.weight.numel() + attn.v_proj.weight.numel()
    assert m["last_not_kv"] == sum(lin) // len(layers) - kv > 0
