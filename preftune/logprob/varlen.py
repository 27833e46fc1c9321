"""Attention per path for the varlen layout (preftune/varlen_layout.py): one unpadded row, no
mask, each sequence's context listed as spans of the row.

Every layer but attention runs on the row as it is. Attention runs once per path through
transformers' own SDPA function: a path's keys and values are its spans (a view when it is one
span), its queries the tokens it computes (its trailing `own` tokens). A path that computes all
its tokens takes SDPA's causal kernel, which skips the blocks above the diagonal; one whose
tokens follow context computed by an earlier path (a rejected answer after its prompt) takes a
lower-right causal mask of (own, length). Against the padded shared-prompt layout this drops the
padding from every layer and the masked blocks from attention (docs/benchmarks.md, W6).

The decoder finds this function through the attention implementation name it is run under
(`hidden_varlen`), and the paths through a keyword argument transformers passes down to each
layer's attention. Only `plan.plan_forward` decides that a decoder can run it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from preftune.layouts import TokenBatch
from preftune.logprob.embedding import decoder_inputs
from preftune.varlen_layout import Span

VARLEN_ATTENTION = "preftune_varlen"
PATHS_KWARG = "preftune_paths"


def _take(t: torch.Tensor, spans: tuple[Span, ...]) -> torch.Tensor:
    """(B, H, L, D) rows of `t` at `spans`, along the sequence dimension."""
    if len(spans) == 1:
        return t[:, :, spans[0][0] : spans[0][1]]
    return torch.cat([t[:, :, s:e] for s, e in spans], 2)


def varlen_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function signature; (B=1, N, H, D) outputs of the row."""
    paths = kwargs.pop(PATHS_KWARG, None)
    if paths is None or attention_mask is not None:
        raise RuntimeError(
            f"{VARLEN_ATTENTION} attention runs only the varlen layout: {type(module).__name__} "
            "was called without its paths (a model that does not pass keyword arguments down "
            "to its attention), or with a mask"
        )
    outs = []
    for spans, own, mask in paths:
        end = spans[-1][1]
        out, _ = sdpa_attention_forward(
            module,
            query[:, :, end - own : end],
            _take(key, spans),
            _take(value, spans),
            mask,
            **kwargs,
        )
        outs.append(out)
    return torch.cat(outs, 1), None


def attention_paths(batch: TokenBatch) -> list[tuple]:
    """(spans, own, mask) per path: mask None for a path that computes all its tokens (SDPA's
    causal kernel), else the boolean lower-right causal (1, 1, own, length) mask."""
    out, dev = [], batch.input_ids.device
    for spans, own in batch.paths:
        L = sum(e - s for s, e in spans)
        mask = None
        if own < L:
            mask = torch.ones(own, L, dtype=torch.bool, device=dev).tril(L - own)[None, None]
        out.append((spans, own, mask))
    return out


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
