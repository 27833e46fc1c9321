"""Records -> token ids: chat template for conversational records, prompt/completion split,
EOS at the end of every completion, truncation that is counted and reported.

Prompt and completion are tokenized separately and concatenated, so the boundary between
them is exact (no token merges across it) and prompt tokens can be excluded from log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenizeStats:
    examples: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    truncated_ids: list = field(default_factory=list)

    def summary(self) -> str | None:
        if not (self.prompt_truncated or self.completion_truncated):
            return None
        return (
            f"truncated {self.prompt_truncated} prompts (kept their start) and "
            f"{self.completion_truncated} completions of {self.examples} examples to fit the length budget; "
            f"raise max_length / max_prompt_length to keep them whole"
        )


def render_prompt(tokenizer, prompt: str | list[dict]) -> str:
    if isinstance(prompt, str):
        return prompt
    if tokenizer.chat_template is None:
        raise ValueError(
            "conversational records need a tokenizer with a chat template; "
            "this tokenizer has none (use standard string records or set tokenizer.chat_template)"
        )
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def render_completion(tokenizer, prompt: str | list[dict], completion: str | list[dict]) -> str:
    if isinstance(completion, str):
        return completion
    prompt_text = render_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
    if not full.startswith(prompt_text):
        raise ValueError(
            "the chat template renders the prompt differently with and without the completion; "
            "cannot split prompt from completion for this tokenizer"
        )
    return full[len(prompt_text) :]


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    text = render_prompt(tokenizer, prompt)
    # A chat template already carries its special tokens; a plain string gets the tokenizer's own.
    return tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]


def completion_ids(tokenizer, prompt: str | list[dict], completion: str | list[dict]) -> list[int]:
    """Completion tokens ending with exactly one EOS; template text after the last EOS is dropped."""
    ids = tokenizer(render_completion(tokenizer, prompt, completion), add_special_tokens=False)[
        "input_ids"
    ]
    eos = tokenizer.eos_token_id
    if eos in ids:
        last = len(ids) - 1 - ids[::-1].index(eos)
        ids = ids[: last + 1]
    else:
        ids = ids + [eos]
    return ids


def _fit(
    p: list[int],
    comps: list[list[int]],
    max_length: int,
    max_prompt_length: int,
    stats: TokenizeStats,
) -> tuple[list[int], list[list[int]]]:
    if len(p) > max_prompt_length:
        p = p[:max_prompt_length]
        stats.prompt_truncated += 1
    budget = max_length - len(p)
    if budget < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room for a completion after a "
            f"{len(p)}-token prompt; raise max_length or lower max_prompt_length"
        )
    out = []
    cut = False
    for c in comps:
        if len(c) > budget:
            c, cut = c[:budget], True
        out.append(c)
    stats.completion_truncated += cut
    return p, out


def tokenize_records(
    records: list[dict], tokenizer, max_length: int = 512, max_prompt_length: int = 256
) -> tuple[list[dict], TokenizeStats]:
    """Paired records -> {prompt_ids, chosen_ids, rejected_ids}; unpaired -> {prompt_ids,
    completion_ids, label}. Returns the examples and the truncation counts."""
    stats = TokenizeStats()
    out = []
    for i, r in enumerate(records):
        stats.examples += 1
        p = prompt_ids(tokenizer, r["prompt"])
        if "completion" in r:
            p, (c,) = _fit(
                p,
                [completion_ids(tokenizer, r["prompt"], r["completion"])],
                max_length,
                max_prompt_length,
                stats,
            )
            out.append(
                {"prompt_ids": p, "completion_ids": c, "label": bool(r["label"]), "index": i}
            )
            continue
        chosen = completion_ids(tokenizer, r["prompt"], r["chosen"])
        rejected = completion_ids(tokenizer, r["prompt"], r["rejected"])
        p, (chosen, rejected) = _fit(p, [chosen, rejected], max_length, max_prompt_length, stats)
        ex = {"prompt_ids": p, "chosen_ids": chosen, "rejected_ids": rejected, "index": i}
        if "margin" in r:
            ex["margin"] = r["margin"]
        out.append(ex)
    return out, stats
