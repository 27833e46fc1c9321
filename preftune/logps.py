"""The one place that turns a model's hidden states into sequence log-probs.

Only completion positions get LM-head work: hidden states are gathered at the positions whose
*next* token is a completion token (the shift-by-one of METHODS.md §0), and the head +
fp32 log-softmax runs over chunks of those tokens under activation checkpointing, so the
(tokens, vocab) logits exist one chunk at a time in forward and again in backward
(preftune/logprob/head.py).

Shared prefix: when every sequence of a batch starts with the same tokens (a chat template's
system prompt and turn header: 27 of the 40 prompt tokens of the bundled set), the builders
(preftune/layouts.py) can lay out only what follows it and keep the prefix apart
(`TokenBatch.prefix_ids`); the decoder then runs the prefix once, as the layout planner
(preftune/logprob/plan.py) decides, with gradients flowing back into the one prefix forward.
The log-probs are those of the full sequences (tests/test_logps.py).

Policy, reference, reference precompute, TDPO's sequential KL and evaluation all call this.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from preftune.layouts import TokenBatch, with_prefix_columns
from preftune.logprob.arch import (
    attention_only,
    cache_argument,
    compute_dtype,
    model_mask,
    split_causal_lm,
)
from preftune.logprob.embedding import decoder_inputs, weights_with_grad_written_here
from preftune.logprob.head import (
    chunk_kl,
    chunk_tokens,
    distinct_targets,
    head_token_logps,
)
from preftune.logprob.plan import plan_forward, varlen_runs
from preftune.logprob.prefix import hidden_folded, windowed_mask
from preftune.logprob.varlen import hidden_varlen
from preftune.varlen_layout import masked

__all__ = [
    "attention_only",
    "cache_argument",
    "hidden_at_targets",
    "plain_sequence_logps",
    "sequence_logps",
    "sequence_logps_and_kl",
    "token_logps",
    "weights_with_grad_written_here",
]


def hidden_at_targets(model, batch: TokenBatch, fast_grads: bool = True) -> torch.Tensor:
    """(N, H) final hidden states at the scored positions. Prompt positions get no head work.

    The planner (`plan_forward`) says how a shared prefix runs: folded into the batch as row 0,
    whose keys and values every row attends to (`folded_prefix_attention`; one forward, each
    weight's gradient one matmul), run first (batch size 1, `use_cache`) with its keys and values
    repeated over the R rows, or laid out in every row. Either way autograd carries the rows'
    gradients back into the one prefix forward (a sum over rows).

    `fast_grads=False` keeps every gradient inside autograd (no `EmbeddingIntoGrad`), as a
    model wrapped by DDP or FSDP needs.
    """
    decoder, head, _, _ = split_causal_lm(model)
    dtype = compute_dtype(head.weight.dtype)
    if batch.paths is not None and not varlen_runs(decoder):
        batch = masked(batch)  # the same row under a 4-D mask
    plan = plan_forward(decoder, batch)
    if plan.varlen:
        return hidden_varlen(decoder, batch, fast_grads).index_select(0, batch.target_pos)
    if plan.prefix == "fold":
        return hidden_folded(decoder, batch, dtype, fast_grads).index_select(0, batch.target_pos)
    if plan.prefix == "rows":
        batch = batch.without_prefix()
    hidden = _decoder_hidden(decoder, batch, plan, dtype, fast_grads)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.target_pos)


def _decoder_hidden(decoder, batch: TokenBatch, plan, dtype, fast_grads: bool) -> torch.Tensor:
    """(R, T, H) hidden states of the rows; a prefix left in `batch` runs first as a KV cache."""
    cache, mask = None, batch.attention_mask
    if batch.prefix_ids is not None:
        L0 = batch.prefix_ids.numel()
        pre = decoder(
            **decoder_inputs(decoder, batch.prefix_ids[None], fast_grads),
            position_ids=torch.arange(L0, device=batch.input_ids.device)[None],
            use_cache=True,
        )
        cache = getattr(pre, cache_argument(decoder))
        cache.batch_repeat_interleave(batch.input_ids.shape[0])
        mask = with_prefix_columns(mask, L0)
    out = decoder(
        **decoder_inputs(decoder, batch.input_ids, fast_grads),
        attention_mask=(
            windowed_mask(decoder, batch, plan.window, plan.mixed, dtype)
            if plan.windowed
            else model_mask(decoder, mask, dtype)
        ),
        position_ids=batch.position_ids,
        use_cache=cache is not None,
        **{cache_argument(decoder): cache},
    )
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def token_logps(
    model,
    batch: TokenBatch,
    hidden: torch.Tensor | None = None,
    chunk_size: int | None = None,
    fast_grads: bool = True,
) -> torch.Tensor:
    """(N,) log-prob of every scored token, chunked with recomputation in backward. A (position,
    token) pair scored for several sequences (the shared leading tokens of a prompt's
    completions, `layouts.branch_point`) gets its LM-head work once. `fast_grads=False`: the
    head's weight gradient through autograd (`HeadLogpsIntoGrad` writes `.grad` itself)."""
    _, head, softcap, scale = split_causal_lm(model)
    chunk_size = chunk_tokens(head, chunk_size)
    if hidden is None:
        hidden = hidden_at_targets(model, batch, fast_grads)
    targets, repeated = batch.target_ids, distinct_targets(batch.target_pos, batch.target_ids)
    if repeated is not None:
        first, inverse = repeated
        hidden, targets = hidden.index_select(0, first), targets.index_select(0, first)
        return head_token_logps(
            head, softcap, scale, hidden, targets, chunk_size, fast_grads
        ).index_select(0, inverse)
    return head_token_logps(head, softcap, scale, hidden, targets, chunk_size, fast_grads)


def sequence_logps(
    model, batch: TokenBatch, chunk_size: int | None = None, fast_grads: bool = True
) -> torch.Tensor:
    """(S,) log-probs of each sequence's completion, summed over its completion tokens."""
    tok = token_logps(model, batch, chunk_size=chunk_size, fast_grads=fast_grads)
    return torch.zeros(batch.num_seqs, dtype=tok.dtype, device=tok.device).index_add(
        0, batch.seq_index, tok
    )


def sequence_logps_and_kl(
    policy,
    reference,
    batch: TokenBatch,
    ref_hidden: torch.Tensor,
    chunk_size: int | None = None,
    fast_grads: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy sequence log-probs and TDPO's sequential KL, sum_t KL(p_ref || p_theta), per sequence.

    Both distributions are rebuilt chunk by chunk from hidden states, so no (N, V) pair of
    tensors is alive beyond one chunk. `ref_hidden` comes from `hidden_at_targets(reference, batch)`
    under no_grad.
    """
    pol_hidden = hidden_at_targets(policy, batch, fast_grads)
    tok = token_logps(policy, batch, pol_hidden, chunk_size, fast_grads)
    _, ref_head, ref_cap, ref_scale = split_causal_lm(reference)
    _, pol_head, pol_cap, pol_scale = split_causal_lm(policy)
    chunk_size = chunk_tokens(pol_head, chunk_size)
    kls = []
    for s in range(0, pol_hidden.shape[0], chunk_size):
        args = (
            ref_head,
            ref_cap,
            ref_scale,
            pol_head,
            pol_cap,
            pol_scale,
            ref_hidden[s : s + chunk_size],
            pol_hidden[s : s + chunk_size],
        )
        if torch.is_grad_enabled() and pol_hidden.requires_grad:
            kls.append(checkpoint(chunk_kl, *args, use_reentrant=False))
        else:
            kls.append(chunk_kl(*args))
    kl = torch.cat(kls)
    zeros = torch.zeros(batch.num_seqs, dtype=tok.dtype, device=tok.device)
    return zeros.index_add(0, batch.seq_index, tok), zeros.clone().index_add(0, batch.seq_index, kl)


def plain_sequence_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Reference implementation with full logits, for tests: (B, T) padded rows, completion_mask
    marks completion tokens. Sum over t of log p(x_t | x_<t) where completion_mask[t]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits if logits.dtype == torch.float64 else logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logp * completion_mask[:, 1:]).sum(-1)
