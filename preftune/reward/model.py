"""A scalar reward model: `AutoModelForSequenceClassification` with one label, read at the last
real token (METHODS.md §16 (a), (d)).

We run the backbone and the score head ourselves and pool with `pool_last_token`, which reads
the attention mask only. Hugging Face's own pooling picks the last token that is not
`pad_token_id`, which lands on the wrong token when `pad_token == eos_token` (the EOS that ends
a completion is skipped) and needs `config.pad_token_id` at all; we still set it, so the saved
model also works with plain transformers pipelines.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification

from preftune.models import disable_dropout, load_or_explain, resolve_model_path
from preftune.reward.loss import pool_last_token


def load_reward_model(
    name_or_path: str,
    pad_token_id: int | None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
):
    """A causal-LM base (or an existing reward model) with a fresh 1-output score head."""
    path = resolve_model_path(name_or_path, trust_remote_code)
    model = load_or_explain(
        lambda: AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=1,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        ),
        name_or_path,
    )
    model.config.pad_token_id = pad_token_id
    disable_dropout(model)
    return model


def _backbone_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None)  # decoder reward heads (Llama, Qwen, Mistral, GPT-2)
    if not isinstance(head, torch.nn.Module):
        return None, None
    return getattr(base, base.base_model_prefix), head


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`(B,)` rewards r(x, y): the score head on every position, read at the last real token
    (right or left padding alike). Heads that pool internally (encoders) use their logits."""
    backbone, head = _backbone_and_head(model)
    if head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    scores = head(hidden).squeeze(-1).float()  # (B, T): one linear map, cheap at every position
    return pool_last_token(scores, attention_mask)


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `(B, T)` ids and attention mask; default position ids stay correct."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask
