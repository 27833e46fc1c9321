"""Decoding on CPU with each linear layer's weight prepacked for oneDNN.

A decode step multiplies a few rows (the batch: 16-32 in W5) by every weight once per token.
At that shape torch's default CPU GEMM for fp32 (MKL) runs well below the machine's matmul
rate on the AMD hosts measured (docs/online.md "Generation", `benchmarks/decode_ab.py`);
oneDNN with the weight reordered once into its blocked layout runs it faster, the LM head
most. The pair of ops is torch's own, the one its CPU inference passes use for a frozen linear
layer (`torch.ops.mkldnn._reorder_linear_weight`, `torch.ops.mkldnn._linear_pointwise`).

The weights change after every optimizer step, so `prepacked_linears` packs them for one
generation call and releases them after it: for the call, one more copy of the linear weights
(fp32; bf16 under bf16 autocast) is held. The products are the same fp32 (or, under CPU bf16
autocast, the same bf16) products as `F.linear`'s, in another summation order: the sampled
tokens equal an unpacked call's unless two logits tie to within that rounding
(tests/test_prepacked.py).

It applies on CPU to plain `nn.Linear` modules (peft's base and adapter layers included) whose
weights are whole local fp32 tensors: on one process, under DDP and DeepSpeed ZeRO-2, and inside
the gathered phase in which FSDP2 generates (its unsharded weights are plain tensors then, and
are packed). A ZeRO-3 parameter (it keeps its `ds_id` when gathered) and a DTensor shard are
left alone. The plain call stays for CUDA, fp64, autocast in another dtype than bf16 or on a
CPU without oneDNN bf16, a call that needs gradients (the input's, the weight's or the bias's),
an autocast state other than the one packed for, a module whose `forward` was set on the
instance (accelerate's hooks, an outer call), and a torch without these ops.
`PREFTUNE_PREPACK=0` (or false/no/off) switches it off; a value that is not a switch is refused.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from preftune.errors import ConfigError

ENV = "PREFTUNE_PREPACK"


OFF, ON = ("0", "false", "no", "off"), ("", "1", "true", "yes", "on")


def switched_on() -> bool:
    """`PREFTUNE_PREPACK`: unset or 1/true/yes/on packs, 0/false/no/off does not."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in OFF + ON:
        raise ConfigError(
            f"{ENV}={os.environ[ENV]!r} is not a switch, in the environment; "
            f"set it to 1 (pack the weights for decoding, the default) or 0 (plain layers)"
        )
    return value in ON


def available() -> bool:
    """Whether decoding packs: switched on, and this torch has the oneDNN prepacked linear ops."""
    if not switched_on() or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")


def describe(device: torch.device) -> str:
    """One line for a run's log: how its decoding runs the linear layers on `device`."""
    if device.type != "cpu":
        return f"decoding: plain linear layers ({device.type})"
    if not available():
        why = f"{ENV}={os.environ.get(ENV)}" if not switched_on() else "no oneDNN linear ops"
        return f"decoding: plain linear layers ({why})"
    return f"decoding: linear layers prepacked for oneDNN per call ({ENV}=0: plain)"


def _packable(module: nn.Module) -> bool:
    if type(module) is not nn.Linear or "forward" in module.__dict__:
        return False  # a forward set on the instance (accelerate's hooks, an outer call) stays
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


def _autocast() -> torch.dtype | None:
    """The CPU autocast dtype in force, or None."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


@contextlib.contextmanager
def prepacked_linears(models: Iterable[nn.Module], rows: int) -> Iterator[int]:
    """Inside: every packable linear layer of `models` runs on its weight packed for `rows`-row
    products (a layout hint; other row counts give the same results), under the CPU autocast
    state in force on entry. Yields how many layers were packed (0 where it does not apply).
    For calls without gradient: one that needs them takes the plain call; the packed weights
    are the weights as they were on entry."""
    low = _autocast()
    layers = []
    if available() and (
        low is None or (low == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    ):
        seen = set()
        for model in models:
            for m in model.modules():
                if id(m) not in seen and _packable(m):
                    seen.add(id(m))
                    layers.append(m)
    try:
        for m in layers:
            m.forward = _pack(m, rows, low)
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)


def _pack(
    m: nn.Linear, rows: int, low: torch.dtype | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    weight = m.weight.detach()
    bias = None if m.bias is None else m.bias.detach()
    if low is not None:  # autocast: the products autocast would run, in its dtype
        weight, bias = weight.to(low), None if bias is None else bias.to(low)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, max(1, rows))
    linear = torch.ops.mkldnn._linear_pointwise
    wants_grad = [t for t in (m.weight, m.bias) if t is not None]

    def forward(input: torch.Tensor) -> torch.Tensor:  # nn.Linear's argument name
        plain = (
            _autocast() != low  # autocast switched inside the call
            or (low is None and input.dtype != torch.float32)  # F.linear decides (mixed dtypes)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in wants_grad + [input]))
        )
        if plain:
            return nn.Linear.forward(m, input)
        return linear(input if low is None else input.to(low), packed, bias, "none", [], "")

    return forward
