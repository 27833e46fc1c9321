"""The varlen layout: every token of a micro-batch in one row, once, with no padding and no mask.

A pair batch's sequences form a tree: the tokens all prompts start with (a chat system prompt,
`shared_prefix_length`), then per prompt its own tokens and the leading tokens its completions
share (`branch_point`), then each completion. The padded shared-prompt layout lays one prompt
group per row, pads every row to the longest, and runs the full (T, T) attention of each row
under a 4-D mask (the CPU kernels compute masked blocks too). Here each node of the tree is laid
out once, one after the other, and `TokenBatch.paths` lists each sequence's context as spans of
the row; preftune/logprob/varlen.py runs attention per path (SDPA's causal kernel, or a
lower-right causal mask where a path's own tokens follow context laid out earlier), and every
other layer of the model runs on the real tokens only.

`masked` turns such a batch into the same row under a 4-D mask: what a decoder that cannot
take the per-path attention runs (gradient checkpointing, eager attention), and the form the
tests compare with.
"""

from __future__ import annotations

import torch

from preftune.layouts import (
    TokenBatch,
    _check_branches,
    _group,
    shared_prefix_length,
)

Span = tuple[int, int]


def _merged(spans: list[Span]) -> tuple[Span, ...]:
    """`spans` without empty ones, neighbours joined."""
    out: list[Span] = []
    for s, e in spans:
        if e <= s:
            continue
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return tuple(out)


def build_varlen_batch(
    prompts: list[list[int]],
    branches: list[list[list[int]]],
    share_prefix: bool = True,
    share_completion_prefix: bool = True,
) -> TokenBatch:
    """The sequences of `build_shared_prompt_batch` (completion k of prompt i is sequence
    k * n + i; same position ids, same targets) laid out as one unpadded row:
    [prefix | trunk_0 | branch_0,0 | branch_0,1 | trunk_1 | ...]. Path (i, k) is prefix +
    trunk_i + branch_i,k; it computes attention for the tokens it is the first path to contain
    (path (0, 0) for the prefix, (i, 0) for trunk i), so each token's output is computed once
    and the paths' outputs, in order, are the row."""
    n, K = len(prompts), _check_branches(prompts, branches)
    L0 = shared_prefix_length(prompts) if share_prefix else 0
    ids, pos = list(prompts[0][:L0]), list(range(L0))
    tpos, tgt, sidx, paths = [], [], [], []
    for i, (p, comps) in enumerate(zip(prompts, branches)):
        g_ids, g_pos, br, tg = _group(i, n, p, comps, L0, share_completion_prefix)
        off = len(ids)
        ids += g_ids
        pos += g_pos
        for src, tok, seq in tg:
            tpos.append(off + src)
            tgt.append(tok)
            sidx.append(seq)
        trunk = br.count(-1)  # the group's trunk leads it, then its branches in order
        start = off + trunk
        for k in range(K):
            end = start + br.count(k)
            own = end - start + (trunk if k == 0 else 0) + (L0 if i == k == 0 else 0)
            if own:
                paths.append((_merged([(0, L0), (off, off + trunk), (start, end)]), own))
            start = end
    if sum(own for _, own in paths) != len(ids):  # each token computed by exactly one path
        raise AssertionError("varlen layout: paths do not tile the row")
    return TokenBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        attention_mask=None,
        position_ids=torch.tensor([pos], dtype=torch.long),
        target_pos=torch.tensor(tpos, dtype=torch.long),
        target_ids=torch.tensor(tgt, dtype=torch.long),
        seq_index=torch.tensor(sidx, dtype=torch.long),
        num_seqs=n * K,
        paths=tuple(paths),
    )


def path_index(spans: tuple[Span, ...], device=None) -> torch.Tensor:
    """The row positions of a path, in order."""
    return torch.cat([torch.arange(s, e, device=device) for s, e in spans])


def masked(batch: TokenBatch) -> TokenBatch:
    """The same row with a boolean (1, 1, N, N) mask in place of `paths`: a token sees the
    earlier tokens of the path that computes it."""
    N, dev = batch.input_ids.shape[1], batch.input_ids.device
    mask = torch.zeros(N, N, dtype=torch.bool, device=dev)
    for spans, own in batch.paths:
        idx = path_index(spans, dev)
        L = idx.numel()
        mask[idx[L - own :, None], idx[None, :]] = torch.ones(
            L, L, dtype=torch.bool, device=dev
        ).tril()[L - own :]
    return TokenBatch(
        input_ids=batch.input_ids,
        attention_mask=mask[None, None],
        position_ids=batch.position_ids,
        target_pos=batch.target_pos,
        target_ids=batch.target_ids,
        seq_index=batch.seq_index,
        num_seqs=batch.num_seqs,
    )
