"""`compile=true`: each decoder layer of the policy compiled with `torch.compile`, as torchtune does.

The log-prob engine calls the decoder, its layers' attention functions and the LM head directly
(preftune/logps.py), so a compiled top-level module would never run: the unit is the decoder
layer. `nn.Module.compile` compiles the layer's call in place, so parameter names, state dicts,
checkpoints, `final/` and DDP's hooks see the module they always saw; every layer has the same
code, so one compiled graph serves all of them (dynamo guards on the code, not the instance).

What it can and cannot fuse: the norms (with their fp32 casts), rotary embedding, residual
adds and the MLP's SiLU-times-up run as a few fused kernels instead of one pass over memory
each; the matmuls stay the same BLAS calls. The varlen row's per-path attention
(preftune/logprob/varlen.py) stays eager, a graph break in each layer: its path lengths are
Python integers that change with every micro-batch, and traced they would recompile each one.
Sequence lengths change every micro-batch too, so the layers are compiled with dynamic shapes
(`dynamic=True`) and one graph serves them all.

Refused where it would not run or has not been checked, with one line saying why (`blocker`):
gradient checkpointing (config validation), more than one process (DDP, FSDP2) and DeepSpeed,
a CPU run with no C++ compiler for inductor, a CUDA run without triton, a model with no named
decoder layer. Only one process is tested (tests/test_compile.py).
The frozen reference copy (`copy.deepcopy`) is left uncompiled: torch drops a module's compiled
call when it is copied. Generation (evaluation, samples, the online methods) runs the layers
eagerly (`eager`): a decode step hands each layer a KV cache, which the compiled graph guards on
the layer's index, so each layer would compile graphs of its own (tested: 6 more for the tiny
model's 2 layers; SmolLM2 has 30, and dynamo's recompile limit is 8).
"""

from __future__ import annotations

import os
import shutil

import torch
from accelerate.utils import parse_flag_from_env
from torch.utils._triton import has_triton


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, named by transformers' `_no_split_modules` (what accelerate's
    transformer-based wrap policy shards one by one); [] when it names none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in names]


def _cpp_compiler() -> str | None:
    """The C++ compiler inductor would build CPU kernels with (its default `cpp.cxx` search off
    macOS: $CXX, else g++), or None when there is none on PATH."""
    return shutil.which(os.environ.get("CXX", "g++"))


def blocker(model: torch.nn.Module) -> str | None:
    """Why this run cannot compile its decoder layers, or None when it can."""
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed launch: its engine wraps the layers' parameters; not checked here"
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        return (
            f"{processes} processes: compiled layers under DDP or FSDP2 (fully_shard's hooks) "
            f"are not checked here; one process only"
        )
    if torch.cuda.is_available():
        if not has_triton():
            return "CUDA without triton: inductor has no GPU kernels to build; pip install triton"
    elif _cpp_compiler() is None:
        return "no C++ compiler for inductor's CPU kernels (g++ or $CXX); install one"
    if not decoder_blocks(model):
        return f"{type(model).__name__} names no decoder layer class (_no_split_modules)"
    return None


def compile_decoder_layers(model: torch.nn.Module) -> str:
    """Compile every decoder layer of `model` in place; the line the run logs. Raises nothing:
    a `blocker` leaves the model as it is and the line says why."""
    why = blocker(model)
    if why is not None:
        return f"compile=true switched off: {why}"
    layers = decoder_blocks(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return (
        f"compile: {len(layers)} decoder layers ({type(layers[0]).__name__}) compiled by "
        f"torch.compile (inductor, dynamic shapes); the first steps include the compilation"
    )


def eager():
    """A context in which compiled layers run their plain code (torch.compiler.set_stance):
    around generation, whose KV caches would make every layer compile its own graph."""
    return torch.compiler.set_stance("force_eager")


def compiled(layer: torch.nn.Module) -> bool:
    """Whether `layer` runs through a compiled call (`nn.Module.compile`)."""
    return layer._compiled_call_impl is not None
