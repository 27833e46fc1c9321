"""Deterministic data order and the tensors one micro-batch needs.

The order of epoch e is a permutation seeded by (seed, e), so a resumed run that skips the
first k batches of an epoch sees exactly what an uninterrupted run saw. A global batch of
`batch_size` examples is split across processes, then into `grad_accum` micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preftune.layouts import (
    TokenBatch,
    build_shared_prompt_batch,
    build_token_batch,
)
from preftune.logprob.plan import long_pairs, shared_prompt_pays
from preftune.varlen_layout import build_varlen_batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def example_lengths(examples: list[dict]) -> list[int]:
    """Tokens each example lays out (prompt + completions): the key of group_by_length."""
    return [sum(len(v) for k, v in e.items() if k.endswith("_ids")) for e in examples]


MEGABATCH = 50  # batches per length-sorted group, as in transformers' LengthGroupedSampler


def global_batches(
    n: int, batch_size: int, seed: int, epoch: int, lengths: list[int] | None = None
) -> list[list[int]]:
    """Full batches only: a ragged last batch would weigh its examples more; its count is reported.

    With `lengths` (group_by_length), the epoch's permutation is cut into groups of
    MEGABATCH x batch_size examples, each group sorted by length and split into batches, and the
    batches are then shuffled (seeded by seed and epoch): batches of similar lengths waste less
    compute on padding, while their order stays random.
    """
    order = epoch_order(n, seed, epoch)
    full = n - n % batch_size
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, full, batch_size)]
    kept = order[:full]
    group = MEGABATCH * batch_size
    batches = []
    for g in range(0, full, group):
        part = sorted(kept[g : g + group], key=lambda i: -lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    shuffle = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7919)
    return [batches[i] for i in torch.randperm(len(batches), generator=shuffle).tolist()]


PRECOMPUTE_TOKENS = 8192  # laid-out tokens per batch of a pass without gradients


def length_sorted_batches(lengths: list[int], tokens: int = PRECOMPUTE_TOKENS) -> list[list[int]]:
    """All indices, longest first, cut into batches of at most `tokens` padded tokens (at least
    one example each). For passes without gradients (the reference precompute), where the order
    does not matter and memory is one layer's activations: large, evenly long batches keep the
    matmuls large, the padding small and a shared prefix run once per batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def micro_batches(
    batch: list[int], process_index: int, num_processes: int, grad_accum: int
) -> list[list[int]]:
    mine = batch[process_index::num_processes]
    size = len(mine) // grad_accum
    return [mine[i * size : (i + 1) * size] for i in range(grad_accum)]


@dataclass
class PairBatch:
    tokens: TokenBatch  # 2B sequences: [chosen_0..chosen_B-1, rejected_0..rejected_B-1]
    index: torch.Tensor  # (B,) dataset indices (keys into a reference cache)
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    margin: torch.Tensor | None
    num_tokens: int  # real tokens: prompt + chosen + rejected


def pair_batch(
    examples: list[dict],
    idx: list[int],
    pad_id: int,
    packed: bool,
    share_prompt: bool | str = False,
    hidden_size: int = 1024,
    share_prefix: bool = False,
    share_completion_prefix: bool = True,
    varlen: bool = False,
    fit_rows: bool = True,
) -> PairBatch:
    """Sequences 0..n-1 are the chosen, n..2n-1 the rejected. With `share_prompt` each prompt is
    laid out once and both completions branch from it (same log-probs, ~1/3 fewer tokens on the
    bundled set); otherwise prompt + chosen and prompt + rejected are separate sequences.
    share_prompt="auto" decides per micro-batch with `sharing_pays` (model width `hidden_size`);
    `varlen` (logprob/plan.py `layout_settings`) lays a shared-prompt batch of long pairs
    (`plan.long_pairs`) out as one unpadded row instead (preftune/varlen_layout.py); `fit_rows`
    lets padded shared-prompt rows of long pairs hold as many groups as fit in the longest.
    `share_prefix`: the leading tokens all prompts share run once for the micro-batch.
    `share_completion_prefix`: in the shared layout, the leading tokens chosen and rejected
    share are laid out and scored once (`layouts.branch_point`)."""
    exs = [examples[i] for i in idx]
    long = long_pairs(exs)
    varlen, fit_rows = varlen and long, fit_rows and long
    if share_prompt == "auto" and not varlen:
        share_prompt = shared_prompt_pays(
            exs, packed, hidden_size, share_prefix, share_completion_prefix
        )
    prompts = [e["prompt_ids"] for e in exs]
    pairs = [[e["chosen_ids"], e["rejected_ids"]] for e in exs]
    if share_prompt and varlen:
        tokens = build_varlen_batch(prompts, pairs, share_prefix, share_completion_prefix)
    elif share_prompt:
        tokens = build_shared_prompt_batch(
            prompts, pairs, pad_id, packed, share_prefix, share_completion_prefix, fit_rows
        )
    else:
        comps = [c for c, _ in pairs] + [r for _, r in pairs]
        tokens = build_token_batch(prompts * 2, comps, pad_id, packed, share_prefix=share_prefix)
    margin = torch.tensor([e["margin"] for e in exs]) if all("margin" in e for e in exs) else None
    return PairBatch(
        tokens=tokens,
        index=torch.tensor(idx, dtype=torch.long),
        chosen_lengths=torch.tensor([len(e["chosen_ids"]) for e in exs]),
        rejected_lengths=torch.tensor([len(e["rejected_ids"]) for e in exs]),
        margin=margin,
        num_tokens=sum(
            len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in exs
        ),
    )


@dataclass
class UnpairedBatch:
    tokens: TokenBatch  # B examples
    labels: torch.Tensor
    lengths: torch.Tensor
    num_tokens: int


def unpaired_batch(
    examples: list[dict], idx: list[int], pad_id: int, packed: bool, share_prefix: bool = False
) -> UnpairedBatch:
    exs = [examples[i] for i in idx]
    prompts = [e["prompt_ids"] for e in exs]
    comps = [e["completion_ids"] for e in exs]
    return UnpairedBatch(
        tokens=build_token_batch(prompts, comps, pad_id, packed=packed, share_prefix=share_prefix),
        labels=torch.tensor([e["label"] for e in exs], dtype=torch.bool),
        lengths=torch.tensor([len(c) for c in comps]),
        num_tokens=sum(len(p) + len(c) for p, c in zip(prompts, comps)),
    )


def mismatched_pairs(idx: list[int]) -> list[tuple[int, int]]:
    """KTO's KL pairs of a batch (METHODS.md §12): example idx[j]'s prompt with example
    idx[j + 1 mod B]'s completion, the cyclic shift of HALOs."""
    if len(idx) < 2:
        raise ValueError(
            "KTO needs at least 2 examples in a batch to build its mismatched KL pairs; raise "
            "batch_size"
        )
    return [(idx[j], idx[(j + 1) % len(idx)]) for j in range(len(idx))]


def kl_batch(
    examples: list[dict],
    pairs: list[tuple[int, int]],
    pad_id: int,
    packed: bool,
    share_prefix: bool,
) -> TokenBatch:
    """The token batch of (prompt of example a, completion of example b) for each pair (a, b)."""
    prompts = [examples[a]["prompt_ids"] for a, _ in pairs]
    comps = [examples[b]["completion_ids"] for _, b in pairs]
    return build_token_batch(prompts, comps, pad_id, packed=packed, share_prefix=share_prefix)
