"""`preftune data arithmetic`: rebuild the bundled arithmetic set deterministically.

The edit-distance pairs and the test split need nothing. The on-policy pairs need the default
model: its greedy answers (same decoding budget as evaluation) to training prompts, kept where
the verifier says they are wrong. Greedy decoding on the same weights and torch build gives the
same text, so the rebuild reproduces the shipped file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from preftune.data import arithmetic
from preftune.evaluate import greedy_completions
from preftune.models import load_causal_lm, load_tokenizer

N_EDIT = 2048
N_ONPOLICY = 1024
ONPOLICY_MAX_NEW_TOKENS = 16  # the evaluation budget: rejections are what evaluation would see


def build_arithmetic(
    out: str | Path | None = None, onpolicy: bool = True, model: str = "default"
) -> dict[str, Path]:
    out = Path(out) if out else arithmetic.BUNDLED_DIR
    train, _ = arithmetic.split_problems()
    paths = {"edit": out / "arithmetic_edit.jsonl", "test": out / "arithmetic_test.jsonl"}
    arithmetic.write_jsonl(arithmetic.build_edit_pairs(train[:N_EDIT]), paths["edit"])
    arithmetic.write_jsonl(arithmetic.test_prompts(), paths["test"])
    print(f"[preftune] wrote {paths['edit']} and {paths['test']}")
    if onpolicy:
        tok = load_tokenizer(model)
        lm = load_causal_lm(model).eval()
        torch.manual_seed(0)

        def generate(prompts):
            return greedy_completions(lm, tok, prompts, ONPOLICY_MAX_NEW_TOKENS, batch_size=64)

        # on-policy pairs come from the problems after the edit set's, so the two kinds never share a prompt
        rows = arithmetic.build_onpolicy_pairs(train[N_EDIT:], generate, limit=N_ONPOLICY)
        paths["onpolicy"] = out / "arithmetic_onpolicy.jsonl"
        arithmetic.write_jsonl(rows, paths["onpolicy"])
        print(f"[preftune] wrote {len(rows)} on-policy pairs to {paths['onpolicy']}")
    return paths
