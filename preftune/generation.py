"""Batched sampling for the online methods: Hugging Face `generate` on CPU/GPU, vLLM on GPU.

Online DPO (METHODS.md §13) samples two completions per prompt from the current policy, RSO
(§4) samples N candidates from the SFT policy, ReMax (§14) one sample plus the greedy decode.
All three go through a `GenerationEngine`: `generate(prompts, cfg) -> list[Completion]`.

Conventions (as in TRL `OnlineDPOTrainer` and `liziniu/ReMax` `_generate_sequence`):
- prompts are already chat-templated strings, tokenized with `add_special_tokens=False`;
- batched prompts are left-padded so every row's new tokens start at the same column;
- a completion keeps its tokens up to and including the first EOS and nothing after (TRL
  `truncate_right`); one that reaches `max_new_tokens` without EOS has `has_eos=False`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from preftune.compiling import eager
from preftune.layouts import shared_prefix_length
from preftune.logps import cache_argument
from preftune.prepacked import prepacked_linears


@dataclass(frozen=True)
class SamplingConfig:
    """What to sample; a small stand-in for `transformers.GenerationConfig`.

    `top_k=0` and `top_p=1.0` switch those filters off. Defaults follow TRL
    `OnlineDPOConfig` (temperature 0.9, max_new_tokens 64). RSO's paper uses temperature 0.7,
    top_k 40; ReMax samples with top_p 0.9, temperature 1.0 and takes `greedy()` as baseline.
    """

    temperature: float = 0.9
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    do_sample: bool = True
    num_return_sequences: int = 1

    def __post_init__(self):
        problems = []
        if self.do_sample and not self.temperature > 0:
            problems.append(f"temperature={self.temperature} must be > 0 when sampling")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.num_return_sequences < 1:
            problems.append(f"num_return_sequences={self.num_return_sequences} must be >= 1")
        if not self.do_sample and self.num_return_sequences > 1:
            problems.append(
                "greedy decoding (do_sample=False) gives one sequence per prompt; "
                "set num_return_sequences=1 or do_sample=True"
            )
        if problems:
            raise ValueError("SamplingConfig: " + "; ".join(problems))

    def greedy(self) -> SamplingConfig:
        """The same budget decoded greedily, one sequence per prompt (ReMax's baseline)."""
        return dataclasses.replace(self, do_sample=False, num_return_sequences=1)


@dataclass
class Completion:
    """One generated completion. Engines return them prompt-major: the
    `num_return_sequences` samples of prompt 0, then those of prompt 1, ..."""

    text: str  # decoded token_ids, special tokens (the EOS) skipped
    token_ids: list[int]  # completion tokens up to and including the first EOS
    has_eos: bool  # False when max_new_tokens was reached first
    prompt_index: int  # position of its prompt in the `prompts` list
    prompt_token_ids: list[int]  # the prompt as tokenized for generation (no padding)


@runtime_checkable
class GenerationEngine(Protocol):
    def generate(self, prompts: list[str], cfg: SamplingConfig) -> list[Completion]: ...


def truncate_at_eos(
    token_ids: Sequence[int], eos_token_ids: Sequence[int]
) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first EOS; `(kept, has_eos)`.

    Everything after the first EOS is padding (or, with pad == eos, more EOS ids), so this
    is also correct when the pad id equals the EOS id (TRL `truncate_right`).
    """
    eos = set(eos_token_ids)
    for i, tok in enumerate(token_ids):
        if tok in eos:
            return list(token_ids[: i + 1]), True
    return list(token_ids), False


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (chat models often stop
    on an end-of-turn token listed only there), in a stable order. `model` may also be a
    config object carrying `eos_token_id` itself."""
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None) or model
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(gen_cfg, "eos_token_id", None)):
        for tok in value if isinstance(value, (list, tuple)) else [value]:
            if tok is not None and int(tok) not in ids:
                ids.append(int(tok))
    if not ids:
        raise ValueError(
            "generation needs an EOS token id: neither the tokenizer nor "
            "model.generation_config defines eos_token_id; set tokenizer.eos_token"
        )
    return ids


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def _hf_kwargs(cfg: SamplingConfig, eos: list[int], pad_id: int) -> dict:
    kwargs = dict(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=cfg.do_sample,
        num_return_sequences=cfg.num_return_sequences,
        eos_token_id=eos,
        pad_token_id=pad_id,
        use_cache=True,
        # transformers syncs every token over processes when it sees FSDP layers; preftune
        # generates on whole (gathered) weights, on one process or each on its own prompts
        synced_gpus=False,
    )  # KV cache: each step costs one token
    if cfg.do_sample:  # passed explicitly so the model's generation_config defaults don't leak in
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    return kwargs


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    cfg: SamplingConfig,
    batch_size: int | None = None,
) -> list[Completion]:
    """Sample completions for chat-templated `prompts` with `model.generate` (KV cache on).

    Rows are left-padded; `batch_size` prompts go through one `generate` call (all of them
    when None). Sampling draws from torch's global RNG: seed it (`torch.manual_seed`) for
    reproducible samples. The model is put in eval mode under `no_grad` and its previous mode
    restored; the returned token ids carry no graph, so log-probs must be recomputed with
    gradient by the trainer (METHODS.md §13 (d)).
    """
    if isinstance(prompts, str):
        raise TypeError("generate expects a list of prompt strings, got one str; wrap it in [ ]")
    if not prompts:
        return []
    eos = eos_token_ids(model, tokenizer)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = eos[0] if pad_id is None else pad_id
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    empty = [i for i, row in enumerate(encoded) if not row]
    if empty:
        raise ValueError(f"prompts at indices {empty} tokenize to nothing; nothing to condition on")
    step = batch_size or len(prompts)
    was_training = model.training
    model.eval()
    out: list[Completion] = []
    # compile=true: decoding with a KV cache stays uncompiled; on CPU the linear layers run on
    # weights prepacked for oneDNN (preftune/prepacked.py), packed once for the call
    hint = min(step, len(prompts)) * cfg.num_return_sequences
    try:
        with eager(), prepacked_linears([model], hint):
            for start in range(0, len(prompts), step):
                rows = encoded[start : start + step]
                new = _generate_rows(model, rows, cfg, eos, pad_id)
                for j, toks in enumerate(new):
                    local = j // cfg.num_return_sequences  # HF repeats each prompt n times
                    kept, has_eos = truncate_at_eos(toks, eos)
                    text = tokenizer.decode(kept, skip_special_tokens=True)
                    out.append(Completion(text, kept, has_eos, start + local, list(rows[local])))
    finally:
        model.train(was_training)
    return out


