"""The functions that read LOSSES: validation, evaluation and the table of losses."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

from torch import Tensor

from .registry import LOSSES, LossSpec, get_spec
from .types import LossOutput, PreferenceLogps, UnpairedLogps


def _check_value(name: str, spec: LossSpec, hparam: str, value: Any) -> Any:
    default = spec.defaults[hparam]
    where = f"Loss {name!r}, hyper-parameter {hparam!r}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}.")
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{where} must be a number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    rule = spec.rule(hparam)
    if not math.isfinite(value) or not rule.check(value):
        hint = f" ({rule.hint})" if rule.hint else ""
        raise ValueError(f"{where} {rule.requirement}, got {value!r}{hint}.")
    return value


def validate_hparams(name: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The hyper-parameters of loss `name`, defaults filled in, every value checked.

    Raises ValueError for an unknown loss, an unknown hyper-parameter (naming the valid
    ones) or a bad value (saying what is allowed). Cheap: call it before any model loads.
    """
    spec = get_spec(name)
    unknown = [key for key in hparams if key not in spec.defaults]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, spec.defaults, n=1)
        guess = f" Did you mean {close[0]!r}?" if close else ""
        valid = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items()) or "none"
        raise ValueError(
            f"Loss {name!r} has no hyper-parameter {key!r}.{guess} Its hyper-parameters: {valid}."
        )
    resolved = dict(spec.defaults)
    resolved.update(hparams)
    return {key: _check_value(name, spec, key, value) for key, value in resolved.items()}


def _check_inputs(name: str, spec: LossSpec, logps: Any) -> None:
    expected = UnpairedLogps if spec.unpaired else PreferenceLogps
    if not isinstance(logps, expected):
        raise TypeError(
            f"Loss {name!r} takes {expected.__name__}, got {type(logps).__name__}."
            + (" KTO needs unpaired data." if spec.unpaired else "")
        )
    if spec.unpaired:
        _check_shapes(name, logps, ("policy_logps", "ref_logps", "labels", "lengths"))
        _check_shapes(name, logps, ("kl_policy_logps", "kl_ref_logps"))
        return
    if spec.needs_reference:
        for field_name in ("ref_chosen_logps", "ref_rejected_logps"):
            if getattr(logps, field_name) is None:
                free = ", ".join(k for k, s in LOSSES.items() if not s.needs_reference)
                raise ValueError(
                    f"Loss {name!r} needs reference log-probs but {field_name} is None. Compute "
                    f"them with the reference model (or a precomputed cache), or pick a "
                    f"reference-free loss: {free}."
                )
    if spec.needs_seq_kl:
        for field_name in ("chosen_seq_kl", "rejected_seq_kl"):
            if getattr(logps, field_name) is None:
                raise ValueError(
                    f"Loss {name!r} needs {field_name}: the per-sequence sum of "
                    f"KL(ref || policy) over completion tokens, from full-vocabulary reference "
                    f"logits (see preftune.losses.seq_kl_from_logits)."
                )
    _check_shapes(name, logps, tuple(vars(logps)))


def _check_shapes(name: str, logps: Any, field_names: tuple[str, ...]) -> None:
    """The named fields (None skipped) must all be 1-D with the shape of the first one."""
    first = getattr(logps, field_names[0])
    for field_name in field_names:
        value = getattr(logps, field_name)
        if value is not None and (value.dim() != 1 or value.shape != first.shape):
            raise ValueError(
                f"Loss {name!r}: {field_name} has shape {tuple(value.shape)}, expected "
                f"{tuple(first.shape)} like {field_names[0]} (one value per sequence)."
            )


def compute(
    name: str,
    logps: PreferenceLogps | UnpairedLogps,
    *,
    state: dict[str, Tensor] | None = None,
    **hparams: Any,
) -> LossOutput:
    """Evaluate loss `name` on a batch: per-example losses (not reduced) and detached rewards.

    Fills in default hyper-parameters and checks them, checks the inputs the loss declares it
    needs, and for stateful losses starts from `spec.init_state()` when `state` is None; the
    new state comes back in `LossOutput.state`.
    """
    spec = get_spec(name)
    resolved = validate_hparams(name, hparams)
    _check_inputs(name, spec, logps)
    if spec.stateful:
        return spec.fn(logps, state=spec.init_state() if state is None else state, **resolved)
    if state is not None:
        raise ValueError(f"Loss {name!r} keeps no state; pass state=None.")
    return spec.fn(logps, **resolved)


def format_hparams(defaults: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in defaults.items()) or "-"


def loss_table() -> list[dict[str, Any]]:
    """One row per loss, in registry order, for `preftune losses` and docs/losses.md."""
    return [
        {
            "name": name,
            "paper": spec.paper,
            "hyperparameters": format_hparams(spec.defaults),
            "defaults": dict(spec.defaults),
            "reduction": spec.reduction,
            "needs_reference": spec.needs_reference,
            "needs_seq_kl": spec.needs_seq_kl,
            "unpaired": spec.unpaired,
            "stateful": spec.stateful,
            "description": spec.description,
        }
        for name, spec in LOSSES.items()
    ]
