"""Evaluation: task accuracy on a verifiable task (greedy decoding, exact answer)."""

from __future__ import annotations

from collections.abc import Callable

from tqdm.auto import tqdm

from preftune.data.tokenize import render_prompt


def greedy_completions(model, tokenizer, prompts: list, max_new_tokens: int = 16, batch_size: int = 64,
                       desc: str | None = None, quiet: bool = False) -> list[str]:
    """Greedy decode each prompt (a string or a message list) with a KV cache, in batches."""
    from preftune.generation import SamplingConfig, generate

    cfg = SamplingConfig(max_new_tokens=max_new_tokens).greedy()
    texts = [render_prompt(tokenizer, p) for p in prompts]
    out: list[str] = []
    for s in tqdm(range(0, len(texts), batch_size), desc=desc, disable=quiet or desc is None, leave=False):
        out += [c.text for c in generate(model, tokenizer, texts[s:s + batch_size], cfg)]
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
