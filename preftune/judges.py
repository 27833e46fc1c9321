"""Judges: score (prompt, completion) pairs for the online methods (online DPO, RSO, ReMax).

A judge is anything with `score(prompts, completions) -> list[float]`, one float per pair.
- `RewardModelJudge`: a saved `AutoModelForSequenceClassification` with one output, read at
  the last real token (METHODS.md §16; as TRL `get_reward` and OpenRLHF `RewardModel`).
- `VerifierJudge`: 1.0 if an exact-answer checker accepts the completion, else 0.0.
- `CallableJudge`: a user function named by an import path, `"mypkg.mymodule:score"`.
`load_judge(spec)` turns a config string into one of them.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from preftune.config import ConfigError
from preftune.data.arithmetic import verify
from preftune.models import check_model_source, load_or_explain
from preftune.reward.loss import pool_last_token

JUDGE_SPECS_HELP = (
    "'verifier' or 'arithmetic' (exact-answer check of the bundled arithmetic task), a local "
    "reward-model directory (containing config.json), or 'module:function' (a Python function "
    "score(prompts, completions) -> list[float] importable from PYTHONPATH)"
)


@runtime_checkable
class Judge(Protocol):
    def score(self, prompts: list[str], completions: list[str]) -> list[float]: ...


def _check_pairs(prompts: Sequence[str], completions: Sequence[str], who: str) -> None:
    if isinstance(prompts, str) or isinstance(completions, str):
        raise TypeError(f"{who}.score expects lists of strings, got a single str")
    if len(prompts) != len(completions):
        raise ValueError(f"{who}.score: {len(prompts)} prompts but {len(completions)} completions")


def _check_scores(scores: Any, n: int, who: str) -> list[float]:
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError) as e:
        raise TypeError(f"{who} must return a list of numbers, got {type(scores).__name__}") from e
    if len(values) != n:
        raise ValueError(f"{who} returned {len(values)} scores for {n} completions")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{who} returned non-finite scores at indices {bad}")
    return values


class RewardModelJudge:
    """Scalar reward model: `r(x, y)` read at the last real token of `prompt + completion`.

    Args:
        path_or_model: a directory written by `save_pretrained` (weights read as
            safetensors, no remote code), or an already loaded sequence-classification model.
        tokenizer: needed when a model object is given; loaded from the directory otherwise.
        batch_size: pairs per forward pass.
        max_length: keep at most this many tokens, dropping from the left so the scored end of
            the completion survives; None keeps everything.

    Prompts are chat-templated strings, so nothing is added: `add_special_tokens=False`.
    Decoder heads (`model.score`, Llama/Qwen/Mistral/GPT-2 style) are applied to every
    position and read at the last attention-mask position, which stays right when
    `pad_token == eos_token` (HF's own pooling reads the last non-pad *id* and skips a trailing
    EOS then). Models without a `score` head use their own pooled logits.
    """

    def __init__(
        self,
        path_or_model: str | Path | torch.nn.Module,
        tokenizer: Any = None,
        batch_size: int = 8,
        max_length: int | None = None,
    ):
        if isinstance(path_or_model, (str, Path)):
            self.model, tokenizer = _load_reward_model(Path(path_or_model), tokenizer)
        else:
            if tokenizer is None:
                raise ValueError(
                    "RewardModelJudge(model) needs tokenizer=...; pass the reward "
                    "model's tokenizer, or pass the model directory instead"
                )
            self.model = path_or_model
        num_labels = getattr(self.model.config, "num_labels", 1)
        if num_labels != 1:
            raise ValueError(
                f"RewardModelJudge needs a single-score head (num_labels=1), this "
                f"model has num_labels={num_labels}"
            )
        if batch_size < 1:
            raise ValueError(f"RewardModelJudge: batch_size must be >= 1, got {batch_size}")
        self.tokenizer, self.batch_size, self.max_length = tokenizer, batch_size, max_length
        self.model.eval()

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        if self.max_length:
            rows = [r[-self.max_length :] for r in rows]
        pad_id = self.tokenizer.pad_token_id
        pad_id = 0 if pad_id is None else pad_id  # masked out; any id works
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: default position ids stay correct
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        _check_pairs(prompts, completions, "RewardModelJudge")
        device = next(self.model.parameters()).device
        out: list[float] = []
        for s in range(0, len(prompts), self.batch_size):
            texts = [
                p + c
                for p, c in zip(
                    prompts[s : s + self.batch_size],
                    completions[s : s + self.batch_size],
                    strict=True,
                )
            ]
            ids, mask = self._encode(texts)
            ids, mask = ids.to(device), mask.to(device)
            head = getattr(self.model, "score", None)
            if isinstance(head, torch.nn.Module):
                hidden = self.model.base_model(input_ids=ids, attention_mask=mask)[0]
                rewards = pool_last_token(head(hidden).squeeze(-1), mask)
            else:
                rewards = self.model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
            out.extend(rewards.float().tolist())
        return out


def _load_reward_model(path: Path, tokenizer: Any):
    check_model_source(str(path), key="judge")
    model = load_or_explain(
        lambda: AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.float32, use_safetensors=True
        ),
        str(path),
        key="judge",
    )
    if tokenizer is None:
        tokenizer = load_or_explain(lambda: AutoTokenizer.from_pretrained(path), str(path), "judge")
    return model, tokenizer


class VerifierJudge:
    """Exact-answer judge: 1.0 when `verify_fn(prompt, completion)` is true, else 0.0.

    The default `verify_fn` is `preftune.data.arithmetic.verify` (the bundled arithmetic
    task).
    """

    def __init__(self, verify_fn: Callable[[str, str], bool] | None = None):
        self.verify_fn = verify_fn or verify

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        _check_pairs(prompts, completions, "VerifierJudge")
        fn = self.verify_fn
        return [1.0 if fn(p, c) else 0.0 for p, c in zip(prompts, completions, strict=True)]


def import_callable(spec: str) -> Callable:
    """`"pkg.module:function"` (or `"pkg.module:Class.attr"`) -> the object, with errors that
    name the part that failed."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(
            f"judge '{spec}' is not an import path; expected 'module:function', "
            f"e.g. 'mypkg.rewards:score'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(
            f"judge '{spec}': could not import module '{module_name}' ({e}); "
            f"install it or add its folder to PYTHONPATH"
        ) from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(
                f"judge '{spec}': '{module_name}' has no attribute "
                f"'{attr_path}'; check the name after the colon"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"judge '{spec}' names a {type(obj).__name__}, not a function")
    return obj


