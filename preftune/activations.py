"""Selective activation checkpointing: keep what matmuls made, recompute the cheap rest.

A decoder layer keeps, for backward, every intermediate its ops need: the norms' inputs and
outputs, the rotary products, the MLP's gate, up, activation and product, and under bf16
autocast both the fp32 tensors and the bf16 copies cast from them for each matmul (q, k and v
each keep their own copy of the normed input). At long sequences these dominate the peak.

`gradient_checkpointing=true` keeps only each layer's input and re-runs the whole layer in
backward: a third more matmul work. `gradient_checkpointing=selective` runs each layer under
torch's selective checkpointing with the policy below: the outputs of matmuls and attention (the
expensive ops) are kept; norms, activations, rotary embedding, residual adds and casts, all
memory-bound and cheap, are recomputed from them in backward. Non-reentrant checkpointing stops
its recomputation once the last tensor backward needs is rebuilt, so a layer's trailing ops
(the down projection's residual add) are not re-run. Gradients equal those of the plain step
(tests/test_activations.py).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

aten = torch.ops.aten

# ops whose outputs are kept: everything that multiplies matrices. The attention kernels are
# the ones SDPA dispatches to on CPU and CUDA; a missing one is only recomputed, not wrong.
KEPT_OPS = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts():
    """The (forward, recompute) context pair `torch.utils.checkpoint.checkpoint` takes as
    `context_fn`."""
    return create_selective_checkpoint_contexts(_policy)


def checkpointing_kwargs(mode: bool | str) -> dict:
    """Keyword arguments of transformers' `gradient_checkpointing_enable` for
    `gradient_checkpointing=mode` (true: whole layers; "selective": the policy above)."""
    kwargs: dict = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = selective_contexts
    return kwargs
