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

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


# ---- W6: the padded shared-prompt layout against the varlen one, in one process --------------
def w6_batches(model, examples: list[dict], pad_id: int) -> dict[str, TokenBatch]:
    """One micro-batch as the trainer lays it out under share_prompt=auto: before this change
    (one prompt group per padded row under a 4-D mask, the shared prefix apart), with the groups
    fitted into fewer rows of the same width, and as one varlen row."""
    from preftune.train.batches import pair_batch

    idx = list(range(len(examples)))
    width = model.config.hidden_size
    kinds = {"padded": (False, False), "fitted": (False, True), "varlen": (True, True)}
    return {
        name: pair_batch(
            examples, idx, pad_id, False, "auto", width, True, True, varlen=v, fit_rows=f
        ).tokens
        for name, (v, f) in kinds.items()
    }


def attention_entries(batch: TokenBatch) -> int:
    """Query-key pairs attention computes per head and layer: a padded row's full square under
    its mask; per path the causal half of its square (SDPA's causal kernel)."""
    if batch.paths is None:
        R, T = batch.input_ids.shape
        L0 = 0 if batch.prefix_ids is None else batch.prefix_ids.numel()
        return R * T * (T + L0) + L0 * L0
    total = 0
    for spans, _ in batch.paths:
        L = sum(e - s for s, e in spans)
        total += L * (L + 1) // 2
    return total


def w6_ab(model, batches: dict[str, TokenBatch], reps: int, bf16: bool) -> dict:
    """Forward + backward of `sequence_logps` for each layout, alternated, `reps` times after
    one warm-up round; log-prob and gradient differences against the first layout."""
    times = {k: [] for k in batches}
    cpu = {k: [] for k in batches}  # this process's CPU seconds: less bent by other jobs
    outs = {}
    for r in range(reps + 1):
        for name, batch in batches.items():
            t, c = time.perf_counter(), time.process_time()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                lp = sequence_logps(model, batch)
            lp.sum().backward()
            if r:
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            outs[name] = (lp.detach(), grads)
            model.zero_grad(set_to_none=True)
            wall, used = time.perf_counter() - t, time.process_time() - c
            print(f"  {name} rep {r}: {wall:.2f} s wall, {used:.2f} s CPU", flush=True)
    base = next(iter(outs.values()))
    return {
        name: {
            "shape": tuple(batch.input_ids.shape),
            "slots": batch.input_ids.numel()
            + (0 if batch.prefix_ids is None else batch.prefix_ids.numel()),
            "attention_entries": attention_entries(batch),
            "s": times[name],
            "median_s": statistics.median(times[name]),
            "median_cpu_s": statistics.median(cpu[name]),
            "max_abs_dlogp": float((outs[name][0] - base[0]).abs().max()),
            "max_rel_dgrad": max(
                float((a - b).norm() / b.norm().clamp_min(1e-30))
                for a, b in zip(outs[name][1], base[1])
            ),
        }
        for name, batch in batches.items()
    }


def main(argv=None) -> None:
    """python benchmarks/micro.py [--workload w6|w1] [--layers N] [--reps 3] [--bf16]
    [--only padded|fitted|varlen]: the A/B above on the first training batch of W6 (or W1):
    SmolLM2-135M, only its first N decoder layers with --layers (more repeats on a loaded
    machine). --only runs one layout for two steps and prints this process's peak RSS (run
    each layout in its own process)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from workloads import (
        W1_DATA,
        batch_order,
        conversational_pairs,
        default_model,
        load_examples,
        write_jsonl,
    )

    from preftune.models import load_causal_lm, load_tokenizer

    ap = argparse.ArgumentParser(description=main.__doc__.split(":")[0])
    ap.add_argument("--workload", choices=["w6", "w1"], default="w6")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--only", choices=["padded", "fitted", "varlen"], default=None)
    ap.add_argument("--kinds", default="padded,fitted,varlen", help="layouts to alternate")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = W1_DATA
    if args.workload == "w6":
        data = str(Path(tempfile.mkdtemp()) / "w6.jsonl")
        write_jsonl(conversational_pairs(load_tokenizer(default_model()), 32), Path(data))
    examples, tok = load_examples(data, default_model(), 32, 512, 256)
    first = [examples[i] for i in batch_order(len(examples), 8, 0, 1)[0]]
    model = load_causal_lm(default_model())
    if args.layers:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    model.train()
    batches = w6_batches(model, first, tok.pad_token_id)
    kinds = [args.only] if args.only else args.kinds.split(",")
    batches = {k: batches[k] for k in kinds}
    out = w6_ab(model, batches, 1 if args.only else args.reps, args.bf16)
    for name, d in out.items():
        print(name, {k: v for k, v in d.items() if k != "s"})
    if args.only:
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
