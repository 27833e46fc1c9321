"""The optimizer step taken inside backward (`optimizer_in_backward=true`).

A normal step holds every gradient at once: the backward ends with all of them allocated
(16 bytes per parameter in fp32 with AdamW, of which 4 are the gradient), then clips and steps.
Here each parameter is updated the moment autograd has finished its gradient
(`Tensor.register_post_accumulate_grad_hook`) and the gradient is freed at once, so at most a
few gradients exist at a time. With gradient checkpointing the activations are small too, and a
step's peak memory drops to little above the model and optimizer state (docs/benchmarks.md: W1's
lean setting). The same idea as PyTorch's "optimizer step in backward" recipe and torchtune's
`optimizer_in_bwd`.

The update is the optimizer's own: each parameter has a one-parameter instance of the run's
optimizer class that shares the run optimizer's state and takes its hyper-parameters (so the
learning-rate schedule) at every call, so checkpoints are those of the normal path and the
updates are the same numbers (tests/test_in_backward.py: AdamW, SGD, RMSprop, weight decay, a
warm-up schedule, checkpointing, LoRA, an untied head, resume, the online and reward trainers).
The input embedding and LM head weights are the exception: preftune's engine writes their
gradients into `.grad` itself, outside autograd's accumulation (the head's early in the
backward, the embedding rows at its very end; preftune/logps.py), so no hook can tell when they
are complete. They get no hook, keep their gradient to the end of the backward (as they would
anyway) and are updated by the normal `optimizer.step()` that follows it. The hooks are removed
when training ends. What it cannot do follows from updating before the backward has ended:

- no gradient clipping: the total norm is known only after the last parameter was updated
  (`max_grad_norm` must be null). The total norm is still computed and logged as `grad_norm`.
- no gradient accumulation and one process: the gradient must be complete (all micro-batches,
  all processes) when the hook fires.
- a non-finite gradient stops training, as in the normal path, but the parameters whose
  gradients were finished earlier in that backward have already been updated in memory; the
  last checkpoint on disk is intact.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from preftune.logps import weights_with_grad_written_here
from preftune.train.guards import DivergedError
from preftune.train.setup import TrainingError


class StepInBackward:
    """Per-parameter hooks that update one parameter with its finished gradient and free it.

    After the backward, `finish()` returns the step's total gradient norm (the parameters
    updated in backward and those still holding a gradient, which the caller's
    `optimizer.step()` then updates) and checks that every gradient is finite.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        step: Callable[[], int],
    ):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        self.names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        self.step_no = step  # the number of the step being taken, for error messages
        self._norms: list[torch.Tensor] = []  # each gradient's norm, in its own dtype
        self._stepped: set[int] = set()
        cls = type(self.optimizer)
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
        # per parameter: its one-parameter optimizer and the index of its group (the group
        # itself is looked up at each call: load_state_dict replaces the group dicts)
        self._single: dict[int, tuple[torch.optim.Optimizer, int]] = {}
        self._handles = []
        written = {id(w) for w in weights_with_grad_written_here(model)}
        for gi, group in enumerate(self.optimizer.param_groups):
            options = {k: v for k, v in group.items() if k in accepted}
            for p in group["params"]:
                if p.requires_grad and id(p) not in written:
                    self._single[id(p)] = (cls([p], **options), gi)
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def _hook(self, p: torch.Tensor) -> None:
        name = self.names[id(p)]
        if id(p) in self._stepped:  # a second gradient after the update would be lost
            raise TrainingError(
                f"parameter {name} received a second gradient in step {self.step_no()} after its "
                f"in-backward update, which would be lost: a second backward call in one step, or "
                f"a parameter used in two reentrant-checkpointed segments. optimizer_in_backward "
                f"needs each gradient complete in one backward; set optimizer_in_backward=false."
            )
        self._add_norm(name, p.grad)
        single, gi = self._single[id(p)]
        single.state = self.optimizer.state  # shared (load_state_dict replaces the dict)
        group = self.optimizer.param_groups[gi]
        single.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
        single.step()
        p.grad = None
        self._stepped.add(id(p))

    def _add_norm(self, name: str, grad: torch.Tensor) -> None:
        # torch.nn.utils.get_total_norm's way: each tensor's norm in its dtype (no copy of
        # the gradient), then the norm of those norms. The finiteness test reads the norm on the
        # host: free on CPU, one device sync per parameter on a GPU
        norm = torch.linalg.vector_norm(grad.detach())
        if not torch.isfinite(norm):
            raise DivergedError(
                self.step_no(),
                f"non-finite gradient in {name}; optimizer_in_backward had already updated the "
                f"parameters finished earlier in this backward (in memory only; without "
                f"optimizer_in_backward the whole step is refused)",
            )
        self._norms.append(norm)

    def finish(self) -> float:
        """The step's total gradient norm (as `clip_grad_norm_` would report it), counting the
        gradients still held, which the caller's `optimizer.step()` applies."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._add_norm(self.names[id(p)], p.grad)
        norm = float(torch.nn.utils.get_total_norm(self._norms))
        self._norms = []
        self._stepped.clear()
        return norm

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
