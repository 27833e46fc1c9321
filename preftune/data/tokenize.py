"""Records -> token ids: chat template for conversational records, prompt/completion split,
EOS at the end of every completion, truncation that is counted and reported.

A prompt longer than `max_prompt_length` keeps its end, as TRL does: the question and a chat
template's assistant header are at the end, and the answer is scored after them. A prompt that
leaves no room for a completion within `max_length` is an error naming the record (skipped and
counted with `skip_invalid`).

Prompt and completion are tokenized separately and concatenated, so the boundary between
them is exact (no token merges across it) and prompt tokens can be excluded from log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from preftune.data.records import SKIP_HINT
from preftune.data.sources import DataError


@dataclass
class TokenizeStats:
    examples: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    skipped: int = 0  # prompts with no room for a completion, dropped under skip_invalid
    truncated_ids: list = field(default_factory=list)

    def summary(self) -> str | None:
        parts = []
        if self.prompt_truncated or self.completion_truncated:
            parts.append(
                f"truncated {self.prompt_truncated} prompts (kept their end) and "
                f"{self.completion_truncated} completions of {self.examples} examples to fit the "
                f"length budget; raise max_length / max_prompt_length to keep them whole"
            )
        if self.skipped:
            parts.append(
                f"skipped {self.skipped} examples whose prompt leaves no room for a completion "
                f"within max_length"
            )
        return "; ".join(parts) or None


def render_prompt(tokenizer, prompt: str | list[dict]) -> str:
    if isinstance(prompt, str):
        return prompt
    if tokenizer.chat_template is None:
        raise DataError(
            f"conversational records (message lists) need a chat template, and the tokenizer of "
            f"{tokenizer.name_or_path} has none; give prompts and completions as strings, or use "
            f"a model whose tokenizer has a chat template"
        )
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def render_completion(tokenizer, prompt: str | list[dict], completion: str | list[dict]) -> str:
    if isinstance(completion, str):
        return completion
    prompt_text = render_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
    if not full.startswith(prompt_text):
        raise DataError(
            f"the chat template of {tokenizer.name_or_path} renders the prompt differently with "
            f"and without the completion, so prompt and completion cannot be told apart; give "
            f"them as strings"
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
    where: str,
) -> tuple[list[int], list[list[int]]]:
    if len(p) > max_prompt_length:
        p = p[-max_prompt_length:]
        stats.prompt_truncated += 1
    budget = max_length - len(p)
    if budget < 1:
        raise DataError(
            f"{where}: the prompt is {len(p)} tokens, which leaves no room for a completion within "
            f"max_length={max_length}; raise max_length, or set max_prompt_length below it "
            f"(longer prompts are then cut, keeping their end)"
        )
    out = []
    cut = False
    for c in comps:
        if len(c) > budget:
            c, cut = c[:budget], True
        out.append(c)
    stats.completion_truncated += cut
    return p, out


def _tokenize(r: dict, i: int, tokenizer, max_length, max_prompt_length, stats, where) -> dict:
    p = prompt_ids(tokenizer, r["prompt"])
    if "completion" in r:
        c = completion_ids(tokenizer, r["prompt"], r["completion"])
        p, (c,) = _fit(p, [c], max_length, max_prompt_length, stats, where)
        return {"prompt_ids": p, "completion_ids": c, "label": bool(r["label"]), "index": i}
    chosen = completion_ids(tokenizer, r["prompt"], r["chosen"])
    rejected = completion_ids(tokenizer, r["prompt"], r["rejected"])
    p, (chosen, rejected) = _fit(p, [chosen, rejected], max_length, max_prompt_length, stats, where)
    ex = {"prompt_ids": p, "chosen_ids": chosen, "rejected_ids": rejected, "index": i}
    if "margin" in r:
        ex["margin"] = r["margin"]
    return ex


def tokenize_records(
    records: list[dict],
    tokenizer,
    max_length: int = 512,
    max_prompt_length: int = 256,
    where: list[str] | None = None,
    skip_invalid: bool = False,
) -> tuple[list[dict], TokenizeStats]:
    """Paired records -> {prompt_ids, chosen_ids, rejected_ids}; unpaired -> {prompt_ids,
    completion_ids, label}; `index` is the example's position in the returned list. Returns the examples
    and the counts of what was cut or skipped. `where` names each record in errors (file:line).
    """
    stats = TokenizeStats()
    out = []
    for i, r in enumerate(records):
        stats.examples += 1
        place = where[i] if where else f"record {i}"
        try:
            ex = _tokenize(r, len(out), tokenizer, max_length, max_prompt_length, stats, place)
        except DataError as e:
            if not str(e).startswith(place):  # the tokenizer's fault, the same for every record
                raise DataError(f"{place}: {e}") from None
            if not skip_invalid:
                raise DataError(f"{e}; {SKIP_HINT}") from None
            stats.skipped += 1
            continue
        out.append(ex)
    return out, stats