def last_logits_only(model: Any) -> dict:
    """`{"logits_to_keep": 1}` where the model's forward takes it, else `{}`: a prefill whose
    logits are not read (or only its last position's) skips the LM head on the other positions,
    at 8 prompts of 13 tokens as much work as a decode step (tokens unchanged: those logits
    are never read)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return _last_logits_only(type(base))


@functools.cache
def _last_logits_only(cls: type) -> dict:
    return (
        {"logits_to_keep": 1}
        if "logits_to_keep" in inspect.signature(cls.forward).parameters
        else {}
    )


def _mid_pad(rows: list[list[int]], prefix: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[shared prefix | padding | own suffix]: the prefix sits at the same columns in every row,
    so its KV cache can be computed once; masked padding keeps each row's positions intact."""
    ids, mask = _left_pad([r[prefix:] for r in rows], pad_id)
    head = torch.tensor(rows[0][:prefix], dtype=torch.long).expand(len(rows), prefix)
    return torch.cat([head, ids], 1), torch.cat([torch.ones_like(head), mask], 1)


@torch.no_grad()
def _generate_rows(
    model: Any, rows: list[list[int]], cfg: SamplingConfig, eos: list[int], pad_id: int
) -> list[list[int]]:
    """New tokens of one `generate` call, `len(rows) * n` lists, prompt-major.

    The prompts' KV cache is built before `generate` and handed to it, so that
    - chat prompts sharing a long head (system prompt, turn markers: every row starts with the
      same >= MIN_SHARED_PREFIX tokens) run that head once at batch size 1, its cache repeated
      over the batch;
    - the n = `num_return_sequences` samples of a prompt share one prefill: the cache of the
      prompts (all but their last token) is repeated n times, where `generate` alone would
      prefill n copies of every prompt.
    The tokens are those of a plain left-padded call under the same seed (tested)."""
    device = next(model.parameters()).device
    prefix = shared_prefix_length(rows)  # the training engine's rule: >= 2 rows, >= MIN tokens
    n = cfg.num_return_sequences
    kwargs = _hf_kwargs(cfg, eos, pad_id)
    ids, mask = _mid_pad(rows, prefix, pad_id) if prefix else _left_pad(rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    name = cache_argument(model)  # generate takes the name its model's forward takes
    last = last_logits_only(model)  # the prefills' logits are not read
    cache, done = None, 0
    if prefix:
        cache = getattr(model(input_ids=ids[:1, :prefix], use_cache=True, **last), name)
        cache.batch_repeat_interleave(len(rows))
        done = prefix
    if n > 1 and ids.shape[1] - 1 > done:  # prefill the rest once (generate feeds the last token)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        more = {name: cache} if cache is not None else {}
        out = model(
            input_ids=ids[:, done:-1],
            attention_mask=mask[:, :-1],
            position_ids=pos[:, done:-1],
            use_cache=True,
            **more,
            **last,
        )
        cache = getattr(out, name)
    if cache is not None and n > 1:
        cache.batch_repeat_interleave(n)
        ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        kwargs["num_return_sequences"] = 1
    if cache is not None:
        kwargs[name] = cache
    seqs = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return seqs[:, ids.shape[1] :].tolist()


class HFEngine:
    """`GenerationEngine` over a transformers model; it shares the policy's weights, so samples
    always come from the current policy (no weight sync needed)."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def generate(self, prompts: list[str], cfg: SamplingConfig) -> list[Completion]:
        return generate(self.model, self.tokenizer, prompts, cfg, batch_size=self.batch_size)


class VLLMEngine:
    """`GenerationEngine` over vLLM, for GPU machines. Not exercised by the CPU test suite.

    vLLM holds its own copy of the weights: an online loop must call `load_weights(policy)`
    after every optimizer step so samples come from the current policy (METHODS.md §13 (d)).
    """

    def __init__(self, model: str, tokenizer: Any = None, **llm_kwargs: Any):
        try:
            import vllm
        except ImportError as e:
            raise ImportError(
                "VLLMEngine needs the 'vllm' package, which is not installed. On a CUDA "
                "machine: python -m pip install vllm. Without a GPU use HFEngine (the default)."
            ) from e
        self._vllm = vllm
        self.llm = vllm.LLM(model=model, **llm_kwargs)
        self.tokenizer = tokenizer if tokenizer is not None else self.llm.get_tokenizer()

    def generate(self, prompts: list[str], cfg: SamplingConfig) -> list[Completion]:
        eos = eos_token_ids(self.llm.llm_engine.model_config.hf_config, self.tokenizer)
        encoded = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        requests = [{"prompt_token_ids": row} for row in encoded]
        params = self._vllm.SamplingParams(
            n=cfg.num_return_sequences,
            max_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature if cfg.do_sample else 0.0,
            top_p=cfg.top_p if cfg.do_sample else 1.0,
            top_k=(cfg.top_k or -1) if cfg.do_sample else -1,
            stop_token_ids=eos,
        )
        out = []
        for i, result in enumerate(self.llm.generate(requests, params, use_tqdm=False)):
            for sample in result.outputs:
                kept, has_eos = truncate_at_eos(list(sample.token_ids), eos)
                out.append(
                    Completion(
                        self.tokenizer.decode(kept, skip_special_tokens=True),
                        kept,
                        has_eos,
                        i,
                        list(encoded[i]),
                    )
                )
        return out

    def load_weights(self, model: torch.nn.Module) -> None:
        """Copy the policy's weights into vLLM. Uses the in-process worker path that TRL
        (<= v0.24) uses; vLLM versions that run workers in other processes need their RPC."""
        try:
            runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        except AttributeError as e:
            raise NotImplementedError(
                f"this vLLM ({getattr(self._vllm, '__version__', '?')}) has no in-process "
                "driver worker; sync weights through its collective_rpc API instead"
            ) from e
        runner.model.load_weights(model.state_dict().items())
