"""Sampling from the token-wise geometric mixture of the policy and the reference (IPO-MD).

Each step runs both models on the last token with their own KV cache and draws from
`filter(mixture_logprobs(z_theta, z_ref, b))` (preftune/online/mixture.py). The prompts are
prefilled once per model at batch size B; with `num_return_sequences = k` both caches are then
repeated k times (prompt-major, as `generate` returns), so the k samples of a prompt share one
prefill. Rows stop at their first EOS; the loop ends when every row has stopped.

With a LoRA reference the reference is the policy with its adapter off: pass `reference=None`
and `reference_context=policy.disable_adapter` — the two caches stay separate objects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from preftune.compiling import eager
from preftune.generation import (
    Completion,
    SamplingConfig,
    _left_pad,
    eos_token_ids,
    last_logits_only,
    truncate_at_eos,
)
from preftune.logps import cache_argument
from preftune.online.mixture import filter_logprobs, mixture_logprobs
from preftune.prepacked import prepacked_linears


class _Stream:
    """One model's incremental forward: its cache, and the logits of the last position."""

    def __init__(self, model: Any, context: Callable[[], Any]):
        self.model, self.context, self.cache = model, context, None
        self.name = cache_argument(model)
        self.last = last_logits_only(model)  # only the last position's logits are read

    def __call__(self, ids, mask, positions) -> torch.Tensor:
        kwargs = {self.name: self.cache} if self.cache is not None else {}
        with self.context():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **kwargs,
                **self.last,
            )
        self.cache = getattr(out, self.name)
        return out.logits[:, -1]

    def repeat(self, n: int) -> None:
        if n > 1:
            self.cache.batch_repeat_interleave(n)


@torch.no_grad()
def mixture_rows(
    policy: Any,
    reference: Any,
    rows: list[list[int]],
    cfg: SamplingConfig,
    mixture_beta: float,
    eos: list[int],
    pad_id: int,
    reference_context: Callable[[], Any] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New tokens `(len(rows) * k, T)` (pad after a row's EOS) and the mixture log-prob of each
    drawn token under the distribution it was drawn from (0 after EOS), prompt-major.
    Draws from torch's global RNG, one `multinomial` over all rows per step."""
    device = next(policy.parameters()).device
    k = cfg.num_return_sequences
    ids, mask = _left_pad(rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    streams = [
        _Stream(policy, contextlib.nullcontext),
        _Stream(reference or policy, reference_context),
    ]
    last = [s(ids, mask, positions) for s in streams]  # the one prefill of each model
    for s in streams:
        s.repeat(k)
    last = [x.repeat_interleave(k, 0) for x in last]
    mask, pos = mask.repeat_interleave(k, 0), positions[:, -1:].repeat_interleave(k, 0)
    n = mask.shape[0]
    eos_t = torch.tensor(eos, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    tokens, logps = [], []
    for _ in range(cfg.max_new_tokens):
        lp = mixture_logprobs(last[0], last[1], mixture_beta)
        if cfg.do_sample:
            lp = filter_logprobs(lp, cfg.temperature, cfg.top_k, cfg.top_p)
            nxt = torch.multinomial(lp.exp(), 1).squeeze(1)
        else:
            nxt = lp.argmax(-1)
        chosen = lp.gather(1, nxt[:, None]).squeeze(1)
        nxt = nxt.masked_fill(done, pad_id)
        tokens.append(nxt)
        logps.append(chosen.masked_fill(done, 0.0))
        done = done | torch.isin(nxt, eos_t)
        if bool(done.all()):
            break
        mask, pos = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), pos + 1
        last = [s(nxt[:, None], mask, pos) for s in streams]
    return torch.stack(tokens, 1).cpu(), torch.stack(logps, 1).cpu()


def generate_mixture(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    prompts: list[str],
    cfg: SamplingConfig,
    mixture_beta: float,
    batch_size: int | None = None,
    reference_context: Callable[[], Any] = contextlib.nullcontext,
) -> list[Completion]:
    """Completions of chat-templated `prompts` drawn from the mixture, prompt-major, in the
    form `generation.generate` returns (tokens up to and including the first EOS). Both
    models are put in eval mode for the call and their modes restored."""
    eos = eos_token_ids(policy, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    if any(not row for row in encoded):
        raise ValueError("a prompt tokenizes to nothing; nothing to condition on")
    models = [m for m in (policy, reference) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    step, k, out = batch_size or len(prompts), cfg.num_return_sequences, []
    hint = min(step, len(prompts)) * k
    try:
        # compile=true: decoding with a KV cache stays uncompiled; on CPU both models' linear
        # layers run on weights prepacked for oneDNN (preftune/prepacked.py)
        with eager(), prepacked_linears(models, hint):
            for start in range(0, len(prompts), step):
                rows = encoded[start : start + step]
                new, _ = mixture_rows(
                    policy, reference, rows, cfg, mixture_beta, eos, pad_id, reference_context
                )
                for j, toks in enumerate(new.tolist()):
                    kept, has_eos = truncate_at_eos(toks, eos)
                    text = tokenizer.decode(kept, skip_special_tokens=True)
                    out.append(Completion(text, kept, has_eos, start + j // k, list(rows[j // k])))
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return out
