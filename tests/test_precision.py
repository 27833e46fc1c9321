"""bf16=auto: decided from the device's bf16 units, overridable, stored for resume; and bf16
autocast trains within a stated tolerance of fp32."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from run_helpers import tiny_run_config

from preftune import precision
from preftune.api import train
from preftune.config import ConfigError, build_config
from preftune.precision import ENV, cpu_flags, resolve_bf16
from preftune.train.rundir import resume_config
from preftune.train.trainer import Trainer

CPU = torch.device("cpu")


@pytest.fixture
def cpu_with(monkeypatch):
    """Make this CPU's /proc/cpuinfo flags the given ones (the hardware check, not the env)."""
    monkeypatch.delenv(ENV, raising=False)
    return lambda *flags: monkeypatch.setattr(precision, "cpu_flags", lambda: {"fpu", *flags})


def test_cpuinfo_flags_are_read(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n\nprocessor: 1\n")
    assert cpu_flags(info) == {"fpu", "avx512f", "avx512_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_auto_is_fp32_without_bf16_units_and_bf16_with_them(cpu_with):
    cpu_with("avx2", "avx512f")  # AVX-512 without its BF16 extension: emulated, so fp32
    p = resolve_bf16("auto", CPU)
    assert not p.bf16 and "fp32 (bf16=auto: this CPU has neither AMX nor AVX-512-BF16)" in p.line
    for flag, name in (("avx512_bf16", "AVX-512-BF16"), ("amx_bf16", "AMX")):
        cpu_with(flag)
        p = resolve_bf16("auto", CPU)
        assert p.bf16 and f"bf16=auto: this CPU has {name}" in p.line
    # an explicit setting wins either way, and says when it will be slow
    assert not resolve_bf16(False, CPU).bf16
    cpu_with()
    p = resolve_bf16(True, CPU)
    assert p.bf16 and "emulated and slower" in p.line
    assert not resolve_bf16("auto", torch.device("meta")).bf16  # unknown devices: fp32


def test_auto_is_fp32_autocast_only_over_float32_weights(cpu_with):
    """bfloat16 weights compute in bf16 already, float64 is asked for: auto leaves both alone."""
    cpu_with("amx_bf16")
    for dtype in ("bfloat16", "float64"):
        cfg = build_config(None, [f"dtype={dtype}"])
        p = precision.settle_bf16(cfg)
        assert cfg.train.bf16 is False and not p.bf16 and f"these are {dtype}" in p.line
    cfg = build_config(None)
    assert precision.settle_bf16(cfg).bf16 and cfg.train.bf16 is True


def test_bf16_key_takes_auto_true_false_and_old_booleans():
    assert build_config(None).train.bf16 == "auto"
    for given, want in ((["bf16=true"], True), (["bf16=False"], False), ({"bf16": True}, True)):
        assert build_config(None, given).train.bf16 is want
    with pytest.raises(ConfigError, match="bf16 must be auto, true or false, got 'fast'"):
        build_config(None, ["bf16=fast"])


def test_auto_is_stored_resolved_and_kept_on_resume(tiny_dir, tmp_path, monkeypatch, cpu_with):
    """A run started with bf16=auto on a CPU without bf16 units writes bf16: false; resuming it
    on one with them (bf16=auto given again) keeps false, and says so."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    cpu_with("avx2")
    run = train(tiny_run_config(tiny_dir, tmp_path, "auto", max_steps=1, bf16="auto")).run_dir
    assert yaml.safe_load((run / "config.yaml").read_text())["bf16"] is False
    cpu_with("amx_bf16")
    cfg, notes = resume_config(run, None, ["bf16=auto", "max_steps=2"])
    assert cfg.train.bf16 is False
    assert "resume: bf16=auto keeps the run's bf16=False, decided at its start" in notes
    assert "kept on resume" in resolve_bf16(cfg.train.bf16, CPU, resumed=True).line


def test_bf16_autocast_losses_within_tolerance_of_fp32(tiny_dir, tmp_path, monkeypatch, request):
    """Three steps of the same run, fp32 and bf16 autocast: per-step losses within 5e-4 nats
    (bf16 matmuls keep ~3 significant digits; measured here: 2e-5) once training has moved
    them away from log 2."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    losses = {}
    for bf16 in (False, True):  # accelerate keeps one mixed-precision setting per process
        AcceleratorState._reset_state(reset_partial_state=True)
        t = Trainer(tiny_run_config(tiny_dir, tmp_path, f"bf16{bf16}", bf16=bf16, max_steps=3))
        losses[bf16] = []
        for step, batch in enumerate(([0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11])):
            t.step = step
            losses[bf16].append(t.train_step(batch)["loss"])
    assert losses[False][-1] < math.log(2) - 1e-3, losses
    for a, b in zip(losses[False], losses[True]):
        assert abs(a - b) < 5e-4, losses
