"""bf16 autocast or fp32: what `bf16=auto` becomes on the device a run uses, and why.

bf16 autocast pays where the device multiplies bf16 in hardware: a CUDA GPU that supports it
(compute capability 8.0 or newer), a CPU with AMX (`amx_bf16`) or AVX-512-BF16
(`avx512_bf16`). Elsewhere oneDNN emulates bf16 matmuls through fp32, so autocast adds casts
and rounding for nothing, and `auto` means fp32. Either way the weights, the optimizer state,
the log-softmax and the loss stay fp32 (METHODS.md §0); only matmul inputs are bf16.

`auto` is decided once, when a run starts, and written into its config.yaml as true or false:
a resumed run keeps the precision it started with, on whatever machine it resumes (and says
so when that machine lacks the units, since its steps then run slower).

PREFTUNE_FAST_BF16=0|1 replaces the hardware check: for machines whose flags mislead, and for
the test suite, which sets 0 so that every machine runs the precision its tests expect.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

ENV = "PREFTUNE_FAST_BF16"
# /proc/cpuinfo flags of CPUs with bf16 matmul instructions, best first
CPU_BF16_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX-512-BF16"}
SETTINGS = ("auto", True, False)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first processor's feature flags (Linux); empty where the file does not exist."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _cpu_bf16_units() -> str | None:
    """'AMX' or 'AVX-512-BF16' when this CPU has them, else None. /proc/cpuinfo first; torch's
    own CPU probe where there is no such file (macOS, Windows)."""
    flags = cpu_flags()
    if not flags:
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private, may go
        return "AVX-512-BF16" if probe is not None and probe() else None
    return next((name for flag, name in CPU_BF16_FLAGS.items() if flag in flags), None)


def fast_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether `device` computes bf16 matmuls in hardware, the reason in a few words)."""
    forced = os.environ.get(ENV)
    if forced in ("0", "1"):
        return forced == "1", f"{ENV}={forced}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} computes bf16"
        return False, f"{name} has no bf16 units (compute capability < 8.0)"
    if device.type == "cpu":
        units = _cpu_bf16_units()
        if units:
            return True, f"this CPU has {units}"
        return False, "this CPU has neither AMX nor AVX-512-BF16"
    return False, f"preftune does not know whether a {device.type} device computes bf16 fast"


@dataclass(frozen=True)
class Precision:
    bf16: bool
    line: str  # the one line the run prints: which, and why


def resolve_bf16(setting: bool | str, device: torch.device, resumed: bool = False) -> Precision:
    """What a run with `bf16=setting` on `device` computes in, and the line that says so."""
    fast, why = fast_bf16(device)
    if setting == "auto":
        bf16, source = fast, f"bf16=auto: {why}"
    else:
        bf16 = bool(setting)
        source = "the run's own bf16, kept on resume" if resumed else f"bf16={str(bf16).lower()}"
        if bf16 and not fast:
            source += f"; {why}, so bf16 matmuls are emulated and slower than fp32"
    which = "bf16 autocast over fp32 weights" if bf16 else "fp32"
    return Precision(bf16, f"precision: {which} ({source}); fp32 log-softmax and loss")


def settle_bf16(cfg) -> Precision:
    """Decide `cfg.train.bf16` for the run about to start, in place ("auto" -> True / False),
    before its config.yaml is written. The device is the one accelerate will train on."""
    if cfg.train.bf16 == "auto" and cfg.model.dtype != "float32":
        cfg.train.bf16 = False  # bfloat16 weights compute in bf16 already; float64 is asked for
        why = f"bf16=auto: autocast is for float32 weights, these are {cfg.model.dtype}"
        return Precision(False, f"precision: {cfg.model.dtype} weights ({why})")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    precision = resolve_bf16(cfg.train.bf16, state.device, resumed=bool(cfg.train.resume))
    cfg.train.bf16 = precision.bf16
    return precision
