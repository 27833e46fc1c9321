"""The one place that turns a model's hidden states into sequence log-probs.

Only completion positions get LM-head work: hidden states are gathered at the positions whose
*next* token is a completion token (the shift-by-one of METHODS.md §0), and the head +
fp32 log-softmax runs over chunks of those tokens under activation checkpointing, so the
(tokens, vocab) logits exist one chunk at a time in forward and again in backward. By default a
chunk holds LOGIT_BUDGET logits (chunk tokens = LOGIT_BUDGET // vocab), so memory for logits is
fixed whatever the batch, length or vocabulary; an explicit chunk_size fixes tokens instead.

Shared prefix: when every sequence of a batch starts with the same tokens (a chat template's
system prompt and turn header: 27 of the 40 prompt tokens of the bundled set), the builders
(preftune/layouts.py) can lay out only what follows it and keep the prefix apart
(`TokenBatch.prefix_ids`); the decoder
then runs the prefix once — under SDPA as an extra row of the same forward whose keys and values
every row attends to, otherwise as a KV cache repeated over the rows — with gradients flowing
back into the one prefix forward. The log-probs are those of the full sequences
(tests/test_logps.py).

Input embeddings: in training, a plain nn.Embedding's lookup adds its rows into `weight.grad`
in place (`_EmbeddingIntoGrad`) instead of building a dense (vocab, hidden) gradient that a
tied LM head's gradient is then added to.

Policy, reference, reference precompute, TDPO's sequential KL and evaluation all call this.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from preftune.layouts import TokenBatch, with_prefix_columns

LOGIT_BUDGET = 1 << 25  # logits per chunk (128 MB in fp32): 1024 tokens of a 32k vocabulary
MIN_CHUNK = 16


def chunk_tokens(head, chunk_size: int | None) -> int:
    """Tokens per LM-head chunk: `chunk_size` if given, else LOGIT_BUDGET // vocab (>= MIN_CHUNK)."""
    if chunk_size is not None:
        return chunk_size
    return max(MIN_CHUNK, LOGIT_BUDGET // head.weight.shape[0])


def _model_mask(model, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean 4-D mask as the model's attention implementation wants it: SDPA and flex take
    booleans; eager adds the mask to the scores, so it gets 0 / the dtype's minimum."""
    if mask is None or mask.dim() != 4 or mask.dtype != torch.bool:
        return mask
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    return mask


def _split_causal_lm(model):
    """(decoder that returns hidden states, lm_head, logit post-processing) of a causal LM."""
    base = (
        model.get_base_model() if hasattr(model, "get_base_model") else model
    )  # peft keeps LoRA layers inside
    decoder = (
        base.get_decoder()
        if hasattr(base, "get_decoder")
        else getattr(base, base.base_model_prefix)
    )
    head = base.get_output_embeddings()
    cfg = base.config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logits_scaling", None)
    return decoder, head, softcap, scale


def _checkpointing(decoder) -> bool:
    """Whether the decoder's layers recompute in backward: transformers then drops any KV cache
    passed to them, so a shared prefix must be laid out in the rows instead."""
    return decoder.training and any(
        getattr(m, "gradient_checkpointing", False) for m in decoder.modules()
    )


class _EmbeddingIntoGrad(torch.autograd.Function):
    """An embedding lookup whose backward adds its rows into `weight.grad` in place.

    Autograd's own embedding backward builds a dense (vocab, hidden) gradient (zeros, then
    index_add) and, for a weight tied to the LM head, adds it to the head's dense gradient out
    of place: two vocab-sized allocations and three passes over them per forward (113 MB each
    for SmolLM2's 49,152 x 576), for a gradient that touches a few hundred rows. Here the lookup
    reads the weight outside autograd, so the weight's only autograd edge is the LM head's, and
    this backward queues an index_add of the rows into `weight.grad` for the end of the backward
    pass, when the head's gradient has been accumulated (autograd runs AccumulateGrad late, so
    adding at once would first allocate zeros); a weight nothing else reached gets zeros plus
    the rows. The sum is autograd's (tests/test_logps.py: tied and untied, with accumulation).
    Gradients land in `.grad` only: `torch.autograd.grad` would not see them, and nothing here
    uses it. `anchor` is a scalar that requires grad, so that autograd calls this backward.
    """

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, anchor):
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return F.embedding(ids, weight.detach())

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        w = ctx.weight
        ids, rows = ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        if ctx.padding_idx is not None:  # nn.Embedding never updates its padding row
            keep = ids != ctx.padding_idx
            ids, rows = ids[keep], rows[keep]

        def add_rows():
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            w.grad.index_add_(0, ids, rows)

        torch.autograd.Variable._execution_engine.queue_callback(add_rows)
        return None, None, None, None


def _decoder_inputs(decoder, ids: torch.Tensor, fast_grads: bool = True) -> dict:
    """`input_ids` for the decoder, or their embeddings through `_EmbeddingIntoGrad` when the
    input embedding is a plain, trainable nn.Embedding and gradients are on. Subclasses (scaled
    embeddings), max_norm, scale_grad_by_freq and sparse embeddings keep the module's own path,
    and so does every model when `fast_grads` is off (a gradient written into `.grad` outside
    autograd is never seen by DDP's reducer or FSDP's reduce-scatter)."""
    emb = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
    if (
        not fast_grads
        or type(emb) is not torch.nn.Embedding
        or not (torch.is_grad_enabled() and emb.weight.requires_grad)
        or emb.max_norm is not None
        or emb.scale_grad_by_freq
        or emb.sparse
    ):
        return {"input_ids": ids}
    anchor = torch.ones((), device=ids.device, requires_grad=True)
    return {"inputs_embeds": _EmbeddingIntoGrad.apply(ids, emb.weight, emb.padding_idx, anchor)}


def weights_with_grad_written_here(model) -> list[torch.Tensor]:
    """The weights whose gradient this module may add into `.grad` itself, outside autograd's
    accumulation (`_EmbeddingIntoGrad`, `_HeadLogpsIntoGrad`): the input embedding's and the
    LM head's. No autograd hook tells when their gradient is complete
    (train/in_backward.py)."""
    out = []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            out.append(module.weight)
    return out


FOLDED_PREFIX_ATTENTION = "preftune_folded_prefix"


def _folded_prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention for a batch whose row 0 is the shared prefix: every row's
    keys and values are the prefix's (row 0's first L0 positions) followed by its own, so the
    rows attend to the prefix without a KV cache and every linear layer runs once over prefix
    and rows together. `attention_mask` is (B, 1, T, L0 + T); L0 is read off its width."""
    L0, B = attention_mask.shape[-1] - query.shape[2], query.shape[0]
    key = torch.cat([key[:1, :, :L0].expand(B, -1, -1, -1), key], 2)
    value = torch.cat([value[:1, :, :L0].expand(B, -1, -1, -1), value], 2)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _prefix_path(decoder, batch: TokenBatch, lay_out: bool) -> str:
    """How a batch's shared prefix runs: "rows" (laid out in every row), "fold" (row 0 of the
    same forward) or "cache" (its own forward, keys and values repeated over the rows).

    - "rows" when the caller says so (`lay_out`: hybrid and windowed models, gradient
      checkpointing).
    - "fold" where that runs fewer token slots than laying it out: row 0 and the rows are
      padded to one width W = max(T, L0), so (R + 1)·W <= R·(L0 + T), i.e. T <= R·L0 when the
      rows are the wider (W2: a 63-token prefix in front of two 2,112-token rows would add a
      third row of work) and L0 <= R·T when the prefix is (W1 with the completions' shared
      tokens in the trunk: a 27-token prefix, rows of ~26). It needs SDPA, which the folded
      attention wraps, in layers that look their attention function up at call time (Falcon
      picks a class at init and would take its eager branch with the wider mask).
    - "rows" again when the rows carry no padding under SDPA: laid-out rows need no mask and
      SDPA runs its causal kernel, which skips the upper triangle, while rows after a cache
      need an explicit mask and the full square (W2's model, 2 x 2,112 tokens, 63-token prefix:
      12.2-14.2 s laid out vs 13.5-16.4 s cached per forward + backward; docs/benchmarks.md).
    - "cache" otherwise (eager attention, padded rows, a prefix longer than all rows together).
    """
    if lay_out:
        return "rows"
    L0, (R, T) = batch.prefix_ids.numel(), batch.input_ids.shape
    sdpa = getattr(decoder.config, "_attn_implementation", None) == "sdpa"
    fewer_slots = (R + 1) * max(T, L0) <= R * (L0 + T)
    if sdpa and getattr(type(decoder), "_supports_attention_backend", False) and fewer_slots:
        return "fold"
    mask = batch.attention_mask
    if sdpa and mask is not None and mask.dim() == 2 and bool(mask.all()):
        return "rows"
    return "cache"


def _sliding_window(cfg) -> tuple[int | None, bool]:
    """(w, mixed) for a model whose layers, all or some, attend to the last w keys only: `mixed`
    when `layer_types` also has full-attention layers (Qwen2 with max_window_layers, Gemma 2/3).
    (None, False) when every layer sees the whole sequence."""
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return None, False
    types = getattr(cfg, "layer_types", None)
    if types is None:  # Mistral: every layer slides
        return window, False
    if "sliding_attention" not in types:
        return None, False
    return window, "full_attention" in types


ATTENTION_LAYERS = {"full_attention", "sliding_attention"}
_RECURRENT_MODEL_TYPES = ("mamba", "rwkv", "recurrent", "xlstm", "lfm", "jamba", "bamba")


def token_mixers(cfg) -> set[str]:
    """The kinds of token-mixing layer a model config declares: its `layer_types` (Qwen3-Next's
    linear_attention, LFM2's conv, RecurrentGemma's recurrent ...) or Jamba/Bamba's
    `layers_block_type`; a recurrent model type with neither is its own kind; anything else is
    taken as attention everywhere."""
    kinds = getattr(cfg, "layer_types", None) or getattr(cfg, "layers_block_type", None)
    if kinds:
        return set(kinds)
    model_type = str(getattr(cfg, "model_type", ""))
    if any(k in model_type for k in _RECURRENT_MODEL_TYPES):
        return {model_type}
    return {"full_attention"}


def attention_only(cfg) -> bool:
    """Whether attention (under the mask the engine passes) is the only way tokens of a row see
    each other: what the shared-prompt, packed and folded layouts rely on. Convolution,
    recurrent and state-space layers read whole rows in order, whatever the mask says."""
    return token_mixers(cfg) <= ATTENTION_LAYERS


def _causal_4d(mask: torch.Tensor) -> torch.Tensor:
    """A padding mask (R, T) as a boolean causal (R, 1, T, T) mask; a padding query attends to
    itself, so no softmax row is empty (an empty one is NaN under eager attention, and a NaN
    value row poisons every query through 0 * NaN)."""
    T = mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=mask.device)
    return (causal[None, None] & mask.bool()[:, None, None, :]) | eye


def _windowed_mask(decoder, batch: TokenBatch, window: int, mixed: bool, dtype: torch.dtype):
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
        mask = _causal_4d(mask)
    pos = batch.position_ids
    near = (pos[:, :, None] - pos[:, None, :]) < window
    windowed = _model_mask(decoder, mask & near[:, None], dtype)
    if not mixed:
        return windowed
    return {"full_attention": _model_mask(decoder, mask, dtype), "sliding_attention": windowed}


def _hidden_folded(
    decoder, batch: TokenBatch, dtype: torch.dtype, fast_grads: bool = True
) -> torch.Tensor:
    """(R*T, H) hidden states of the rows, with the prefix run as an extra row 0 of the same
    forward (see `_folded_prefix_attention`). Rows narrower than the prefix are padded to its
    length (the pad slots attend to themselves only and are dropped from the result)."""
    AttentionInterface.register(FOLDED_PREFIX_ATTENTION, _folded_prefix_attention)
    L0, (R, T) = batch.prefix_ids.numel(), batch.input_ids.shape
    W, dev = max(T, L0), batch.input_ids.device
    rows = batch.attention_mask
    if rows.dim() == 2:
        rows = _causal_4d(rows)
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
            **_decoder_inputs(decoder, ids, fast_grads),
            attention_mask=_model_mask(decoder, mask, dtype),
            position_ids=positions,
            use_cache=False,
        )
    finally:
        cfg._attn_implementation = impl
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return hidden[1:, :T].reshape(R * T, -1)


def hidden_at_targets(model, batch: TokenBatch, fast_grads: bool = True) -> torch.Tensor:
    """(N, H) final hidden states at the scored positions. Prompt positions get no head work.

    A batch with a shared prefix runs it once where that pays (`_prefix_path`): folded into the
    batch as row 0, whose keys and values every row attends to (`_folded_prefix_attention`; one
    forward, each weight's gradient one matmul), or run first (batch size 1, `use_cache`) with
    its keys and values repeated over the R rows. Either way autograd carries the rows'
    gradients back into the one prefix forward (a sum over rows). Otherwise it is laid out in
    every row: under gradient checkpointing in training (which drops any cache and would re-run
    the folded attention under another implementation), for hybrid models, and for
    sliding-window models whose sequences may be longer than the window.

    A hybrid model (convolution, recurrent or state-space layers beside attention, which read
    whole rows) takes only the padded layout; transformers handles its masks and caches. A
    sliding-window model whose prefix + row width exceeds its window gets the window applied to
    a 4-D mask here (`_windowed_mask`): transformers' windowed KV cache keeps only the last keys
    of the prefix, and it does not window a 4-D mask it is given.

    `fast_grads=False` keeps every gradient inside autograd (no `_EmbeddingIntoGrad`), as a
    model wrapped by DDP or FSDP needs.
    """
    decoder, head, _, _ = _split_causal_lm(model)
    dtype = _compute_dtype(head.weight.dtype)
    hybrid = not attention_only(decoder.config)
    if hybrid and (batch.attention_mask is None or batch.attention_mask.dim() == 4):
        kinds = sorted(token_mixers(decoder.config) - ATTENTION_LAYERS)
        raise ValueError(
            f"{type(decoder).__name__} has {', '.join(kinds)} layers, which read every token "
            "of a row in order whatever the attention mask says: the packed and shared-prompt "
            "layouts would let one sequence see another. Set packed=false and "
            "share_prompt=false (share_prompt=auto does this by itself)."
        )
    window, mixed = (None, False) if hybrid else _sliding_window(decoder.config)
    L0 = 0 if batch.prefix_ids is None else batch.prefix_ids.numel()
    windowed = window is not None and L0 + batch.input_ids.shape[1] > window
    if batch.prefix_ids is not None:
        path = _prefix_path(decoder, batch, hybrid or windowed or _checkpointing(decoder))
        if path == "fold":
            return _hidden_folded(decoder, batch, dtype, fast_grads).index_select(
                0, batch.target_pos
            )
        if path == "rows":
            batch = batch.without_prefix()
    cache, mask = None, batch.attention_mask
    if batch.prefix_ids is not None:
        L0 = batch.prefix_ids.numel()
        pre = decoder(
            **_decoder_inputs(decoder, batch.prefix_ids[None], fast_grads),
            position_ids=torch.arange(L0, device=batch.input_ids.device)[None],
            use_cache=True,
        )
        cache = getattr(pre, cache_argument(decoder))
        cache.batch_repeat_interleave(batch.input_ids.shape[0])
        mask = with_prefix_columns(mask, L0)
    out = decoder(
        **_decoder_inputs(decoder, batch.input_ids, fast_grads),
        attention_mask=(
            _windowed_mask(decoder, batch, window, mixed, dtype)
            if windowed
            else _model_mask(decoder, mask, dtype)
        ),
        position_ids=batch.position_ids,
        use_cache=cache is not None,
        **{cache_argument(decoder): cache},
    )
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.target_pos)


def cache_argument(model: torch.nn.Module) -> str:
    """The name of a model's KV-cache argument and output field: `cache` where transformers has
    renamed it (the old name warns there, and goes in 5.40), `past_key_values` before that."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return _cache_argument(type(base))


@functools.cache
def _cache_argument(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled("cpu") and weight_dtype == torch.float32:
        return torch.get_autocast_dtype("cpu")
    return weight_dtype


def _head_logits(head, hidden, softcap, scale) -> torch.Tensor:
    logits = head(hidden)
    if logits.dtype != torch.float64:
        logits = logits.float()  # fp32 log-softmax always (METHODS.md §0 rule 5); fp64 stays fp64
    if scale:
        logits = logits / scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_token_logps(head, softcap, scale, hidden, targets):
    logits = _head_logits(head, hidden, softcap, scale)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class _HeadLogpsIntoGrad(torch.autograd.Function):
    """log p(target) of every row of `hidden` under a bias-free LM head, in chunks, with the
    head's weight gradient added into `weight.grad` in place.

    The generic path (`_chunk_token_logps` under checkpoint) lets autograd differentiate
    gather - logsumexp: per chunk of c tokens it allocates c x V zeros for the gather, c x V for
    logsumexp's softmax, c x V for their sum, and a dense V x H weight gradient that is then added
    to the accumulated one; at a 256k vocabulary each is ~130 MB, fresh memory (page faults)
    every chunk of every step. Here forward takes each chunk's logsumexp in place in one
    c x V buffer and keeps the per-token logsumexp and the last chunk's exp(logits - max);
    backward starts from those, recomputes every other chunk's logits into the same
    c x V buffer, turns them in place into
    d(logp)/d(logits) = g (onehot - softmax), and writes dH = dL W and W.grad += dL^T H (addmm_,
    no V x H temporary; the first chunk of a pass sets W.grad when it is None). Same maths as the
    generic path (tests/test_logps.py: values, hidden and weight gradients, tied and untied,
    several chunks, accumulation). As for the embedding (`_EmbeddingIntoGrad`), the weight's
    gradient lands in `.grad` only, not in `torch.autograd.grad`'s results.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        N = hidden.shape[0]
        out = hidden.new_empty(N)
        lse = hidden.new_empty(N)
        buf = hidden.new_empty(min(chunk, N), weight.shape[0])
        for s in range(0, N, chunk):
            h, t = hidden[s : s + chunk], targets[s : s + chunk]
            logits = torch.mm(h, weight.t(), out=buf[: h.shape[0]])
            out[s : s + chunk] = logits.gather(1, t[:, None]).squeeze(1)
            # logsumexp in place (torch.logsumexp allocates a chunk x V temporary per call,
            # ~130 MB at a 256k vocabulary): buf then holds exp(logits - max)
            top = logits.amax(-1, keepdim=True)
            total = logits.sub_(top).exp_().sum(-1)
            torch.add(total.log(), top.squeeze(1), out=lse[s : s + chunk])
            out[s : s + chunk] -= lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        # the last chunk's exp(logits - max) stays in `buf` for backward, which starts with it
        # (softmax = buf / total): one chunk of logits alive, and a batch that fits one chunk
        # runs its head once
        keep = any(ctx.needs_input_grad[:2])
        ctx.buf, ctx.total = (buf, total) if keep else (None, None)
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk, N = ctx.chunk, hidden.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(hidden) if want_h else None
        buf, total, ctx.buf, ctx.total = ctx.buf, ctx.total, None, None
        kept = buf is not None  # a second backward (retain_graph) recomputes the last chunk too
        if not kept:
            buf = hidden.new_empty(min(chunk, N), weight.shape[0])
        last = (N - 1) // chunk * chunk
        for s in range(last, -1, -chunk):
            h, t, g = hidden[s : s + chunk], targets[s : s + chunk], grad[s : s + chunk]
            rows = torch.arange(h.shape[0], device=h.device)
            if s == last and kept:  # exp(logits - max), left there by forward
                d = buf[: h.shape[0]].mul_((-g / total)[:, None])  # -g softmax
            else:
                d = torch.mm(h, weight.t(), out=buf[: h.shape[0]])
                d.sub_(lse[s : s + chunk, None]).exp_().mul_(-g[:, None])  # -g softmax
            d[rows, t] += g  # + g onehot
            if want_h:
                torch.mm(d, weight, out=dh[s : s + chunk])
            if want_w:
                if weight.grad is None:
                    weight.grad = torch.mm(d.t(), h)
                else:
                    weight.grad.addmm_(d.t(), h)
        return dh, None, None, None


def _fused_head(head, softcap, scale, hidden) -> bool:
    """Whether `_HeadLogpsIntoGrad` computes what `_chunk_token_logps` would: a plain bias-free
    nn.Linear head in fp32 or fp64 (no autocast, no logit softcap or scaling)."""
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and not softcap
        and not scale
        and head.weight.dtype in (torch.float32, torch.float64)
        and hidden.dtype == head.weight.dtype
        and not torch.is_autocast_enabled(hidden.device.type)
    )


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
    head's weight gradient through autograd (`_HeadLogpsIntoGrad` writes `.grad` itself)."""
    _, head, softcap, scale = _split_causal_lm(model)
    chunk_size = chunk_tokens(head, chunk_size)
    if hidden is None:
        hidden = hidden_at_targets(model, batch, fast_grads)
    targets, repeated = batch.target_ids, distinct_targets(batch.target_pos, batch.target_ids)
    if repeated is not None:
        first, inverse = repeated
        hidden, targets = hidden.index_select(0, first), targets.index_select(0, first)
        return _token_logps(
            head, softcap, scale, hidden, targets, chunk_size, fast_grads
        ).index_select(0, inverse)
    return _token_logps(head, softcap, scale, hidden, targets, chunk_size, fast_grads)


def distinct_targets(
    pos: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For (position, token) pairs scored more than once: the index of the first occurrence of
    each distinct pair and, per pair, which distinct pair it is; None when all are distinct."""
    if pos.numel() < 2:
        return None
    distinct, inverse = torch.unique(pos * (int(ids.max()) + 1) + ids, return_inverse=True)
    if distinct.numel() == pos.numel():
        return None
    order = torch.arange(pos.numel(), device=pos.device)
    first = torch.full_like(distinct, pos.numel()).scatter_reduce(0, inverse, order, "amin")
    return first, inverse


def _token_logps(
    head, softcap, scale, hidden, targets, chunk_size: int, fast_grads: bool = True
) -> torch.Tensor:
    if fast_grads and _fused_head(head, softcap, scale, hidden):
        if hidden.shape[0] == 0:
            return hidden.new_zeros(0)
        return _HeadLogpsIntoGrad.apply(hidden, head.weight, targets, chunk_size)
    parts = []
    last = (hidden.shape[0] - 1) // chunk_size * chunk_size
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s : s + chunk_size], targets[s : s + chunk_size]
        # The last chunk keeps its logits for backward (which visits it first and frees them
        # before recomputing any other chunk): one chunk of logits alive, as with recomputation
        # everywhere, and a batch that fits one chunk never runs its LM head twice.
        if torch.is_grad_enabled() and h.requires_grad and s != last:
            parts.append(
                checkpoint(_chunk_token_logps, head, softcap, scale, h, t, use_reentrant=False)
            )
        else:
            parts.append(_chunk_token_logps(head, softcap, scale, h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0)


def sequence_logps(
    model, batch: TokenBatch, chunk_size: int | None = None, fast_grads: bool = True
) -> torch.Tensor:
    """(S,) log-probs of each sequence's completion, summed over its completion tokens."""
    tok = token_logps(model, batch, chunk_size=chunk_size, fast_grads=fast_grads)
    return torch.zeros(batch.num_seqs, dtype=tok.dtype, device=tok.device).index_add(
        0, batch.seq_index, tok
    )


def _chunk_kl(ref_head, ref_cap, ref_scale, pol_head, pol_cap, pol_scale, ref_h, pol_h):
    with torch.no_grad():  # the reference is a constant (METHODS.md §0 rule 4)
        ref_lp = F.log_softmax(_head_logits(ref_head, ref_h, ref_cap, ref_scale), dim=-1)
    pol_lp = F.log_softmax(_head_logits(pol_head, pol_h, pol_cap, pol_scale), dim=-1)
    return (ref_lp.exp() * (ref_lp - pol_lp)).sum(-1)


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
    _, ref_head, ref_cap, ref_scale = _split_causal_lm(reference)
    _, pol_head, pol_cap, pol_scale = _split_causal_lm(policy)
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
            kls.append(checkpoint(_chunk_kl, *args, use_reentrant=False))
        else:
            kls.append(_chunk_kl(*args))
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