class CallableJudge:
    """A user function `fn(prompts, completions) -> list[float]`, given directly or as an
    import path `"mypkg.mymodule:score"`. Its output is checked: one finite number per pair."""

    def __init__(self, fn: str | Callable[[list[str], list[str]], Sequence[float]]):
        self.name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))
        self.fn = import_callable(fn) if isinstance(fn, str) else fn
        if not callable(self.fn):
            raise TypeError(f"CallableJudge needs a function, got {type(self.fn).__name__}")

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        _check_pairs(prompts, completions, "CallableJudge")
        raw = self.fn(list(prompts), list(completions))
        return _check_scores(raw, len(prompts), f"judge '{self.name}'")


def load_judge(spec: str, batch_size: int = 8) -> Judge:
    """Build a judge from a config string; see `JUDGE_SPECS_HELP` for the accepted forms."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"judge spec must be a non-empty string: {JUDGE_SPECS_HELP}")
    spec = spec.strip()
    if spec.lower() in ("verifier", "arithmetic"):
        return VerifierJudge()
    path = Path(spec).expanduser()
    if path.is_dir():
        return RewardModelJudge(path, batch_size=batch_size)
    if ":" in spec and not path.exists():
        try:
            return CallableJudge(spec)
        except (ImportError, AttributeError, TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None  # each already names the judge and the fix
    if path.exists():
        raise ConfigError(f"judge '{spec}' is a file; a reward model is given as its directory")
    raise ConfigError(
        f"unknown judge '{spec}' (not a directory here either). Use {JUDGE_SPECS_HELP}. Hub ids "
        f"are not downloaded at run time: fetch one with `huggingface-cli download ID "
        f"--local-dir DIR` and pass DIR."
    )
