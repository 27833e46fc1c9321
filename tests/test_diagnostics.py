"""Per-pair diagnostics (preftune/diagnostics.py) against plain per-pair loops, the segment split
against full-logits per-token log-probs, and the metrics a tiny run logs."""

import json

import pytest
import torch
from run_helpers import tiny_run_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.api import train
from preftune.config import build_config
from preftune.diagnostics import (
    pair_diagnostics,
    segment_changes,
    segment_sums,
    shared_lengths,
    summarise_segments,
    token_ordinals,
)
from preftune.evaluate import train_probe
from preftune.layouts import build_shared_prompt_batch, build_token_batch
from preftune.logps import sequence_logps, token_logps
from preftune.train.setup import load_datasets


def test_pair_diagnostics_match_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    B = 64
    pc, pr, rc, rr = (torch.randn(B, generator=g) * 3 - 20 for _ in range(4))
    pc[:4], pr[:4] = rc[:4], rr[:4]  # ties: neither below nor moving
    lc, lr = torch.randint(1, 9, (B,), generator=g), torch.randint(1, 9, (B,), generator=g)
    got = pair_diagnostics(pc, pr, rc, rr, lc, lr)
    for i in range(B):
        dc, dr = float(pc[i] - rc[i]), float(pr[i] - rr[i])
        assert got["pairs/chosen_below_ref"][i] == (dc < 0)
        assert got["pairs/rejected_below_ref"][i] == (dr < 0)
        assert got["pairs/same_direction"][i] == ((dc > 0 and dr > 0) or (dc < 0 and dr < 0))
        assert got["pairs/both_down"][i] == (dc < 0 and dr < 0)
        assert got["logratio/margin"][i] == pytest.approx(dc - dr, abs=1e-5)
        assert got["logratio/margin_per_token"][i] == pytest.approx(
            dc / int(lc[i]) - dr / int(lr[i]), abs=1e-5
        )
    assert got["pairs/same_direction"][:4].sum() == 0


def test_segment_sums_match_a_plain_loop_in_any_listing_order():
    g = torch.Generator().manual_seed(1)
    S, lengths = 5, [3, 1, 4, 6, 2]
    seq = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])
    # sequences interleaved; a sequence's k-th listed token is its k-th completion token
    seq = seq[torch.randperm(seq.numel(), generator=g)]
    tok = torch.randn(seq.numel(), generator=g, dtype=torch.float64)
    split = torch.tensor([1, 0, 2, 6, 1])
    got = segment_sums(tok, seq, S, split)
    k = token_ordinals(seq, S)
    for s in range(S):
        mine = [(int(k[i]), float(tok[i])) for i in range(seq.numel()) if seq[i] == s]
        assert [o for o, _ in mine] == list(range(lengths[s]))
        want = [
            sum(v for o, v in mine if o < split[s]),
            sum(v for o, v in mine if o == split[s]),
            sum(v for o, v in mine if o > split[s]),
        ]
        assert got[s].tolist() == pytest.approx(want)


def test_token_ordinals_on_interleaved_sequences():
    seq = torch.tensor([2, 0, 2, 1, 0, 2])
    assert token_ordinals(seq, 3).tolist() == [0, 0, 1, 0, 1, 2]


