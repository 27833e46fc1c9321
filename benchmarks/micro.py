"""Micro-benchmarks behind the core changes the benchmark report proposes. They call preftune's
own log-prob engine (`preftune.logps`) on one batch and change only the layout or the optimizer,
so a difference is the layout's or the optimizer's, nothing else's.

Layouts of one batch of B pairs (2B sequences), forward + backward of `sequence_logps`:
- padded: one sequence per row (preftune `share_prompt=false`);
- packed: every sequence in one row, position ids restarting (`share_prompt=false packed=true`);
- packed-capN: first-fit into rows of at most N tokens (`build_token_batch(max_row=N)`, which the
  trainer does not expose yet);
- shared-padded / shared-packed: [prompt; chosen; rejected], the prompt run once
  (`build_shared_prompt_batch`; preftune's default `share_prompt=auto` picks it on this data): a 4-D mask stops
  rejected tokens from seeing chosen ones and rejected positions continue the prompt's, so every
  scored token sees exactly the context it has in the padded layout; one pair per row, or all
  pairs in one row.
- ...+prefix: the same with `share_prefix=True` (preftune's default): the tokens every prompt of
  the batch starts with (a chat system prompt) run once and their KV cache serves every row.
- shared-padded+prefix+completions: preftune's default layout, where also the tokens chosen and
  rejected start with join the prompt (`share_completion_prefix=True`; the layouts above without
  it). In every layout a sequence's last token is a target only and is not laid out.
"""

from __future__ import annotations

import statistics
import time

import torch

from preftune.layouts import TokenBatch, build_shared_prompt_batch, build_token_batch
from preftune.logps import sequence_logps


def _time_fwd_bwd(model, batch: TokenBatch, reps: int) -> tuple[list[float], torch.Tensor]:
    times, out = [], None
    for _ in range(reps + 1):  # the first repetition warms up and is dropped
        t = time.perf_counter()
        lp = sequence_logps(model, batch)
        lp.sum().backward()
        times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
        out = lp.detach()
    return times[1:], out


def layouts(model, examples: list[dict], pad_id: int, caps: list[int], reps: int = 3) -> dict:
    prompts = [e["prompt_ids"] for e in examples]
    chosen = [e["chosen_ids"] for e in examples]
    rejected = [e["rejected_ids"] for e in examples]
    P2, C2 = prompts * 2, chosen + rejected
    pairs = [[c, r] for c, r in zip(chosen, rejected)]
    batches = {
        "padded": build_token_batch(P2, C2, pad_id, packed=False),
        "packed": build_token_batch(P2, C2, pad_id, packed=True),
        **{
            f"packed-cap{n}": build_token_batch(P2, C2, pad_id, packed=True, max_row=n)
            for n in caps
        },
        **{
            f"shared-{'packed' if packed else 'padded'}": build_shared_prompt_batch(
                prompts,
                pairs,
                pad_id,
                packed=packed,
                share_completion_prefix=False,
            )
            for packed in (False, True)
        },
        "padded+prefix": build_token_batch(P2, C2, pad_id, packed=False, share_prefix=True),
        **{
            f"shared-{'packed' if packed else 'padded'}+prefix": build_shared_prompt_batch(
                prompts,
                pairs,
                pad_id,
                packed=packed,
                share_prefix=True,
                share_completion_prefix=False,
            )
            for packed in (False, True)
        },
        "shared-padded+prefix+completions": build_shared_prompt_batch(
            prompts, pairs, pad_id, share_prefix=True
        ),
    }
    model.train()
    out, ref = {}, None
    for name, batch in batches.items():
        times, lp = _time_fwd_bwd(model, batch, reps)
        ref = lp if ref is None else ref
        shape = tuple(batch.input_ids.shape)
        shared = name.startswith("shared")
        real = sum(map(len, C2)) + sum(map(len, prompts if shared else P2))
        L0 = 0 if batch.prefix_ids is None else batch.prefix_ids.numel()
        real -= L0 * (len(prompts if shared else P2) - 1)  # the prefix runs once
        out[name] = {
            "rows_x_width": shape,
            "prefix": L0,
            "tokens_in_rows": shape[0] * shape[1],
            "real_tokens": real,
            "fwd_bwd_s": {"median": statistics.median(times), "min": min(times), "max": max(times)},
            "max_abs_logp_diff_vs_padded": float((lp - ref).abs().max()),
        }
    return out


def optimizer_step(model, variant: str, reps: int = 3) -> dict:
    """Seconds per AdamW step over all parameters. variant: 'default' (preftune's call today:
    torch picks the single-tensor loop on CPU), 'foreach', or 'fused' (TRL's default)."""
    kwargs = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[variant]
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=5e-7, weight_decay=0.0, **kwargs)
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return {"median": statistics.median(times[1:]), "min": min(times[1:]), "max": max(times[1:])}
