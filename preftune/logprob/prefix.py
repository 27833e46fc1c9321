"""Attention for laid-out batches: the shared prefix folded into the batch as row 0 (one
forward; `folded_prefix_attention`), and sliding windows applied to a 4-D mask by position
(`windowed_mask`). logps.py runs them where the planner (plan.py) says so."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from preftune.layouts import TokenBatch, with_prefix_columns
from preftune.logprob.arch import model_mask
from preftune.logprob.embedding import decoder_inputs

FOLDED_PREFIX_ATTENTION = "preftune_folded_prefix"


def folded_prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention for a batch whose row 0 is the shared prefix: every row's
    keys and values are the prefix's (row 0's first L0 positions) followed by its own, so the
    rows attend to the prefix without a KV cache and every linear layer runs once over prefix
    and rows together. `attention_mask` is (B, 1, T, L0 + T); L0 is read off its width."""
    L0, B = attention_mask.shape[-1] - query.shape[2], query.shape[0]
    key = torch.cat([key[:1, :, :L0].expand(B, -1, -1, -1), key], 2)
    value = torch.cat([value[:1, :, :L0].expand(B, -1, -1, -1), value], 2)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def causal_4d(mask: torch.Tensor) -> torch.Tensor:
    """A padding mask (R, T) as a boolean causal (R, 1, T, T) mask; a padding query attends to
    itself, so no softmax row is empty (an empty one is NaN under eager attention, and a NaN
    value row poisons every query through 0 * NaN)."""
    T = mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=mask.device)
    return (causal[None, None] & mask.bool()[:, None, None, :]) | eye


def windowed_mask(decoder, batch: TokenBatch, window: int, mixed: bool, dtype: torch.dtype):
    """The attention mask for a sliding-window model. transformers takes a 4-D mask as it comes,
    so a 4-D layout (shared prompt) gets the window applied here, by position id: a query sees a
    key of its own sequence only if their positions are less than `window` apart (transformers'
    `kv_idx > q_idx - window`). A padded layout's 2-D mask is made 4-D first: transformers would
    window it itself, but under eager attention a padding query whose window holds only padding
    gets an empty softmax row (NaN). Mixed models get one mask per layer type. The packed layout
    (no mask) is left to transformers, which windows within each sequence from the position ids.
    """
    mask = batch.attention_mask
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = causal_4d(mask)
    pos = batch.position_ids
    near = (pos[:, :, None] - pos[:, None, :]) < window
    windowed = model_mask(decoder, mask & near[:, None], dtype)
    if not mixed:
        return windowed
    return {"full_attention": model_mask(decoder, mask, dtype), "sliding_attention": windowed}


def hidden_folded(
    decoder, batch: TokenBatch, dtype: torch.dtype, fast_grads: bool = True
) -> torch.Tensor:
    """(R*T, H) hidden states of the rows, with the prefix run as an extra row 0 of the same
    forward (see `folded_prefix_attention`). Rows narrower than the prefix are padded to its
    length (the pad slots attend to themselves only and are dropped from the result)."""
    AttentionInterface.register(FOLDED_PREFIX_ATTENTION, folded_prefix_attention)
    L0, (R, T) = batch.prefix_ids.numel(), batch.input_ids.shape
    W, dev = max(T, L0), batch.input_ids.device
    rows = batch.attention_mask
    if rows.dim() == 2:
        rows = causal_4d(rows)
    if W > T:  # pad slots: any token id, position 0, seen by no real token
        rows = F.pad(rows, (0, W - T, 0, W - T)) | torch.eye(W, dtype=torch.bool, device=dev)
    ids = torch.cat(
        [F.pad(batch.prefix_ids, (0, W - L0))[None], F.pad(batch.input_ids, (0, W - T))]
    )
    positions = F.pad(batch.position_ids, (0, W - T))
    positions = torch.cat([torch.arange(W, device=dev)[None], positions])
    first = torch.zeros(1, 1, W, L0 + W, dtype=torch.bool, device=dev)
    first[..., :L0] = torch.ones(W, L0, dtype=torch.bool, device=dev).tril()  # causal prefix
    mask = torch.cat([first, with_prefix_columns(rows, L0)])
    cfg = decoder.config
    impl, cfg._attn_implementation = cfg._attn_implementation, FOLDED_PREFIX_ATTENTION
    try:
        out = decoder(
            **decoder_inputs(decoder, ids, fast_grads),
            attention_mask=model_mask(decoder, mask, dtype),
            position_ids=positions,
            use_cache=False,
        )
    finally:
        cfg._attn_implementation = impl
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return hidden[1:, :T].reshape(R * T, -1)
