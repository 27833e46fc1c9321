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

The folder is the run directory's `.reference_offload-<process index>-<token>`: each process of
a DDP run writes its own copy (the disk it needs: the layers' bytes, once per process; free
space is checked first), removed when the copy is garbage-collected or the process exits; a
killed run leaves it, and when the run directory is next used (resumed) the main process
sweeps such leftovers before any copy is written (`sweep`). A resumed run's copy is the
initial weights again: it is made before a checkpoint loads.

Only the reference's scoring reads it this way. Sampling from the reference (RSO's proposal,
IPO-MD's mixture) would read every layer once per generated token, so those methods refuse it,
as do FSDP2 and DeepSpeed, which shard or offload the reference themselves (their own options).
"""

from __future__ import annotations

import copy
import shutil
import weakref
from pathlib import Path

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset
from accelerate.utils.offload import save_offload_index

from preftune.compiling import decoder_blocks
from preftune.errors import UserError

PREFIX = ".reference_offload-"  # + process index and a token of the copy's own


def named_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, module) of the model's decoder layers (`compiling.decoder_blocks`)."""
    blocks = {id(m) for m in decoder_blocks(model)}
    return [(name, m) for name, m in model.named_modules() if id(m) in blocks]


def offloaded_copy(policy: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """A frozen copy of `policy` whose decoder layers live in `folder` (a new folder of this
    copy's own, removed when the copy is garbage-collected or the process exits)."""
    blocks = named_blocks(policy)
    if not blocks:
        raise UserError(
            f"reference_offload=disk: {type(policy).__name__} names no decoder layer class "
            "(_no_split_modules), so there are no layers to offload; set reference_offload=none"
        )
    memo, values = {}, {}
    for name, block in blocks:
        for key, p in block.named_parameters():
            memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), False)
            values[f"{name}.{key}"] = p.detach()
    _write(folder, values)
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
    return ref


def _write(folder: Path, values: dict[str, torch.Tensor]) -> None:
    """The layers' tensors into `folder`, in accelerate's offload format (one raw file per
    tensor, bf16 as int16, and index.json: nothing that executes on load). Written with plain
    file writes, not accelerate's `offload_weight`: its memory-mapped writes make sparse files,
    which on a full disk end the process with SIGBUS instead of an error. The free space is
    checked first; a failed write leaves no partial folder."""
    need = sum(v.numel() * v.element_size() for v in values.values())
    free = _free_bytes(folder.parent)
    if free < need + (64 << 20):
        raise UserError(
            f"reference_offload=disk: the reference's layers need {_size(need)} in {folder.parent}"
            f", which has {_size(free)} free; make room there, or set reference_offload=none"
        )
    index = {}
    try:
        folder.mkdir()
        for name, value in values.items():
            array, dtype = value, str(value.dtype).removeprefix("torch.")
            if value.dtype == torch.bfloat16:  # numpy has no bfloat16
                array = value.view(torch.int16)
            array = array.contiguous().numpy()
            index[name] = {"dtype": dtype, "shape": list(value.shape)}
            with open(folder / f"{name}.dat", "wb") as f:
                array.reshape(-1).tofile(f)
        save_offload_index(index, str(folder))
    except OSError as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise UserError(
            f"reference_offload=disk: could not write the reference's layers ({_size(need)}) to "
            f"{folder}: {e.strerror or e}; make room or fix that folder, or set "
            "reference_offload=none"
        ) from None


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def sweep(run_dir: Path) -> None:
    """Remove the reference copies an earlier, killed process left in `run_dir` (the main
    process, before any process writes its own)."""
    for old in run_dir.glob(f"{PREFIX}*"):
        shutil.rmtree(old, ignore_errors=True)
