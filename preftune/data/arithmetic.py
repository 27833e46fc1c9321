"""The bundled arithmetic preference set: a real task with an exact-answer verifier.

Prompts ask for the sum of two 2-digit numbers ("What is 47 + 38?") as a chat message.
The answer the verifier reads is the *last integer* in the completion, so "47 + 38 = 85" and
"85" are both right; a completion cut off by the decoding budget before its answer is wrong.

Two kinds of pairs, both studied by the literature:
- ``edit``: rejected differs from chosen in one digit of the answer (low edit distance — the
  setting where DPO lowers the chosen log-prob, which DPOP fixes);
- ``onpolicy``: rejected is the default model's own wrong greedy answer; chosen is correct.

Train and test prompts are disjoint (a, b) pairs drawn from one seeded shuffle, so the held-out
split measures generalisation, not memorisation. ``build_*`` functions are deterministic.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable
from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "bundled"
PROMPT_TEMPLATE = "What is {a} + {b}?"
_PROMPT_RE = re.compile(r"What is (-?\d+) \+ (-?\d+)\?")
_INT_RE = re.compile(r"-?\d+")
SEED = 1234
N_TEST = 256


def all_problems(seed: int = SEED) -> list[tuple[int, int]]:
    """Every (a, b) with 10 <= a, b <= 99, in one seeded order; the first N_TEST are the test split."""
    probs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(probs)
    return probs


def split_problems(
    seed: int = SEED, n_test: int = N_TEST
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    probs = all_problems(seed)
    return probs[n_test:], probs[:n_test]


def prompt_messages(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": PROMPT_TEMPLATE.format(a=a, b=b)}]


def correct_completion(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}"


def extract_answer(completion: str) -> int | None:
    nums = _INT_RE.findall(completion.replace(",", ""))
    return int(nums[-1]) if nums else None


def parse_prompt(prompt: str | list[dict]) -> tuple[int, int]:
    text = (
        prompt
        if isinstance(prompt, str)
        else " ".join(m["content"] for m in prompt if m["role"] == "user")
    )
    m = _PROMPT_RE.search(text)
    if m is None:
        raise ValueError(f"not an arithmetic prompt: {text[:80]!r}")
    return int(m.group(1)), int(m.group(2))


def verify(prompt: str | list[dict], completion: str) -> bool:
    """Exact-answer check: the last integer of `completion` equals a + b of the prompt."""
    a, b = parse_prompt(prompt)
    return extract_answer(completion) == a + b


def one_digit_off(n: int, rng: random.Random) -> int:
    """`n` with exactly one digit changed (never a leading zero)."""
    digits = list(str(n))
    i = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0")]
    digits[i] = rng.choice(choices)
    return int("".join(digits))


def build_edit_pairs(problems: Iterable[tuple[int, int]], seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for a, b in problems:
        wrong = one_digit_off(a + b, rng)
        rows.append(
            {
                "prompt": prompt_messages(a, b),
                "chosen": [{"role": "assistant", "content": correct_completion(a, b)}],
                "rejected": [{"role": "assistant", "content": f"{a} + {b} = {wrong}"}],
                "kind": "edit",
            }
        )
    return rows


def build_onpolicy_pairs(
    problems: list[tuple[int, int]],
    generate: Callable[[list[list[dict]]], list[str]],
    limit: int,
    seed: int = SEED,
) -> list[dict]:
    """Pairs whose rejected side is the model's own wrong answer (greedy); problems it gets
    right are skipped, and counted in the returned rows' absence. Stops after `limit` pairs."""
    rows: list[dict] = []
    batch = 64
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        outs = generate([prompt_messages(a, b) for a, b in chunk])
        for (a, b), text in zip(chunk, outs):
            if extract_answer(text) == a + b or not text.strip():
                continue
            rows.append(
                {
                    "prompt": prompt_messages(a, b),
                    "chosen": [{"role": "assistant", "content": correct_completion(a, b)}],
                    "rejected": [{"role": "assistant", "content": text.strip()}],
                    "kind": "onpolicy",
                }
            )
            if len(rows) >= limit:
                return rows
    return rows


def test_prompts(seed: int = SEED, n_test: int = N_TEST) -> list[dict]:
    """Held-out problems as records {prompt, answer}; never used to build training pairs."""
    _, test = split_problems(seed, n_test)
    return [{"prompt": prompt_messages(a, b), "answer": a + b} for a, b in test]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def bundled_path(name: str) -> Path:
    """'onpolicy' | 'edit' | 'test' -> the JSONL file shipped inside the package."""
    path = BUNDLED_DIR / f"arithmetic_{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; rebuild it with: preftune data arithmetic")
    return path
