"""The LM head over the scored positions only, in chunks: the plain path (`chunk_token_logps`
under activation checkpointing) and the fast one that writes the head's weight gradient itself
(`HeadLogpsIntoGrad`), tested against it (tests/test_logps.py, tests/test_fast_paths_dtypes.py).

By default a chunk holds LOGIT_BUDGET logits (chunk tokens = LOGIT_BUDGET // vocab), so memory
for logits is fixed whatever the batch, length or vocabulary; an explicit chunk_size fixes tokens
instead. Log-softmax is fp32 always (fp64 stays fp64; METHODS.md §0 rule 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOGIT_BUDGET = 1 << 25  # logits per chunk (128 MB in fp32): 1024 tokens of a 32k vocabulary

MIN_CHUNK = 16


def chunk_tokens(head, chunk_size: int | None) -> int:
    """Tokens per LM-head chunk: `chunk_size` if given, else LOGIT_BUDGET // vocab (>= MIN_CHUNK)."""
    if chunk_size is not None:
        return chunk_size
    return max(MIN_CHUNK, LOGIT_BUDGET // head.weight.shape[0])


def head_logits(head, hidden, softcap, scale) -> torch.Tensor:
    logits = head(hidden)
    if logits.dtype != torch.float64:
        logits = logits.float()  # fp32 log-softmax always (METHODS.md §0 rule 5); fp64 stays fp64
    if scale:
        logits = logits / scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def chunk_token_logps(head, softcap, scale, hidden, targets):
    logits = head_logits(head, hidden, softcap, scale)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class HeadLogpsIntoGrad(torch.autograd.Function):
    """log p(target) of every row of `hidden` under a bias-free LM head, in chunks, with the
    head's weight gradient added into `weight.grad` in place.

    The generic path (`chunk_token_logps` under checkpoint) lets autograd differentiate
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
    several chunks, accumulation). As for the embedding (`EmbeddingIntoGrad`), the weight's
    gradient lands in `.grad` only, not in `torch.autograd.grad`'s results.

    Under bf16 autocast (`low`) its three matmuls take bf16 operands, as autograd's would (the
    weight cast once per pass, not per chunk), and everything else stays fp32: the logits
    buffer, logsumexp, softmax and the weight's gradient. The bf16 products land in scratch
    buffers allocated once per pass (`_Scratch`), then are added into the fp32 ones (CPU has no
    mixed-dtype matmul into an fp32 output). Before, autocast took the generic path,
    which kept bf16 and fp32 copies of a chunk's logits and their gradients, and cast the head's
    weight again for each chunk it recomputed in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, low):
        N = hidden.shape[0]
        out = hidden.new_empty(N)
        lse = hidden.new_empty(N)
        buf = hidden.new_empty(min(chunk, N), weight.shape[0])
        w = weight if low is None else weight.to(low)  # autocast: cast once, not per chunk
        scratch = _Scratch()
        for s in range(0, N, chunk):
            h, t = hidden[s : s + chunk], targets[s : s + chunk]
            logits = scratch.mm_into("logits", h.to(w.dtype), w.t(), buf[: h.shape[0]])
            out[s : s + chunk] = logits.gather(1, t[:, None]).squeeze(1)
            # logsumexp in place (torch.logsumexp allocates a chunk x V temporary per call,
            # ~130 MB at a 256k vocabulary): buf then holds exp(logits - max)
            top = logits.amax(-1, keepdim=True)
            total = logits.sub_(top).exp_().sum(-1)
            torch.add(total.log(), top.squeeze(1), out=lse[s : s + chunk])
            out[s : s + chunk] -= lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.low = chunk, low
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
        w = weight if ctx.low is None else weight.to(ctx.low)
        scratch = _Scratch()
        last = (N - 1) // chunk * chunk
        for s in range(last, -1, -chunk):
            h, t, g = hidden[s : s + chunk], targets[s : s + chunk], grad[s : s + chunk]
            rows = torch.arange(h.shape[0], device=h.device)
            if s == last and kept:  # exp(logits - max), left there by forward
                d = buf[: h.shape[0]].mul_((-g / total)[:, None])  # -g softmax
            else:
                d = scratch.mm_into("logits", h.to(w.dtype), w.t(), buf[: h.shape[0]])
                d.sub_(lse[s : s + chunk, None]).exp_().mul_(-g[:, None])  # -g softmax
            d[rows, t] += g  # + g onehot
            d, h = d.to(w.dtype), h.to(w.dtype)  # autocast: bf16 operands, as autograd's would be
            if want_h:
                scratch.mm_into("dh", d, w, dh[s : s + chunk])
            if want_w:
                if weight.grad is None:
                    weight.grad = torch.mm(d.t(), h).to(weight.dtype)
                elif w is weight:
                    weight.grad.addmm_(d.t(), h)
                else:  # no mixed-dtype addmm on CPU: through one (V, H) bf16 scratch
                    weight.grad.add_(scratch.mm("dw", d.t(), h))
        return dh, None, None, None, None


class _Scratch:
    """Low-precision matmul outputs, one buffer per role, allocated on first use and reused for
    every chunk of the pass (the last chunk may be shorter: a leading slice)."""

    def __init__(self):
        self.bufs: dict[str, torch.Tensor] = {}

    def mm(self, role: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        buf = self.bufs.get(role)
        if buf is None or buf.shape[1] != b.shape[1] or buf.shape[0] < a.shape[0]:
            buf = self.bufs[role] = a.new_empty(a.shape[0], b.shape[1])
        return torch.mm(a, b, out=buf[: a.shape[0]])

    def mm_into(self, role: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor):
        """out = a @ b; bf16 operands (autocast) are multiplied in bf16 and rounded up into
        `out`."""
        if a.dtype == out.dtype:
            return torch.mm(a, b, out=out)
        return out.copy_(self.mm(role, a, b))


def fused_head(head, softcap, scale, hidden) -> bool:
    """Whether `HeadLogpsIntoGrad` computes what `chunk_token_logps` would: a plain bias-free
    nn.Linear head in fp32 or fp64 (under autocast its matmuls in the autocast dtype, as
    autograd's would be; no logit softcap or scaling)."""
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and not softcap
        and not scale
        and head.weight.dtype in (torch.float32, torch.float64)
        and hidden.dtype == head.weight.dtype
    )


def _autocast_dtype(weight: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would multiply `weight` in, or None (no autocast; fp64 stays fp64)."""
    device = weight.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def head_token_logps(
    head, softcap, scale, hidden, targets, chunk_size: int, fast_grads: bool = True
) -> torch.Tensor:
    if fast_grads and fused_head(head, softcap, scale, hidden):
        if hidden.shape[0] == 0:
            return hidden.new_zeros(0)
        low = _autocast_dtype(head.weight)
        return HeadLogpsIntoGrad.apply(hidden, head.weight, targets, chunk_size, low)
    parts = []
    last = (hidden.shape[0] - 1) // chunk_size * chunk_size
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s : s + chunk_size], targets[s : s + chunk_size]
        # The last chunk keeps its logits for backward (which visits it first and frees them
        # before recomputing any other chunk): one chunk of logits alive, as with recomputation
        # everywhere, and a batch that fits one chunk never runs its LM head twice.
        if torch.is_grad_enabled() and h.requires_grad and s != last:
            parts.append(
                checkpoint(chunk_token_logps, head, softcap, scale, h, t, use_reentrant=False)
            )
        else:
            parts.append(chunk_token_logps(head, softcap, scale, h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0)


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


def chunk_kl(ref_head, ref_cap, ref_scale, pol_head, pol_cap, pol_scale, ref_h, pol_h):
    with torch.no_grad():  # the reference is a constant (METHODS.md §0 rule 4)
        ref_lp = F.log_softmax(head_logits(ref_head, ref_h, ref_cap, ref_scale), dim=-1)
    pol_lp = F.log_softmax(head_logits(pol_head, pol_h, pol_cap, pol_scale), dim=-1)
    return (ref_lp.exp() * (ref_lp - pol_lp)).sum(-1)
