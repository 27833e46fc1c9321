"""Decoding on CPU with each linear layer's weight prepacked for oneDNN.

A decode step multiplies a few rows (the batch: 16-32 in W5) by every weight once per token.
At that shape torch's default CPU GEMM for fp32 (MKL) runs far below the machine's matmul
rate; oneDNN with the weight reordered once into its blocked layout runs it ~2x faster, the
LM head ~3x (measured on the AMD EPYC hosts of these sessions, docs/online.md). The pair of
ops is torch's own, the one its CPU inference passes use for a frozen linear layer
(`torch.ops.mkldnn._reorder_linear_weight`, `torch.ops.mkldnn._linear_pointwise`).

The weights change after every optimizer step, so `prepacked_linears` packs them for one
generation call and releases them after it (one packed copy of the linear weights lives for
the call: ~0.2 s to pack SmolLM2-135M). The products are the same fp32 (or, under CPU bf16
autocast, the same bf16) products as `F.linear`'s, in another summation order: the sampled
tokens equal an unpacked call's unless two logits tie to within fp32 rounding
(tests/test_prepacked.py).

It applies on CPU to plain `nn.Linear` modules (peft's base layers included) whose weights are
whole local fp32 tensors; anything else (CUDA, fp64, a sharded DTensor or a ZeRO-3 partition,
a torch without these ops) keeps the plain call. `PREFTUNE_PREPACK=0` switches it off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import torch
from torch import nn

ENV = "PREFTUNE_PREPACK"


def available() -> bool:
    """Whether this torch has the oneDNN prepacked linear ops and they are not switched off."""
    if os.environ.get(ENV, "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")


def _packable(module: nn.Module) -> bool:
    if type(module) is not nn.Linear:
        return False
    w = module.weight
    return (
        type(w) in (nn.Parameter, torch.Tensor)
        and type(w.data) is torch.Tensor  # not a DTensor shard
        and not hasattr(w, "ds_id")  # not a DeepSpeed ZeRO-3 partition
        and w.device.type == "cpu"
        and w.dtype == torch.float32
        and w.dim() == 2
        and w.numel() > 0
    )


@contextlib.contextmanager
def prepacked_linears(models: Iterable[nn.Module], rows: int) -> Iterator[int]:
    """Inside: every packable linear layer of `models` runs on its weight packed for `rows`-row
    products (a layout hint; other row counts give the same results). Yields how many layers
    were packed (0 where it does not apply). Not for training: the packed forward has no
    gradient and reads the weights as they were when packing."""
    layers = []
    if available():
        seen = set()
        for model in models:
            for m in model.modules():
                if id(m) not in seen and _packable(m):
                    seen.add(id(m))
                    layers.append(m)
    low = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    try:
        for m in layers:
            m.forward = _pack(m, rows, low)
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)


def _pack(m: nn.Linear, rows: int, low: torch.dtype | None):
    weight = m.weight.detach()
    bias = None if m.bias is None else m.bias.detach()
    if low is not None:  # autocast: the products autocast would run, in its dtype
        weight, bias = weight.to(low), None if bias is None else bias.to(low)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, max(1, rows))
    linear = torch.ops.mkldnn._linear_pointwise

    def forward(x: torch.Tensor) -> torch.Tensor:
        if low is not None:
            x = x.to(low)
        elif x.dtype != torch.float32:  # the plain call decides (F.linear refuses mixed dtypes)
            return nn.Linear.forward(m, x)
        return linear(x, packed, bias, "none", [], "")

    return forward
