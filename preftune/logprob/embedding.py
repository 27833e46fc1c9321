"""Input embeddings in training: a plain nn.Embedding's lookup adds its rows into
`weight.grad` in place (`EmbeddingIntoGrad`) instead of building a dense (vocab, hidden)
gradient that a tied LM head's gradient is then added to. `decoder_inputs` picks it, or the
plain path (`input_ids`, the module's own lookup) it is tested against (tests/test_logps.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class EmbeddingIntoGrad(torch.autograd.Function):
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


def decoder_inputs(decoder, ids: torch.Tensor, fast_grads: bool = True) -> dict:
    """`input_ids` for the decoder, or their embeddings through `EmbeddingIntoGrad` when the
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
    return {"inputs_embeds": EmbeddingIntoGrad.apply(ids, emb.weight, emb.padding_idx, anchor)}


def weights_with_grad_written_here(model) -> list[torch.Tensor]:
    """The weights whose gradient this module may add into `.grad` itself, outside autograd's
    accumulation (`EmbeddingIntoGrad`, `HeadLogpsIntoGrad`): the input embedding's and the
    LM head's. No autograd hook tells when their gradient is complete
    (train/in_backward.py)."""
    out = []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            out.append(module.weight)
    return out
