"""Evaluation: task accuracy on a verifiable task (greedy decoding, exact answer)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from preftune.data.tokenize import render_prompt


@torch.no_grad()
def greedy_completions(
    model,
    tokenizer,
    prompts: list,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    desc: str | None = None,
    quiet: bool = False,
) -> list[str]:
    """Greedy decode each prompt (a string or a message list) with a KV cache; left-padded batches."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts = [render_prompt(tokenizer, p) for p in prompts]
    out: list[str] = []
    try:
        for s in tqdm(
            range(0, len(texts), batch_size), desc=desc, disable=quiet or desc is None, leave=False
        ):
            chunk = texts[s : s + batch_size]
            add_special = not isinstance(prompts[s], list)
            enc = tokenizer(
                chunk, return_tensors="pt", padding=True, add_special_tokens=add_special
            )
            enc = {k: v.to(model.device) for k, v in enc.items()}
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                top_p=None,
                top_k=None,
                temperature=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            out += tokenizer.batch_decode(
                gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def task_accuracy(
    model,
    tokenizer,
    problems: list[dict],
    verify: Callable[[object, str], bool],
    max_new_tokens: int = 16,
    batch_size: int = 64,
    desc: str | None = None,
    quiet: bool = False,
) -> tuple[float, list[dict]]:
    """Fraction of `problems` ({prompt, ...}) whose greedy completion `verify` accepts, and samples."""
    comps = greedy_completions(
        model,
        tokenizer,
        [p["prompt"] for p in problems],
        max_new_tokens,
        batch_size,
        desc=desc,
        quiet=quiet,
    )
    results = [
        {"prompt": p["prompt"], "completion": c, "correct": bool(verify(p["prompt"], c))}
        for p, c in zip(problems, comps)
    ]
    return sum(r["correct"] for r in results) / max(len(results), 1), results
