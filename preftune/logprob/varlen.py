"""Attention per path for the varlen layout (preftune/varlen_layout.py): one unpadded row, no
mask, each sequence's context listed as spans of the row.

Every layer but attention runs on the row as it is. Attention runs once per path through
transformers' own SDPA function: a path's queries, keys and values are its spans, and it
keeps the outputs of the tokens it computes (its trailing `own` tokens). Every path runs SDPA's causal kernel over
all its tokens, which skips the blocks above the diagonal and needs no mask; a path whose own
tokens follow context computed by an earlier path (a rejected answer after its prompt) drops
that context's outputs, a few queries more than a lower-right mask would compute, without the
masked kernel's cost on CPU (grouped-query heads repeated, a where per block). Against the padded shared-prompt layout this drops the
padding from every layer and the masked blocks from attention (docs/benchmarks.md, W6).

The decoder finds this function through the attention implementation name it is run under
(`hidden_varlen`), and the paths through a keyword argument transformers passes down to each
layer's attention. Only `plan.plan_forward` decides that a decoder can run it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from preftune.layouts import TokenBatch
from preftune.logprob.embedding import decoder_inputs
from preftune.varlen_layout import path_index

VARLEN_ATTENTION = "preftune_varlen"
PATHS_KWARG = "preftune_paths"


@dataclass(frozen=True)
class AttentionPaths:
    """What each layer's `varlen_attention` needs, built once per forward (`attention_paths`).

    Every path's tokens come from one gather of the row (`index`, the paths' spans one after
    the other), split into the paths' `lengths`; of each path's outputs the last `owns` are
    kept, and these tile the row in order. A single gather and split keep backward to one
    index_add and one concatenation per tensor (slicing the row per path gives each path a
    row-sized zero gradient to add up, measured as most of the attention's backward)."""

    index: torch.Tensor
    lengths: list[int]
    owns: list[int]


# left out of compiled layers (`compile=true`, preftune/compiling.py), a graph break in each:
# the paths' lengths are Python integers that change with every micro-batch, so traced, each
# micro-batch would compile anew. Outside torch.compile this is a plain call.
@torch.compiler.disable
def varlen_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function signature; (B=1, N, H, D) outputs of the row."""
    paths = kwargs.pop(PATHS_KWARG, None)
    if paths is None or attention_mask is not None:
        raise RuntimeError(
            f"{VARLEN_ATTENTION} attention runs only the varlen layout: {type(module).__name__} "
            "was called without its paths (a model that does not pass keyword arguments down "
            "to its attention), or with a mask"
        )
    q, k, v = (t.index_select(2, paths.index).split(paths.lengths, 2) for t in (query, key, value))
    outs = [
        sdpa_attention_forward(module, *qkv, None, **kwargs)[0][:, L - own :]
        for *qkv, L, own in zip(q, k, v, paths.lengths, paths.owns)
    ]
    return torch.cat(outs, 1), None


def attention_paths(batch: TokenBatch) -> AttentionPaths:
    """A varlen batch's paths for `varlen_attention`."""
    dev = batch.input_ids.device
    return AttentionPaths(
        torch.cat([path_index(spans, dev) for spans, _ in batch.paths]),
        [sum(e - s for s, e in spans) for spans, _ in batch.paths],
        [own for _, own in batch.paths],
    )


def hidden_varlen(decoder, batch: TokenBatch, fast_grads: bool = True) -> torch.Tensor:
    """(N, H) hidden states of a varlen batch's row."""
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    cfg = decoder.config
    impl, cfg._attn_implementation = cfg._attn_implementation, VARLEN_ATTENTION
    try:
        out = decoder(
            **decoder_inputs(decoder, batch.input_ids, fast_grads),
            attention_mask=None,
            position_ids=batch.position_ids,
            use_cache=False,
            **{PATHS_KWARG: attention_paths(batch)},
        )
    finally:
        cfg._attn_implementation = impl
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return hidden[0]
