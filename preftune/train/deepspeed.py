"""DeepSpeed ZeRO-2 and ZeRO-3 for the log-prob engine, selected the accelerate way
(`accelerate launch --config_file examples/accelerate/zero2.yaml`, which sets
ACCELERATE_USE_DEEPSPEED and ACCELERATE_DEEPSPEED_ZERO_STAGE).

preftune writes the DeepSpeed config itself from its own settings (micro-batch size, gradient
accumulation, `max_grad_norm` as DeepSpeed's clipping) and gives accelerate the plugin; the
launch chooses the ZeRO stage. `Accelerator.prepare` then hands the engine module and preftune's
torch AdamW to `deepspeed.initialize`: DeepSpeed partitions the optimizer state and the
gradients (ZeRO-2) and the parameters too (ZeRO-3) over the processes, averages the gradients,
clips them and steps the optimizer (train/step.py drives it: `engine.backward`, `engine.step`).
preftune's scheduler stays outside the engine (LambdaLR sets the lr of the same torch optimizer
that ZeRO wraps). On CPU processes the process group is gloo.

ZeRO-3: the engine's direct reads of the LM head's weight (its shape, the chunked head) happen
inside the engine module's forward, so that weight is registered with DeepSpeed as an external
parameter of the module (gathered for its forward). Forwards outside the prepared module
(evaluation, the reference precompute, KTO's KL estimate) run inside `ZeroSharding.gathered()`:
every parameter gathered once on every process, DeepSpeed's per-module fetch hooks off until
the phase ends (the memory of one whole model per process, for that phase only); processes with
unequal shares of that work would otherwise wait on each other's all-gathers for ever. A frozen
reference is partitioned too (`zero.Init` on the loaded model) and gathered in those phases, alone
where only it is read (an online step's reference log-probs; generation gathers the model it
samples); TDPO and KTO, which read it beside each policy forward, gather it whole for each
micro-batch (`ZeroSharding.micro_batch`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
from accelerate import PartialState
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, parse_flag_from_env

from preftune.config import Config
from preftune.train.ds_checkpoint import load_zero, save_zero
from preftune.train.setup import TrainingError
from preftune.train.sharding import Sharding, model_from_state

STAGES = (2, 3)


def deepspeed_requested() -> bool:
    """Whether the launch asked for DeepSpeed (`accelerate launch` with a DeepSpeed config)."""
    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def zero_stage() -> int:
    """The launch's ZeRO stage (accelerate's `deepspeed_config.zero_stage`), 2 or 3."""
    raw = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    if raw not in {str(s) for s in STAGES}:
        raise TrainingError(
            f"accelerate is configured for DeepSpeed ZeRO stage {raw}; preftune runs ZeRO-2 and "
            f"ZeRO-3 (zero_stage: 2 or 3, as examples/accelerate/zero2.yaml)"
        )
    return int(raw)


def _check_launch(cfg: Config) -> None:
    """One line for each DeepSpeed setting preftune does not run (yet)."""
    if importlib.util.find_spec("deepspeed") is None:
        raise TrainingError(
            "accelerate is configured for DeepSpeed but the deepspeed package is not installed: "
            "pip install 'preftune[deepspeed]'"
        )
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none").lower() != "none":
        raise TrainingError(
            "DeepSpeed: preftune writes the DeepSpeed config from its own settings (batch_size, "
            "grad_accum, max_grad_norm, bf16); set zero_stage in the accelerate config instead "
            "of deepspeed_config_file (examples/accelerate/zero2.yaml)"
        )
    for what in ("OPTIMIZER", "PARAM"):
        device = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what}_DEVICE", "none").lower()
        if device != "none":
            raise TrainingError(
                f"DeepSpeed: offload_{what.lower()}_device={device} is not supported by preftune "
                f"yet (not tested); set it to none"
            )
    if cfg.train.optimizer_in_backward:
        raise TrainingError(
            "optimizer_in_backward cannot run under DeepSpeed: the engine reduces, clips and "
            "steps the partitioned gradients itself. Set optimizer_in_backward=false."
        )


def ds_config(cfg: Config, stage: int, num_processes: int) -> dict:
    """The DeepSpeed config of this run: what preftune decides, nothing left to `auto`
    (ZeRO-3's sizes that depend on the model are set in `ZeroSharding.place`)."""
    t = cfg.train
    zero = {"stage": stage}
    if stage == 3:  # final/: accelerate's get_state_dict gathers the parameters module by module
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": max(1, t.batch_size // (num_processes * t.grad_accum)),
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": float(t.max_grad_norm or 0.0),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # preftune's torch AdamW
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _cpu_only() -> bool:
    return torch.accelerator.current_accelerator() is None


def start_processes() -> str | None:
    """Under a DeepSpeed launch on CPUs, accelerate's process state started with a gloo group.
    Must run before anything else builds that state (the run directory's claim, bf16=auto):
    without a backend accelerate would count 1 process each, and both would claim the run.
    Returns a line for the log, or None."""
    if not deepspeed_requested():
        return None
    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        raise TrainingError(
            "DeepSpeed: the launch sets use_cpu (ACCELERATE_USE_CPU), under which accelerate "
            "drops DeepSpeed; set use_cpu: false, DeepSpeed runs on CPUs by itself "
            "(examples/accelerate/zero2_cpu.yaml)"
        )
    if not _cpu_only():
        return None
    note = _skip_shm_all_reduce() if importlib.util.find_spec("deepspeed") else None
    PartialState(backend="gloo")
    return note


def _skip_shm_all_reduce() -> str | None:
    """DeepSpeed's comm, as it starts on CPUs, compiles its shared-memory all-reduce (a C++ op,
    once per machine: about a minute on a 2-core host, README) unless the op is marked
    incompatible. Only its `inference_all_reduce` calls that op; training's collectives go
    through the gloo group. So it is marked off here, before accelerate starts DeepSpeed's comm
    (comm/torch.py `build_shm_op` reads this table)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return None
    deepspeed.ops.__compatible_ops__[builder.NAME] = False  # the name: deepspeed_shm_comm
    return (
        f"DeepSpeed on CPUs: its shared-memory all-reduce ({builder.NAME}) is not built: only "
        f"inference uses it, and it would be compiled (a minute or more) once per machine"
    )


def accelerator_kwargs(cfg: Config) -> dict:
    """What `Accelerator(...)` needs for a DeepSpeed launch ({} otherwise): the plugin with the
    config above and, where there is no accelerator device, a gloo process group."""
    if not deepspeed_requested():
        return {}
    _check_launch(cfg)
    stage = zero_stage()
    P = int(os.environ.get("WORLD_SIZE", "1"))
    # `accelerate launch` lists the config file's DeepSpeed keys here, and the plugin refuses a
    # config of its own beside them; preftune has read the one it uses (the stage) already
    fields = os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    try:
        plugin = DeepSpeedPlugin(hf_ds_config=ds_config(cfg, stage, P), zero3_init_flag=False)
    finally:
        if fields is not None:
            os.environ["ACCELERATE_CONFIG_DS_FIELDS"] = fields
    handlers = []
    if _cpu_only():
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return {"deepspeed_plugin": plugin, "kwargs_handlers": handlers}


class ZeroSharding(Sharding):
    """What a run does differently under DeepSpeed ZeRO (see the module docstring)."""

    # its checkpoints: whole fp32 tensors by name, each process writing its block of them
    # (train/ds_checkpoint.py); DeepSpeed's own format pickles
    save_checkpoint = staticmethod(save_zero)
    load_checkpoint = staticmethod(load_zero)

    def __init__(self, stage: int):
        super().__init__(True)
        self.stage = stage
        self.acc = self.engine = None  # the Accelerator and DeepSpeedEngine, once prepared
        self.beside: list[torch.nn.Parameter] = []  # a reference read beside each forward

    @property
    def name(self) -> str:
        return f"DeepSpeed ZeRO-{self.stage}"

    def place(self, acc, engine: torch.nn.Module, build_optimizer):
        """(prepared engine, prepared optimizer): accelerate's `prepare` runs
        `deepspeed.initialize` on the engine module and preftune's optimizer."""
        if self.stage == 3:
            import deepspeed

            head = engine.model.get_output_embeddings()  # None: a reward model (its own forward)
            if head is not None:
                deepspeed.zero.register_external_parameter(engine, head.weight)
            # accelerate's rule for its `auto` values, from the model's hidden size (accelerate
            # reads it from the module it prepares, which here is the engine module)
            h = engine.model.config.hidden_size
            zero = acc.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
            zero.setdefault("stage3_prefetch_bucket_size", int(0.9 * h * h))
            zero.setdefault("stage3_param_persistence_threshold", 10 * h)
        prepared, optimizer = acc.prepare(engine, build_optimizer())
        self.acc, self.engine = acc, prepared
        return prepared, optimizer

    def shard_frozen(
        self, model: torch.nn.Module, device: torch.device, gathered_only: bool = False
    ) -> torch.nn.Module:
        """A frozen reference (on the CPU) in the dtype DeepSpeed gave the policy (bf16 casts
        it). ZeRO-2 keeps the policy's parameters whole on every process, so the reference is
        too, on `device`. ZeRO-3 shards the policy: the reference is partitioned over the
        processes (`zero.Init` on the loaded model, which moves each parameter to the device
        and keeps its share) and gathered whole where it is read: in `gathered()` phases (an
        online run's generation and reference log-probs; evaluation) and, unless
        `gathered_only`, for each training micro-batch (`micro_batch`: TDPO and KTO read it
        beside the policy). (Like the policy's engine, zero.Init swaps torch's linear for
        DeepSpeed's memory-efficient one, process-wide: ZeRO-3's own choice, kept.)"""
        dtype = next(self.engine.module.parameters()).dtype
        model = model.to(dtype)
        if self.stage != 3:
            return model.to(device)
        from deepspeed import zero

        for b in model.buffers():  # zero.Init moves the parameters only (rotary tables stay)
            b.data = b.data.to(device)
        config = self.acc.state.deepspeed_plugin.deepspeed_config
        zero.Init(module=model, config_dict_or_path=config, dtype=dtype)
        self.frozen.append(model)
        if not gathered_only:
            self.beside.extend(model.parameters())
        return model

    def micro_batch(self):
        """ZeRO-3 with a frozen reference read beside the policy (TDPO, KTO): the reference
        gathered whole for the micro-batch's forward and backward (TDPO's KL recomputes the
        reference's logits from its LM head in backward), partitioned again after it; one
        all-gather per micro-batch, which every process runs as many of (offline steps). The
        memory of one whole reference per process for that time; the policy, its gradients and
        optimizer state stay partitioned."""
        if not self.beside:
            return contextlib.nullcontext()
        from deepspeed import zero

        return zero.GatheredParameters(self.beside)

    @contextlib.contextmanager
    def gathered(self, policy: bool = True, reference: bool = True):
        """ZeRO-3: every parameter (of the policy, of the partitioned references: as asked)
        whole on every process until the block ends, the policy's fetch hooks off meanwhile (a
        forward would otherwise release and re-gather each module's parameters: a collective
        per module). Every process must enter it at the same point."""
        if self.stage != 3 or self.engine is None:
            yield
            return
        from deepspeed import zero

        params = list(self.engine.module.parameters()) if policy else []
        params += [p for m in self.frozen for p in m.parameters()] if reference else []
        offload = self.engine.optimizer.parameter_offload
        with zero.GatheredParameters(params):
            if policy:
                offload._remove_module_hooks()  # no public call turns them off
            try:
                yield
            finally:
                if policy:
                    offload.setup_zero_stage3_hooks()

    def plain_copy(self, engine, policy):
        """On the main process, an unsharded model holding the trained weights (ZeRO-3:
        gathered by accelerate's `get_state_dict`, module by module, onto the main process's
        CPU); None on the others. Every process calls it."""
        main = self.acc.is_main_process
        if self.stage != 3:
            return policy if main else None
        state = self.acc.get_state_dict(engine)
        if not main:
            return None
        return model_from_state(policy, {k.removeprefix("model."): v for k, v in state.items()})


def local_optimizer_numel(optimizer) -> dict:
    """Elements this process holds of the optimizer's fp32 master weights and moments (ZeRO
    partitions: its share of each flat group)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> ZeRO's
    base = inner.optimizer  # the torch AdamW over the flat partitions
    masters = list(base.state)  # its state's keys: the flat fp32 partitions (ZeRO-3 keeps them
    # out of param_groups)
    moments = [v for st in base.state.values() for v in st.values() if v.dim() > 0]
    return {"master": sum(p.numel() for p in masters), "optimizer": sum(m.numel() for m in moments)}
