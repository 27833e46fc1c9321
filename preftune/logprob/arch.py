"""What the engine needs to know about a model's architecture: where its decoder and LM head
are, which kinds of token-mixing layer it has, its sliding window, its KV-cache argument, the
mask form its attention implementation takes, and the dtype autocast computes in."""

from __future__ import annotations

import functools
import inspect

import torch

from preftune.compiling import compiled


def split_causal_lm(model):
    """(decoder that returns hidden states, lm_head, logit post-processing) of a causal LM."""
    base = (
        model.get_base_model() if hasattr(model, "get_base_model") else model
    )  # peft keeps LoRA layers inside
    decoder = (
        base.get_decoder()
        if hasattr(base, "get_decoder")
        else getattr(base, base.base_model_prefix)
    )
    head = base.get_output_embeddings()
    cfg = base.config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logits_scaling", None)
    return decoder, head, softcap, scale


def checkpointing(decoder) -> bool:
    """Whether the decoder's layers recompute in backward: transformers then drops any KV cache
    passed to them, so a shared prefix must be laid out in the rows instead."""
    return decoder.training and any(
        getattr(m, "gradient_checkpointing", False) for m in decoder.modules()
    )


def compiled_layers(decoder) -> bool:
    """Whether any of the decoder's modules runs a compiled call (`compile=true`,
    preftune/compiling.py). A KV cache passed into compiled layers is guarded on each layer's
    index (an integer attribute, static to torch.compile), so every layer would compile its
    own graph: the shared prefix is laid out or folded instead."""
    return any(compiled(m) for m in decoder.modules())


def model_mask(model, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean 4-D mask as the model's attention implementation wants it: SDPA and flex take
    booleans; eager adds the mask to the scores, so it gets 0 / the dtype's minimum."""
    if mask is None or mask.dim() != 4 or mask.dtype != torch.bool:
        return mask
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    return mask


def compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled("cpu") and weight_dtype == torch.float32:
        return torch.get_autocast_dtype("cpu")
    return weight_dtype


def sliding_window(cfg) -> tuple[int | None, bool]:
    """(w, mixed) for a model whose layers, all or some, attend to the last w keys only: `mixed`
    when `layer_types` also has full-attention layers (Qwen2 with max_window_layers, Gemma 2/3).
    (None, False) when every layer sees the whole sequence."""
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return None, False
    types = getattr(cfg, "layer_types", None)
    if types is None:  # Mistral: every layer slides
        return window, False
    if "sliding_attention" not in types:
        return None, False
    return window, "full_attention" in types


ATTENTION_LAYERS = {"full_attention", "sliding_attention"}

_RECURRENT_MODEL_TYPES = ("mamba", "rwkv", "recurrent", "xlstm", "lfm", "jamba", "bamba")


def token_mixers(cfg) -> set[str]:
    """The kinds of token-mixing layer a model config declares: its `layer_types` (Qwen3-Next's
    linear_attention, LFM2's conv, RecurrentGemma's recurrent ...) or Jamba/Bamba's
    `layers_block_type`; a recurrent model type with neither is its own kind; anything else is
    taken as attention everywhere."""
    kinds = getattr(cfg, "layer_types", None) or getattr(cfg, "layers_block_type", None)
    if kinds:
        return set(kinds)
    model_type = str(getattr(cfg, "model_type", ""))
    if any(k in model_type for k in _RECURRENT_MODEL_TYPES):
        return {model_type}
    return {"full_attention"}


def attention_only(cfg) -> bool:
    """Whether attention (under the mask the engine passes) is the only way tokens of a row see
    each other: what the shared-prompt, packed and folded layouts rely on. Convolution,
    recurrent and state-space layers read whole rows in order, whatever the mask says."""
    return token_mixers(cfg) <= ATTENTION_LAYERS


def cache_argument(model: torch.nn.Module) -> str:
    """The name of a model's KV-cache argument and output field: `cache` where transformers has
    renamed it (the old name warns there, and goes in 5.40), `past_key_values` before that."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return _cache_argument(type(base))


@functools.cache
def _cache_argument(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"