@torch.no_grad()
def _plain_token_logps(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits.float()
    lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return lp[len(prompt) - 1 :]


@pytest.mark.parametrize("shared_layout", [False, True])
def test_segment_sums_of_the_engine_match_full_logits(tiny_model, shared_layout):
    prompts = [[1, 5, 7, 9], [1, 5, 7, 11, 13]]
    chosen = [[20, 21, 22, 23, 2], [30, 31, 2]]
    rejected = [[20, 21, 40, 23, 2], [41, 31, 2]]
    if shared_layout:
        batch = build_shared_prompt_batch(prompts, [[c, r] for c, r in zip(chosen, rejected)], 0)
    else:
        batch = build_token_batch(prompts * 2, chosen + rejected, 0)
    split = shared_lengths(chosen, rejected)
    assert split.tolist() == [2, 0]
    with torch.no_grad():
        tok = token_logps(tiny_model, batch)
        sums = segment_sums(tok, batch.seq_index, batch.num_seqs, split.repeat(2))
        seqs = sequence_logps(tiny_model, batch)
    assert sums.sum(1).tolist() == pytest.approx(seqs.tolist(), abs=1e-4)
    for s, (p, c) in enumerate(zip(prompts * 2, chosen + rejected)):
        plain = _plain_token_logps(tiny_model, p, c)
        d = int(split[s % 2])
        want = [plain[:d].sum(), plain[d], plain[d + 1 :].sum()]
        assert sums[s].tolist() == pytest.approx([float(w) for w in want], abs=1e-4)


def test_segment_changes_and_summary_by_hand():
    # 2 pairs: pair 0 shares 2 tokens and its chosen fell; pair 1 shares none
    pol = torch.tensor(
        [[-3.0, -1.0, -2.0], [0.0, -5.0, -1.0], [-3.0, -4.0, -2.0], [0.0, -6.0, -1.0]]
    )
    ref = torch.tensor(
        [[-1.0, -1.5, -1.5], [0.0, -5.0, -1.0], [-1.0, -2.0, -1.0], [0.0, -5.0, -1.0]]
    )
    ch = segment_changes(pol, ref, torch.tensor([2, 0]))
    assert ch["segments/prefix"].tolist() == [-2.0, 0.0]
    assert ch["segments/chosen_edit"].tolist() == [0.5, 0.0]
    assert ch["segments/rejected_edit"].tolist() == [-2.0, -1.0]
    assert ch["chosen_below_ref"].tolist() == [1.0, 0.0]
    s = summarise_segments(ch)
    assert s["segments/shared_fraction"] == 0.5
    assert s["segments/prefix"] == s["segments/prefix_dropped"] == -2.0
    assert s["segments/chosen_suffix"] == -0.5 and s["segments/rejected_suffix"] == -1.0
    none = summarise_segments(segment_changes(pol, ref, torch.tensor([0, 0])))
    assert none == {"segments/shared_fraction": 0.0}


def test_a_run_logs_diagnostics_that_start_at_zero_and_move(tiny_dir, tmp_path):
    args = tiny_run_args(
        tiny_dir,
        tmp_path,
        "diag",
        max_steps=4,
        eval_before=True,
        num_eval=8,
        eval_every=2,
        eval_max_new_tokens=3,
    )
    train(args)
    run = tmp_path / "diag"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    for key in (
        "pairs/chosen_below_ref",
        "pairs/rejected_below_ref",
        "pairs/same_direction",
        "pairs/both_down",
        "logratio/margin",
    ):
        assert first[key] == 0.0  # step 1: policy == reference
    moved = [
        r["pairs/chosen_below_ref"] + r["pairs/rejected_below_ref"]
        for r in rows[1:]
        if "pairs/both_down" in r
    ]
    assert max(moved) > 0
    assert max(abs(r["logratio/margin"]) for r in rows[1:] if "logratio/margin" in r) > 0
    last = rows[-1]
    # the edit pairs all share a prefix; the three segments add up to chosen's log-ratio
    assert last["eval/segments/shared_fraction"] == 1.0
    beta = 0.1
    total = (
        last["eval/segments/prefix"]
        + last["eval/segments/chosen_edit"]
        + last["eval/segments/chosen_suffix"]
    )
    assert total == pytest.approx(last["eval/rewards/chosen"] / beta, abs=1e-3)
    assert last["eval/logratio/margin"] == pytest.approx(
        last["eval/rewards/margins"] / beta, abs=1e-3
    )
    # the training probe (the first training pairs, all 16 here): its three segments add up to
    # chosen's log-ratio under final/ and the reference, scored here with plain transformers
    assert last["train/segments/shared_fraction"] == 1.0
    probe_total = sum(
        last[f"train/segments/{k}"] for k in ("prefix", "chosen_edit", "chosen_suffix")
    )
    assert probe_total == pytest.approx(_plain_chosen_logratio(args, run), abs=1e-3)
    assert all("train/segments/prefix" in r for r in rows if "eval/loss" in r)
    for tag in ("before", "after"):
        samples = json.loads((run / f"greedy_{tag}.json").read_text())
        assert len(samples) == 4 and {"prompt", "completion", "chosen", "rejected"} <= set(
            samples[0]
        )


def _plain_chosen_logratio(args: dict, run) -> float:
    """Mean over the training probe of log pi(y_w) - log pi_ref(y_w), from full logits."""
    cfg = build_config(args)
    tok = AutoTokenizer.from_pretrained(args["model"])
    pairs = train_probe(load_datasets(cfg, tok, unpaired=False).train)
    policy = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)

    def logp(model, e) -> float:
        ids = torch.tensor([e["prompt_ids"] + e["chosen_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float().log_softmax(-1)
        targets = ids[0, 1:]
        n = len(e["chosen_ids"])
        return logits[-n:].gather(-1, targets[-n:, None]).sum().item()

    return sum(logp(policy, e) - logp(ref, e) for e in pairs) / len(pairs)


def test_the_training_probe_is_the_first_64_training_pairs():
    assert train_probe(list(range(100))) == list(range(64))
    assert train_probe(list(range(10))) == list(range(10))
