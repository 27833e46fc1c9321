"""Data and models for the workloads of BENCHMARK.md.

W1 uses the bundled arithmetic set and the embedded default model; W6 the same model on seeded
conversational records with long, unrelated answers. W2 and W3 use seeded synthetic pairs of exact token lengths (words that are one token each, so a completion of
n words is n tokens plus EOS) and small random Llamas written to a temporary directory.

Both tools see the same token ids: the TRL worker tokenizes with preftune's own
`tokenize_records` and hands TRL the ids, so tokenization can never be the difference.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

W1_DATA = "arithmetic_edit"


def default_model() -> str:
    from preftune.models import default_model_dir

    return str(default_model_dir())


def one_token_words(tokenizer, max_id: int, limit: int = 4000) -> list[str]:
    """Lower-case words w whose ' w' is exactly one token with id < max_id (so a random-weight model
    with a vocabulary of max_id sees only ids it has)."""
    words = []
    for i in range(300, min(max_id, len(tokenizer))):
        piece = tokenizer.convert_ids_to_tokens(i)
        if not (piece.startswith("Ġ") and piece[1:].isalpha() and piece[1:].islower()):
            continue
        if tokenizer(" " + piece[1:], add_special_tokens=False)["input_ids"] == [i]:
            words.append(piece[1:])
            if len(words) >= limit:
                break
    return words


def synthetic_pairs(
    tokenizer, n_pairs: int, prompt_len: int, completion_len: int, max_id: int, seed: int = 0
) -> list[dict]:
    """String records: a prompt of `prompt_len` tokens, chosen and rejected of `completion_len`
    tokens each including the EOS that tokenization appends."""
    words = one_token_words(tokenizer, max_id)
    rng = random.Random(seed)
    text = lambda n: "".join(" " + rng.choice(words) for _ in range(n))  # noqa: E731
    return [
        {
            "prompt": text(prompt_len),
            "chosen": text(completion_len - 1),
            "rejected": text(completion_len - 1),
        }
        for _ in range(n_pairs)
    ]


W6_SYSTEM = "You are a helpful assistant. Answer the question in full sentences."


def conversational_pairs(
    tokenizer, n_pairs: int, answer_tokens: tuple[int, int] = (50, 250), seed: int = 0
) -> list[dict]:
    """W6 records, the shape most users bring (UltraFeedback-like): a system + user chat prompt
    and two long answers that share nothing, each of a length drawn uniformly from
    `answer_tokens` (one-token words in sentences of 6-20 words; the chat template adds its
    end-of-turn tokens). Seeded sampling from the tokenizer's own words: no download."""
    words = one_token_words(tokenizer, len(tokenizer))
    rng = random.Random(seed)

    def text(n: int) -> str:
        out, left = [], n
        while left > 0:
            k = min(left, rng.randint(6, 20))
            sentence = [rng.choice(words) for _ in range(k)]
            out.append(" ".join(sentence).capitalize() + ".")
            left -= k
        return " ".join(out)

    def answer() -> list[dict]:
        return [{"role": "assistant", "content": text(rng.randint(*answer_tokens))}]

    return [
        {
            "prompt": [
                {"role": "system", "content": W6_SYSTEM},
                {"role": "user", "content": text(rng.randint(12, 48)).rstrip(".") + "?"},
            ],
            "chosen": answer(),
            "rejected": answer(),
        }
        for _ in range(n_pairs)
    ]


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# Small random models. W2 keeps the default model's layer shape (so the attention / MLP balance
# at each length is the real one) with fewer layers; W3 is tiny so that a 256k head stays cheap.
W2_MODEL = dict(hidden_size=576, intermediate_size=1536, layers=4, heads=9, kv_heads=3)
W3_MODEL = dict(hidden_size=128, intermediate_size=256, layers=2, heads=2, kv_heads=2)


def random_model_dir(
    path: Path,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    layers: int,
    heads: int,
    kv_heads: int,
    seed: int = 0,
) -> Path:
    """A seeded random-weight Llama (tied embeddings, like the default model) with the default
    model's tokenizer; token ids >= vocab_size are never used by the synthetic data."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from preftune.models import disable_dropout, load_tokenizer

    tok = load_tokenizer(default_model())
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    disable_dropout(model)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def dpo_config(model: str, data: str, num_train: int, steps: int, work, name: str, **extra):
    """preftune's config for the benchmark's DPO setting (BENCHMARK.md W1: batch 8, β 0.1, AdamW
    lr 5e-7 constant, clipping at 1.0, no evaluation), as the diagnostic scripts run it."""
    from preftune.config import build_config

    return build_config(
        {
            "model": model,
            "data": data,
            "num_train": num_train,
            "num_eval": 0,
            "num_task_eval": 0,
            "eval_before": False,
            "batch_size": 8,
            "max_steps": steps,
            "lr": 5e-7,
            "beta": 0.1,
            "scheduler": "constant",
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "loss": "dpo",
            "bf16": False,  # the benchmark's precision is explicit (BENCHMARK.md), never auto
            "quiet": True,
            "report_to": "none",
            "output_dir": str(work),
            "run_name": name,
            "seed": 0,
            **extra,
        }
    )


def load_examples(data: str, model: str, num_train: int, max_length: int, max_prompt_length: int):
    """The tokenized training examples exactly as preftune builds them (first `num_train` records)."""
    from preftune.data import arithmetic
    from preftune.data.records import load_records
    from preftune.data.tokenize import tokenize_records
    from preftune.models import load_tokenizer
    from preftune.train.setup import BUNDLED

    source = arithmetic.bundled_path(BUNDLED[data]) if data in BUNDLED else data
    records, _ = load_records(source)
    tok = load_tokenizer(model)
    examples, _ = tokenize_records(records[:num_train], tok, max_length, max_prompt_length)
    return examples, tok


def batch_order(n: int, batch_size: int, seed: int, steps: int) -> list[list[int]]:
    """The batches preftune's trainer takes in its first epoch (same function it uses)."""
    from preftune.train.batches import global_batches

    return global_batches(n, batch_size, seed, 0)[:steps]


def sequence_lengths(examples: list[dict], batches: list[list[int]]) -> tuple[int, list[int]]:
    """(counted tokens, lengths of every sequence fed to the model) over `batches`."""
    counted, seqs = 0, []
    for batch in batches:
        for i in batch:
            e = examples[i]
            p, c, r = len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])
            counted += p + c + r
            seqs += [p + c, p + r]
    return counted, seqs


def diagnostic_trainer(
    workload: str, steps: int, work: str | Path, bf16: bool, overrides: Sequence[str] = ()
):
    """preftune's Trainer on W1's edit pairs or W6's chat pairs (8 pairs a step for `steps`
    steps, data written under `work`), and the order of its batches: what the in-process
    diagnostics (profile_step.py, step_faults.py) run."""
    from preftune.config import build_config
    from preftune.models import load_tokenizer
    from preftune.train.trainer import Trainer

    data = W1_DATA
    if workload == "w6":
        pairs = conversational_pairs(load_tokenizer(default_model()), 8 * steps)
        data = str(write_jsonl(pairs, Path(work) / "w6.jsonl"))
    cfg = dpo_config(default_model(), data, 8 * steps, steps, work, workload, bf16=bf16)
    trainer = Trainer(build_config(cfg, list(overrides)))
    return trainer, batch_order(len(trainer.data.train), 8, 0, steps)
