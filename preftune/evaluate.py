"""Evaluation: task accuracy on a verifiable task (greedy decoding, exact answer), greedy
samples of any data set, and the per-segment log-prob split of held-out pairs."""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from preftune.data.tokenize import render_prompt
from preftune.diagnostics import segment_changes, segment_sums, shared_lengths
from preftune.generation import SamplingConfig, generate
from preftune.logps import token_logps
from preftune.prepacked import prepacked_linears


def greedy_completions(
    model,
    tokenizer,
    prompts: list,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    desc: str | None = None,
    quiet: bool = False,
) -> list[str]:
    """Greedy decode each prompt (a string or a message list) with a KV cache, in batches."""
    cfg = SamplingConfig(max_new_tokens=max_new_tokens).greedy()
    texts = [render_prompt(tokenizer, p) for p in prompts]
    out: list[str] = []
    with prepacked_linears([model], batch_size):  # packed once, not once per batch
        for s in tqdm(
            range(0, len(texts), batch_size), desc=desc, disable=quiet or desc is None, leave=False
        ):
            out += [c.text for c in generate(model, tokenizer, texts[s : s + batch_size], cfg)]
    return out


def task_accuracy(
    model,
    tokenizer,
    problems: list[dict],
    verify: Callable[[object, str], bool],
    max_new_tokens: int = 16,
    batch_size: int = 64,
    desc: str | None = None,
    quiet: bool = False,
) -> tuple[float, list[dict]]:
    """Fraction of `problems` ({prompt, ...}) whose greedy completion `verify` accepts, and samples."""
    comps = greedy_completions(
        model,
        tokenizer,
        [p["prompt"] for p in problems],
        max_new_tokens,
        batch_size,
        desc=desc,
        quiet=quiet,
    )
    results = [
        {"prompt": p["prompt"], "completion": c, "correct": bool(verify(p["prompt"], c))}
        for p, c in zip(problems, comps)
    ]
    return sum(r["correct"] for r in results) / max(len(results), 1), results


# ---- greedy samples of any data set, and the per-segment split of held-out pairs --------------
NUM_SAMPLES = 4  # held-out prompts whose greedy completions a run writes before and after


def greedy_samples(model, tokenizer, examples: list[dict], max_new_tokens: int) -> list[dict]:
    """Greedy completions of the first NUM_SAMPLES `examples` (tokenized records with
    `prompt_ids`, and `chosen_ids` / `rejected_ids` when paired), for the report's before /
    after table: [{prompt, completion, chosen?, rejected?}]. Prompt ids are decoded with their
    special tokens and re-encoded without adding any, so the model sees its own layout."""
    exs = [e for e in examples if "prompt_ids" in e][:NUM_SAMPLES]
    if not exs:
        return []
    texts = [tokenizer.decode(e["prompt_ids"], skip_special_tokens=False) for e in exs]
    comps = generate(
        model, tokenizer, texts, SamplingConfig(max_new_tokens=max_new_tokens).greedy()
    )
    rows = []
    for e, c in zip(exs, comps):
        row = {
            "prompt": tokenizer.decode(e["prompt_ids"], skip_special_tokens=True),
            "completion": c.text,
        }
        for key in ("chosen", "rejected"):
            if f"{key}_ids" in e:
                row[key] = tokenizer.decode(e[f"{key}_ids"], skip_special_tokens=True)
        rows.append(row)
    return rows


@torch.no_grad()
def pair_segment_sums(
    model, examples: list[dict], idx: list[int], make_batch: Callable, chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """((2B, 3) segment sums of [chosen; rejected] (prefix, first differing token, suffix),
    (B,) shared lengths) for examples[idx], scored by `model` under no_grad: one extra forward
    of the batch `make_batch(examples, idx)` (a PairBatch) lays out. At evaluations only: a
    cached reference holds sequence sums, so a training step has no reference segments to
    subtract; the reference's are taken once, before training (segment_table)."""
    exs = [examples[i] for i in idx]
    shared = shared_lengths([e["chosen_ids"] for e in exs], [e["rejected_ids"] for e in exs])
    device = next(model.parameters()).device
    tokens = make_batch(examples, idx).tokens.to(device)
    tok = token_logps(model, tokens, chunk_size=chunk_size)
    sums = segment_sums(tok, tokens.seq_index, tokens.num_seqs, shared.repeat(2).to(device))
    return sums.double().cpu(), shared


def has_shared_prefixes(examples: list[dict]) -> bool:
    """Whether any pair's chosen and rejected start with the same completion token."""
    return any("chosen_ids" in e and e["chosen_ids"][:1] == e["rejected_ids"][:1] for e in examples)


SEGMENTS_FILE = "eval_reference_segments.json"  # in the run directory
# the same for the first TRAIN_PROBE training pairs, logged at each evaluation as train/segments/*
TRAIN_SEGMENTS_FILE = "train_reference_segments.json"
TRAIN_PROBE = 64


def train_probe(train: list[dict]) -> list[dict]:
    """The training pairs whose segment split is followed through training (the first ones:
    the same pairs at every evaluation, in the order the data file has them)."""
    return train[:TRAIN_PROBE]


def segment_changes_of(
    model, examples: list[dict], table: torch.Tensor, mine: list[int], make_batch, size: int,
    chunk_size: int | None,
) -> dict[str, list[torch.Tensor]]:  # fmt: skip
    """Per-pair segment changes (diagnostics.segment_changes) of examples[mine] against the
    reference's `table` (segment_table's), in batches of `size`: one no-grad forward each."""
    changes: dict[str, list] = {}
    for s in range(0, len(mine), size):
        idx = mine[s : s + size]
        pol, shared = pair_segment_sums(model, examples, idx, make_batch, chunk_size)
        ref = table[idx].transpose(0, 1).reshape(-1, 3)  # [chosen; rejected]
        for k, v in segment_changes(pol, ref, shared).items():
            changes.setdefault(k, []).append(v)
    return changes


def segment_table(
    model, examples: list[dict], make_batch: Callable, size: int, chunk_size: int | None
) -> torch.Tensor:
    """(E, 2, 3) segment sums of every pair of `examples` ([chosen, rejected] x [prefix, edit,
    suffix]) under `model`, in batches of `size`: the reference's, when run before training."""
    rows = []
    for s in range(0, len(examples), size):
        idx = list(range(s, min(s + size, len(examples))))
        sums, _ = pair_segment_sums(model, examples, idx, make_batch, chunk_size)
        rows.append(sums.view(2, len(idx), 3).transpose(0, 1))
    return torch.cat(rows)


def read_segment_table(path, num_pairs: int) -> torch.Tensor | None:
    """The `segment_table` written at `path`, or None when there is none for `num_pairs` pairs."""
    if not path.exists():
        return None
    table = torch.tensor(json.loads(path.read_text()), dtype=torch.float64)
    return table if len(table) == num_pairs else None
