"""Where reference log-probs come from: a frozen copy, the LoRA model with its adapter off,
a precomputed on-disk cache, or nowhere (reference-free losses).

Every mode answers the same question — the reference's summed completion log-probs for a
TokenBatch — so the loop never asks which mode it is in. TDPO also needs the reference's
hidden states (its full next-token distributions), which only model-backed modes can give.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from preftune.errors import ConfigError
from preftune.layouts import TokenBatch
from preftune.logps import hidden_at_targets, sequence_logps
from preftune.train.offload import offloaded_copy

CACHE_VERSION = "preftune-refcache-1"  # bump when log-prob code changes what it computes


def choose_mode(
    requested: str, *, needs_reference: bool, needs_model: bool, lora: bool
) -> tuple[str, str]:
    """(mode, why). `needs_model`: the loss needs more than cached scalars (TDPO's KL, KTO's KL pairs)."""
    if not needs_reference:
        if requested not in ("auto", "none"):
            return "none", f"the loss needs no reference (reference={requested} ignored)"
        return "none", "the loss is reference-free: no reference model is loaded"
    if requested == "none":
        raise ConfigError(
            "reference=none, but this loss needs a reference; use auto, frozen, lora or precompute"
        )
    if requested == "precompute" and needs_model:
        raise ConfigError(
            "reference=precompute cannot serve this loss: it needs the reference model itself "
            "(full next-token distributions or on-the-fly KL pairs); use frozen or lora"
        )
    if requested != "auto":
        return requested, "as configured"
    if needs_model:
        return (
            ("lora", "LoRA run: adapter disabled = reference, one set of base weights")
            if lora
            else ("frozen", "the loss needs the reference model's distributions: a frozen copy")
        )
    return (
        "precompute",
        "reference log-probs computed once before training and cached on disk (no second model in memory)",
    )


class ModelReference:
    """A frozen deep copy, or the policy's own base weights with the LoRA adapter disabled.
    `offload_to`: the folder the frozen copy's decoder layers are kept in
    (`reference_offload=disk`, preftune/train/offload.py)."""

    def __init__(self, policy, mode: str, chunk_size: int, offload_to: Path | None = None):
        self.mode = mode
        self.chunk_size = chunk_size
        if mode == "frozen" and offload_to is not None:
            self.model = offloaded_copy(policy, offload_to)
        elif mode == "frozen":
            self.model = copy.deepcopy(policy).eval()
            self.model.requires_grad_(False)
        else:
            self.model = policy  # a peft model

    def _ctx(self):
        return self.model.disable_adapter() if self.mode == "lora" else contextlib.nullcontext()

    @torch.no_grad()
    def logps(self, batch: TokenBatch, keys=None) -> torch.Tensor:
        with self._ctx():
            return sequence_logps(self.model, batch, self.chunk_size)

    @torch.no_grad()
    def hidden(self, batch: TokenBatch) -> torch.Tensor:
        with self._ctx():
            return hidden_at_targets(self.model, batch)

    def head_model(self):
        return self.model


class CachedReference:
    """Reference log-probs looked up by (example index, side) from a precomputed table."""

    mode = "precompute"

    def __init__(self, table: dict[str, torch.Tensor]):
        self.chosen = table["chosen"]
        self.rejected = table["rejected"]

    def logps(self, batch: TokenBatch, keys: tuple[torch.Tensor, int]) -> torch.Tensor:
        index, _ = keys
        return torch.cat([self.chosen[index], self.rejected[index]])


def cache_key(model_path: str, examples: list[dict], settings: dict) -> str:
    """Hash of everything the cached numbers depend on: weights, token ids, settings, code version."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    path = Path(model_path)
    weights = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    for w in weights:  # name, size and mtime are a cheap, reliable proxy for the bytes
        st = w.stat()
        h.update(f"{w.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    if not weights:
        h.update(str(model_path).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for ex in examples:
        h.update(json.dumps([ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]]).encode())
    return h.hexdigest()[:24]


def load_or_compute_cache(path: Path, compute) -> tuple[dict[str, torch.Tensor], bool]:
    """(table, reused). `compute()` returns the table; written atomically next to `path`."""
    if path.exists():
        return load_file(str(path)), True
    table = compute()
    write_cache(path, table)
    return table, False


def write_cache(path: Path, table: dict[str, torch.Tensor]) -> None:
    """Write the table under a name of this process's, then rename: concurrent writers (two
    runs sharing a cache folder) never mix their bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in table.items()}, str(tmp))
    tmp.replace(path)
