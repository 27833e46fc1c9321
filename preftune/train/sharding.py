"""FSDP2 for the log-prob engine: torch's `fully_shard` per decoder layer and on the module
accelerate would prepare, selected the accelerate way (`accelerate launch --config_file
examples/accelerate/fsdp2.yaml`, which sets ACCELERATE_USE_FSDP and FSDP_VERSION=2).

preftune applies `fully_shard` itself, on GPUs and CPUs alike, rather than through
`Accelerator.prepare`: accelerate 1.15 ignores an FSDP config on CPU processes (it runs them as
DDP, or as single runs), and one code path is what the CPU tests check. The engine module is the
FSDP root: its `forward(fn, ...)` runs the log-prob engine, whose direct calls into the decoder's
embedding, norm and LM head see the root's unsharded parameters, while each decoder layer
gathers its own in its forward and reduce-scatters its gradients in backward. So parameters,
gradients and optimizer state are each held 1/N per process, and the gradient averaging is
FSDP's reduce-scatter, not preftune's.

A forward outside the root (evaluation, KTO's KL estimate, the reference precompute, greedy
samples on the main process) would find sharded parameters, and processes with unequal shares
of that work would wait on each other's all-gathers for ever; those phases run inside
`Sharding.gathered()`, which all-gathers every parameter once on every process and keeps them
whole until the phase ends (the memory of one whole model per process, for that phase only).
"""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate.utils import DistributedType, parse_flag_from_env
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from preftune.compiling import decoder_blocks
from preftune.train.dcp import load_sharded, save_sharded
from preftune.train.setup import TrainingError


def fsdp_requested(acc) -> bool:
    """Whether the launch asked for FSDP: accelerate's state where it honours it (GPUs), else
    the variables `accelerate launch` sets from the config file (it drops them on CPU)."""
    asked = acc.distributed_type == DistributedType.FSDP or parse_flag_from_env(
        "ACCELERATE_USE_FSDP"
    )
    if not asked or acc.num_processes == 1:
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise TrainingError(
            f"accelerate is configured for FSDP version {version}; preftune shards with FSDP2 "
            f"(fully_shard). Set fsdp_version: 2 in the config, as examples/accelerate/fsdp2.yaml"
        )
    return True


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, named by transformers' `_no_split_modules` (what accelerate's
    transformer-based wrap policy shards one by one)."""
    layers = decoder_blocks(model)
    if not layers:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        raise TrainingError(
            f"FSDP2: {type(base).__name__} names no decoder layer class (_no_split_modules), so "
            f"preftune cannot shard it layer by layer; launch it with DDP instead"
        )
    return layers


def _reshard_after_forward() -> bool:
    """accelerate's `fsdp_reshard_after_forward` (FSDP_RESHARD_AFTER_FORWARD), default true."""
    return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("true", "1", "yes")


