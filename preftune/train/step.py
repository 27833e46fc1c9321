"""The one optimizer step, for every method, and the module accelerate prepares.

`EngineModule` is the log-prob engine as an `nn.Module`: its `forward(fn, *args)` runs one of
the engine's functions (`sequence_logps`, `token_logps`, `sequence_logps_and_kl`, the reward
model's `sequence_rewards`) on the wrapped model. accelerate prepares this module, so DDP's
reducer (and any other wrapper) sees every training forward and backward and averages the
gradients itself: preftune writes no collective of its own. Under a wrapper the engine's two
gradient fast paths that write `.grad` outside autograd (the input embedding's and the chunked
LM head's) are off, with one line in the log saying so; one process keeps them.

`StepEngine.run` is the step: micro-batches (each process its own), backward through
accelerate with gradient sync on the last micro-batch only, the non-finite guard, clipping,
the optimizer and scheduler step. Offline pairs, KTO, the reward model, online DPO / RSO and
ReMax each supply their micro-batches and a function that returns a micro-batch's summed loss;
none of them writes a step of its own.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence

import torch
from accelerate.utils import DistributedType, gather_object
from torch.distributed.tensor import DTensor

from preftune.logps import hidden_at_targets, sequence_logps, sequence_logps_and_kl, token_logps
from preftune.train.guards import DivergedError
from preftune.train.setup import TrainingError
from preftune.train.sharding import Sharding

# engine functions that take `fast_grads`
_ENGINE_FNS = (sequence_logps, token_logps, sequence_logps_and_kl, hidden_at_targets)


def _describe(loss: torch.Tensor, i: int, mb, rank: int, P: int) -> str:
    head = f" (examples {list(mb[:4])}...)" if isinstance(mb, list) else ""
    where = f" on process {rank}" if P > 1 else ""
    return f"non-finite loss ({loss.item()}) in micro-batch {i}{head}{where}, step refused"


class EngineModule(torch.nn.Module):
    """The module accelerate prepares: `self(fn, *args, **kw)` is `fn(model, *args, **kw)`."""

    def __init__(self, model: torch.nn.Module, fast_grads: bool):
        super().__init__()
        self.model = model
        self.fast_grads = fast_grads

    def forward(self, fn: Callable, *args, **kwargs):
        if fn in _ENGINE_FNS:
            kwargs["fast_grads"] = self.fast_grads
        return fn(self.model, *args, **kwargs)


def wrapped(acc) -> bool:
    """Whether an engine wraps the prepared module (several processes: DDP; DeepSpeed always),
    so every gradient must stay inside autograd."""
    return acc.num_processes > 1 or acc.distributed_type == DistributedType.DEEPSPEED


class StepEngine:
    """One optimizer step: see the module docstring."""

    def __init__(
        self, acc, engine, optimizer, scheduler, max_grad_norm, in_backward=None, sharding=None
    ):
        self.acc, self.engine = acc, engine
        self.optimizer, self.scheduler = optimizer, scheduler
        self.max_grad_norm, self.in_backward = max_grad_norm, in_backward
        self.params = [p for p in acc.unwrap_model(engine).parameters() if p.requires_grad]
        # DeepSpeed's engine reduces, clips and steps the (partitioned) gradients itself
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        sharding = sharding or Sharding(False)
        # FSDP2 and DeepSpeed: every forward and backward is a collective (all-gathers, reduce-
        # scatters, ZeRO's reduction at each backward), not only the last micro-batch's
        self.sharded = sharding.enabled
        self.micro_context = sharding.micro_batch  # what each micro-batch runs inside

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch; the gradients are synchronised after the `last` one.
        DeepSpeed's `backward` would divide by its accumulation steps: the loss is already the
        step's share, as for the other engines."""
        if self.deepspeed:
            self.engine.set_gradient_accumulation_boundary(last)
            self.engine.backward(loss, scale_wrt_gas=False)
        else:
            self.acc.backward(loss)

    def run(
        self,
        step: int,
        micro: Sequence,
        micro_loss: Callable[[object], tuple[torch.Tensor, int]],
        n_global: int,
        idle_loss: Callable[[], torch.Tensor] | None = None,
    ) -> dict:
        """One step over this process's `micro` batches. `micro_loss(mb)` returns the summed
        per-example loss of a micro-batch and its token count; each is divided by `n_global`,
        the examples of the whole step over all processes, so accumulation over micro-batches
        and averaging over processes give the full batch's mean. A process with nothing to
        train this step still joins the gradient sync through `idle_loss()` (a forward
        through the engine, multiplied by 0), and under a sharded engine a process pads its
        micro-batches with such zero-loss ones to the busiest process's count (`_idle_counts`);
        the metrics then hold `idle_micro_batches`, summed over the processes."""
        P, start, ntok = self.acc.num_processes, time.perf_counter(), 0
        work = [mb for mb in micro if len(mb)]
        idle, idle_total = self._idle_counts(len(work), n_global, idle_loss is not None)
        for i in range(idle):
            with self.micro_context():
                self.backward(idle_loss() * 0.0, last=i == idle - 1 and not work)
        bad = None
        for i, mb in enumerate(work):
            last = i == len(work) - 1
            quiet = last or self.deepspeed  # DeepSpeed: the boundary flag (backward)
            sync = contextlib.nullcontext() if quiet else self.acc.no_sync(self.engine)
            with self.micro_context(), sync:
                loss_sum, n = micro_loss(mb)
                # x P: the wrapper averages gradients over processes, the loss is a global mean
                loss = loss_sum * P / n_global
                if bad is None and not torch.isfinite(loss):  # a host sync per micro-batch
                    bad = _describe(loss, i, mb, self.acc.process_index, P)
                    if P == 1:
                        raise DivergedError(step, bad)
                # with several processes every one must run its backward (the others wait in
                # the gradient sync): the step is refused after it, on every process at once
                self.backward(loss, last)
            ntok += n
        if P > 1 and (bad := next((b for b in gather_object([bad]) if b), None)):
            raise DivergedError(step, bad)
        lr = self.scheduler.get_last_lr()[0]  # the lr this step's update uses
        grad_norm = self.update(step, trained=n_global > 0)
        elapsed = time.perf_counter() - start
        tokens = self.acc.reduce(torch.tensor(float(ntok), device=self.acc.device), "sum")
        metrics = {
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_second": float(tokens) / max(elapsed, 1e-9),
            "step_time": elapsed,
        }
        if idle_total is not None:
            metrics["idle_micro_batches"] = idle_total
        return metrics

    def _idle_counts(self, mine: int, n_global: int, can_idle: bool) -> tuple[int, int | None]:
        """(backwards of `idle_loss` this process runs before its own, their sum over the
        processes; None where no process could idle). One where this process has nothing to
        train while others wait in the gradient sync (DDP syncs at the last backward only);
        under a sharded engine as many as it has fewer micro-batches than the busiest process,
        since there every forward and backward is a collective. Online steps only: offline
        micro-batches are equal everywhere (`can_idle` is False there)."""
        P = self.acc.num_processes
        if P == 1 or not can_idle:
            return 0, None
        if n_global == 0:  # no pairs anywhere: no gradients, as on one process
            return 0, 0
        counts = self.acc.gather(torch.tensor([mine], device=self.acc.device)).tolist()
        pads = [max(counts) - c if self.sharded else int(c == 0) for c in counts]
        return pads[self.acc.process_index], sum(pads)

    def update(self, step: int, trained: bool) -> float:
        """The optimizer and scheduler step on the finished gradients; their norm before
        clipping. A step where no process `trained` anything runs no backward: under DeepSpeed
        nothing is stepped (ZeRO would fail without gradients), as torch's optimizers skip
        parameters without gradients."""
        if self.deepspeed and not trained:
            grad_norm = 0.0
        elif self.deepspeed:
            grad_norm = self.deepspeed_step(step)
        else:
            grad_norm = self.clip_and_check(step)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    def clip_and_check(self, step: int) -> float:
        """The gradient norm (before clipping) of the finished gradients, clipped to
        `max_grad_norm`; a non-finite norm refuses the step."""
        if self.in_backward is not None:  # updated, checked and freed in backward already
            return self.in_backward.finish()
        params = [p for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        # sharded (FSDP2) gradients give a DTensor norm: its value is a collective
        total = norm.full_tensor() if isinstance(norm, DTensor) else norm
        if not torch.isfinite(total):
            raise DivergedError(step, f"non-finite gradient norm ({total}), step refused")
        # clip_grad_norm_'s rule (scale by max_norm / (norm + 1e-6) where that is below 1),
        # without its pass over every gradient multiplying by exactly 1.0 when it is not
        max_norm = self.max_grad_norm
        if max_norm and max_norm / (float(total) + 1e-6) < 1.0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(total)

    def deepspeed_step(self, step: int) -> float:
        """DeepSpeed's step: it computes the gradient norm (before clipping), clips, updates and
        frees the gradients; a non-finite norm makes ZeRO skip the update (its overflow check),
        and the step is refused."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if not math.isfinite(norm):
            raise DivergedError(step, f"non-finite gradient norm ({norm}), step refused")
        return norm


# what prepare may wrap the engine in: nothing, or DDP (CPU processes over gloo, GPUs over NCCL);
# FSDP2 is applied by preftune itself (train/sharding.py), DeepSpeed through its plugin
# (train/deepspeed.py)
SUPPORTED_ENGINES = {
    DistributedType.NO,
    DistributedType.MULTI_CPU,
    DistributedType.MULTI_GPU,
    DistributedType.MULTI_XPU,
    DistributedType.MULTI_NPU,
    DistributedType.MULTI_MLU,
}


def place_for_training(acc, policy, sharding: Sharding, build_optimizer: Callable):
    """(policy on the accelerator's device, the prepared `EngineModule` around it, the prepared
    optimizer, built by `build_optimizer()` once the parameters are final). Under several
    processes accelerate wraps the module (DDP), whose reducer averages the gradients; the
    engine then keeps every gradient inside autograd. Under FSDP2 the module is sharded with
    `fully_shard` (train/sharding.py) and not given to `prepare`, which would shard it again
    (GPUs) or wrap it in DDP (CPUs). The policy itself is never wrapped: `trainer.policy` is
    the bare model everywhere (saving, generation, the reference), no unwrap needed."""
    if acc.distributed_type not in SUPPORTED_ENGINES and not sharding.enabled:
        raise TrainingError(
            f"accelerate is configured for {acc.distributed_type.value}; preftune runs one "
            f"process, DDP, FSDP2 or DeepSpeed ZeRO-2/3. Launch with a config such as "
            f"examples/accelerate/ddp.yaml, fsdp2.yaml or zero2.yaml"
        )
    policy.to(acc.device)
    engine = EngineModule(policy, fast_grads=not wrapped(acc))
    if sharding.enabled:  # FSDP2 (train/sharding.py) or DeepSpeed (train/deepspeed.py)
        engine, optimizer = sharding.place(acc, engine, build_optimizer)
        return policy, engine, optimizer
    engine, optimizer = acc.prepare(engine, build_optimizer())
    return policy, engine, optimizer
