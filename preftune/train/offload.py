"""`reference_offload=disk`: the frozen reference's decoder layers kept on disk and read back,
one layer at a time, for that layer's forward — accelerate's disk offload (the hooks
`transformers`' `device_map="auto"` uses for weights that fit nowhere), applied to the copy.

A frozen reference is a second set of weights as large as the policy's; with it on disk, a run
holds the policy, its gradients and optimizer state, the reference's embedding, final norm and
LM head (read directly by the log-prob engine, preftune/logprob/head.py, so kept in memory), and
one decoder layer of the reference at a time. Each reference forward reads the layers back from
the files (the page cache, after the first) — the price in time, measured in docs/online.md.

The copy never exists whole in memory: the layers' parameters enter `copy.deepcopy`'s memo as
meta tensors (so the copy gets placeholders, not data), and their values are written to the
folder from the policy's own tensors, before the first step changes them. Log-probs equal the
resident copy's exactly (tests/test_offload.py): the same weights, the same code, the same
order of operations.

Only the reference's scoring reads it this way. Sampling from the reference (RSO's proposal,
IPO-MD's mixture) would read every layer once per generated token, so those methods refuse it,
as do FSDP2 and DeepSpeed, which shard or offload the reference themselves (their own options).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_state_dict

from preftune.compiling import decoder_blocks

MODES = ("none", "disk")


def named_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, module) of the model's decoder layers (`compiling.decoder_blocks`)."""
    blocks = {id(m) for m in decoder_blocks(model)}
    return [(name, m) for name, m in model.named_modules() if id(m) in blocks]


def offloaded_copy(policy: torch.nn.Module, parent: Path) -> torch.nn.Module:
    """A frozen copy of `policy` whose decoder layers live in a new folder under `parent`,
    removed when the copy is garbage-collected or the process exits."""
    blocks = named_blocks(policy)
    if not blocks:
        raise ValueError(
            f"{type(policy).__name__} names no decoder layer class (_no_split_modules), so "
            "reference_offload=disk has no layers to offload; set reference_offload=none"
        )
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".reference_offload-", dir=parent))
    memo, values = {}, {}
    for name, block in blocks:
        for key, p in block.named_parameters():
            memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), False)
            values[f"{name}.{key}"] = p.detach()
    offload_state_dict(str(folder), values)
    del values
    ref = copy.deepcopy(policy, memo).eval().requires_grad_(False)
    device = next(policy.parameters()).device
    loader = OffloadedWeightsLoader(save_folder=str(folder))
    for name, block in named_blocks(ref):
        hook = AlignDevicesHook(
            execution_device=device,
            offload=True,
            weights_map=PrefixedDataset(loader, f"{name}."),
            place_submodules=True,
        )
        add_hook_to_module(block, hook)
    weakref.finalize(ref, shutil.rmtree, folder, True)
    ref.offload_folder = folder
    return ref


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of `model`'s parameters held in memory now (meta placeholders hold none)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