class Sharding:
    """What a run does differently under FSDP2; `enabled` False makes every method a no-op."""

    name = "FSDP2"
    # its checkpoints: each process writes and reads its own shard (train/dcp.py)
    save_checkpoint = staticmethod(save_sharded)
    load_checkpoint = staticmethod(load_sharded)

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.policy: list[torch.nn.Module] = []  # the policy's sharded engine (FSDP2)
        self.frozen: list[torch.nn.Module] = []  # each sharded reference

    def place(self, acc, engine: torch.nn.Module, build_optimizer):
        """(sharded engine, optimizer built on its sharded parameters). Not given to accelerate's
        `prepare`, which would shard it again (GPUs) or wrap it in DDP (CPUs)."""
        self.shard_engine(engine, engine.model)
        return engine, build_optimizer()

    def shard_engine(self, engine: torch.nn.Module, policy: torch.nn.Module) -> None:
        """fully_shard each decoder layer of `policy`, then `engine` as the root. Must run before
        the optimizer is built: the parameters become new (DTensor) objects."""
        reshard = _reshard_after_forward()
        for layer in decoder_layers(policy):
            fully_shard(layer, reshard_after_forward=reshard)
        fully_shard(engine, reshard_after_forward=reshard)
        # the first module to run forward becomes FSDP's root; gathered() phases call the
        # decoder layers directly, so make the engine the root now (torch has no public call)
        engine._get_fsdp_state()._lazy_init()
        self.policy.append(engine)

    def shard_frozen(
        self, model: torch.nn.Module, device: torch.device, gathered_only: bool = False
    ) -> torch.nn.Module:
        """A frozen reference, moved to `device` and sharded per decoder layer; its embedding,
        norm and LM head stay whole on every process (TDPO reads the reference's LM head inside
        the policy's forward). Each layer gathers its parameters in its forward, as the
        policy's do, and `gathered()` gathers them all (`gathered_only`: a run that reads it
        only there; the same sharding serves both)."""
        model.to(device)
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=True)
        self.frozen.append(model)
        return model

    def micro_batch(self):
        """What each training micro-batch runs inside (its forward and backward): nothing here;
        DeepSpeed ZeRO-3 gathers a partitioned frozen reference (train/deepspeed.py)."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def gathered(self, policy: bool = True, reference: bool = True):
        """Every sharded parameter (of the policy, of the references: as asked) whole on every
        process until the block ends (see the module docstring). Every process must enter it
        at the same point: it all-gathers."""
        if not self.enabled:
            yield
            return
        roots = (self.policy if policy else []) + (self.frozen if reference else [])
        fsdp = [m for root in roots for m in root.modules() if isinstance(m, FSDPModule)]
        frozen = {id(m) for root in self.frozen for m in root.modules()}
        for m in fsdp:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            reshard = _reshard_after_forward()
            for m in fsdp:
                m.reshard()  # a reference's layers reshard after each forward (shard_frozen)
                m.set_reshard_after_forward(id(m) in frozen or reshard, recurse=False)
                # FSDP records each forward's order for the next backward's prefetch and clears
                # it after that backward; these forwards have none, and processes with unequal
                # shares would prefetch different all-gathers there (a hang). No public call.
                state = m._get_fsdp_state()
                if not hasattr(state._comm_ctx, "post_forward_order"):
                    continue  # never ran a forward (a reference before its first use)
                state._comm_ctx.post_forward_order.clear()
                for group in state._fsdp_param_groups:
                    group._post_forward_indices.clear()

    def plain_copy(self, engine: torch.nn.Module, policy: torch.nn.Module):
        """On the main process, an unsharded model of `policy`'s class (LoRA: a peft model with
        its adapter) holding the whole trained weights, gathered shard by shard onto the CPU:
        what saves `final/`. None on the other processes; every process must call it."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(engine, options=options)
        if not state:
            return None
        return model_from_state(policy, {k.removeprefix("model."): v for k, v in state.items()})


def model_from_state(policy: torch.nn.Module, state: dict[str, torch.Tensor]):
    """A new model of `policy`'s class (LoRA: a peft model with its adapter) holding the whole
    weights `state` (named as `policy.named_parameters()`), built without allocating twice."""
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    # no memory: load_state_dict(assign=True) brings it. The class itself, not _from_config:
    # under a ZeRO-3 launch that would enter deepspeed.zero.Init (a collective) on this process
    with torch.device("meta"):
        model = type(base)(base.config).to(base.dtype)
    if hasattr(policy, "peft_config"):
        model = type(policy)(model, policy.peft_config["default"])  # peft's own class
    model.load_state_dict(state, assign=True, strict=False)
    if hasattr(base, "tie_weights"):
        (model.get_base_model() if hasattr(model, "get_base_model") else model).tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise TrainingError(f"the gathered weights lack {missing[:3]}")
    return model


def local_numel(params) -> int:
    """Elements this process holds of `params` (its shard of each DTensor)."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
