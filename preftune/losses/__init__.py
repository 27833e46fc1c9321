"""Every loss of the DPO family behind one registry (METHODS.md is the specification).

    from preftune.losses import LOSSES, compute, PreferenceLogps

    out = compute("dpo", logps, beta=0.1)      # out.losses is (B,), not reduced
    loss = out.losses.mean()

`LOSSES` is the single list of losses; the CLI table, docs/losses.md, the config checks and the
tests are all generated from it.
"""

from .api import compute, loss_table, validate_hparams
from .registry import LOSSES, RULES, LossSpec, Rule, get_spec
from .tdpo import seq_kl_from_logits
from .types import LossOutput, PreferenceLogps, UnpairedLogps

__all__ = [
    "LOSSES",
    "RULES",
    "LossOutput",
    "LossSpec",
    "PreferenceLogps",
    "Rule",
    "UnpairedLogps",
    "compute",
    "get_spec",
    "loss_table",
    "seq_kl_from_logits",
    "validate_hparams",
]
