"""Prompts for the online methods, read from the same data sources as `preftune train`.

Online DPO (METHODS.md §13), RSO (§4) and ReMax (§14) only need prompts: they generate the
completions themselves. Any record kind gives one — paired `{prompt, chosen, rejected}` (also
with an implicit prompt), unpaired `{prompt, completion, label}`, or prompt-only `{prompt}` —
as a string or a message list. Paired records additionally give held-out preference pairs for
the `eval/` metrics, split off exactly as `preftune train` does (`num_eval` records, at most a
fifth, drawn at random by `seed`; the bundled sets' last ones), and their prompts are never
trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from preftune.config import Config
from preftune.data.records import SKIP_HINT, DataError, _check_text, validate_record
from preftune.data.sources import BUNDLED, read_items
from preftune.data.split import split_records, train_limit
from preftune.data.tokenize import render_prompt


@dataclass
class PromptSet:
    """Training prompts (deduplicated, in file order) and held-out pairs (canonical records)."""

    prompts: list[dict]  # {"prompt": raw prompt, "text": chat-templated string, "num_tokens": int}
    eval_records: list[dict]
    notes: list[str] = field(default_factory=list)


def read_prompt_records(
    source: str | Path | list, skip_invalid: bool = False, key: str = "data"
) -> tuple[list, list[dict], int]:
    """(prompts of every record, canonical paired records) of `source`; errors name the line."""
    if isinstance(source, list):
        name, items = "<list>", [(f"record {i}", r) for i, r in enumerate(source)]
    else:
        name, items = read_items(source, key)
    prompts, paired, skipped = [], [], 0
    for where, rec in items:
        try:
            if isinstance(rec, DataError):
                raise rec
            if isinstance(rec, dict) and set(rec) & {"chosen", "rejected", "completion", "label"}:
                canonical = validate_record(rec, where)
                prompts.append(canonical["prompt"])
                if "chosen" in canonical:
                    paired.append(canonical)
                continue
            if not isinstance(rec, dict) or "prompt" not in rec:
                raise DataError(
                    f"{where}: a record needs a 'prompt' (prompt-only records) or "
                    f"'chosen' and 'rejected' (preference pairs)"
                )
            if (why := _check_text(rec["prompt"], "prompt")) is not None or not rec["prompt"]:
                raise DataError(f"{where}: field 'prompt': {why or 'it is empty'}")
            prompts.append(rec["prompt"])
        except DataError as e:
            if not skip_invalid:
                raise DataError(f"{e}; {SKIP_HINT}") from None
            skipped += 1
    if not prompts:
        raise DataError(f"{key}={name}: no records with a prompt; give records with a 'prompt'")
    if paired and len(paired) != len(prompts):
        paired = []  # a mixed file: its pairs are not a held-out split of the prompts
    return prompts, paired, skipped


def load_prompts(cfg: Config, tokenizer) -> PromptSet:
    """The prompts to generate from, and held-out pairs (from `eval_data`, or split off `data`)."""
    d = cfg.data
    prompts, paired, skipped = read_prompt_records(d.data, d.skip_invalid)
    notes = [f"{d.data}: {skipped} invalid records skipped"] if skipped else []
    if d.eval_data:
        _, eval_records, eval_skipped = read_prompt_records(
            d.eval_data, d.skip_invalid, "eval_data"
        )
        if eval_skipped:
            notes.append(f"{d.eval_data}: {eval_skipped} invalid records skipped")
    elif paired:  # the same split as `preftune train`
        split = split_records(len(paired), d.num_eval, None, cfg.train.seed, d.data in BUNDLED)
        eval_records = [paired[i] for i in split.eval]
        prompts = [prompts[i] for i in split.train]
    else:
        eval_records = []
    held_out = {_key(r["prompt"]) for r in eval_records}
    limit = train_limit(d.num_train, d.data in BUNDLED)
    seen: set[str] = set()
    out, too_long = [], 0
    for p in prompts:
        key = _key(p)
        if key in seen or key in held_out:
            continue
        seen.add(key)
        text = _generation_text(tokenizer, p)
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > d.max_prompt_length:
            too_long += 1
            continue
        out.append({"prompt": p, "text": text, "num_tokens": n})
        if limit is not None and len(out) == limit:
            break
    if too_long:
        notes.append(
            f"{too_long} prompts longer than max_prompt_length={d.max_prompt_length} tokens were "
            f"left out (generation needs the whole prompt); raise max_prompt_length to keep them"
        )
    if not out:
        raise DataError(f"{d.data}: no usable prompts left (see the notes above)")
    return PromptSet(out, eval_records, notes)


def _generation_text(tokenizer, prompt) -> str:
    """The string generation tokenizes (without special tokens): the chat template for message
    lists; a string prompt keeps the BOS that `preftune train` tokenization gives it."""
    text = render_prompt(tokenizer, prompt)
    bos = tokenizer.bos_token
    if isinstance(prompt, str) and bos and not text.startswith(bos):
        if tokenizer(text, add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]:
            text = bos + text
    return text


def _key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True)


def user_text(prompt) -> str:
    """A short form of a prompt for logs: the last user message, or the string itself."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else str(prompt[-1]["content"])
