"""LOSSES: the one dict of every loss, with what each one declares it needs.

Each entry declares what the loss needs (reference, SeqKL, unpaired data, state); the trainer,
the config layer, the CLI table, the docs and the tests read these declarations and never
branch on a loss's name. `api.py` holds the functions that read the dict.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from . import dpo, kto, robust, simpo, tdpo, trl_extra
from .types import LossOutput


@dataclass(frozen=True)
class Rule:
    """A check on one hyper-parameter value, and the words to explain a failure."""

    check: Callable[[float], bool]
    requirement: str
    hint: str


# Checks by hyper-parameter name; a loss can override one through LossSpec.rules.
RULES: dict[str, Rule] = {
    "beta": Rule(lambda v: v > 0, "must be > 0", "beta is a temperature; 0.1 is the usual start"),
    "label_smoothing": Rule(
        lambda v: 0 <= v < 0.5,
        "must be in [0, 0.5)",
        "it is the assumed label-flip rate; 0.5 would mean labels carry no information",
    ),
    "length_normalized": Rule(lambda v: True, "must be true or false", ""),
    "z_score": Rule(lambda v: True, "must be true or false", ""),
    "delta": Rule(lambda v: v > 0, "must be > 0", "it is the ranking margin in log-prob units"),
    "nll_weight": Rule(lambda v: v >= 0, "must be >= 0", "use 0 to drop the NLL term"),
    "dpop_lambda": Rule(lambda v: v >= 0, "must be >= 0", "use 0 for plain DPO"),
    "gamma_beta_ratio": Rule(
        lambda v: v >= 0, "must be >= 0", "it is the target margin divided by beta; try 0.5"
    ),
    "orpo_lambda": Rule(lambda v: v >= 0, "must be >= 0", "it weighs the odds-ratio term; try 0.1"),
    "alpha": Rule(lambda v: v >= 0, "must be >= 0", "use 0 to switch the adaptive term off"),
    "momentum": Rule(
        lambda v: 0 <= v < 1, "must be in [0, 1)", "it is an EMA decay; the papers use 0.9"
    ),
    "beta_prime": Rule(
        lambda v: v > 0, "must be > 0", "it is Dr.DPO's robustness temperature; try 1.0"
    ),
    "desirable_weight": Rule(lambda v: v > 0, "must be > 0", "KTO's lambda_D; try 1.0"),
    "undesirable_weight": Rule(lambda v: v > 0, "must be > 0", "KTO's lambda_U; try 1.0"),
    "discopop_tau": Rule(lambda v: v > 0, "must be > 0", "the paper recommends 0.05"),
}


@dataclass(frozen=True)
class LossSpec:
    """Everything preftune knows about one loss.

    fn: the loss function, `fn(logps, **hparams)` (plus `state=` when stateful).
    paper: short citation with arXiv id. description: one line for tables.
    defaults: every hyper-parameter and its default; nothing else is accepted.
    reduction: "sum" or "mean", how the loss aggregates token log-probs. Informational: inputs
        are always sums and losses that average divide by the lengths themselves.
    needs_reference: reads ref_* log-probs. needs_seq_kl: reads chosen/rejected_seq_kl (TDPO).
    unpaired: takes UnpairedLogps (KTO) instead of PreferenceLogps.
    state_init: for stateful losses, builds the initial state (a dict of 0-d tensors).
    rules: per-loss overrides of RULES.
    """

    fn: Callable[..., LossOutput]
    paper: str
    description: str
    defaults: Mapping[str, Any]
    reduction: str = "sum"
    needs_reference: bool = True
    needs_seq_kl: bool = False
    unpaired: bool = False
    state_init: Callable[[], dict[str, Tensor]] | None = None
    rules: Mapping[str, Rule] = field(default_factory=dict)

    @property
    def stateful(self) -> bool:
        return self.state_init is not None

    @property
    def has_beta(self) -> bool:
        return "beta" in self.defaults

    def init_state(self) -> dict[str, Tensor]:
        if self.state_init is None:
            raise ValueError("this loss keeps no state")
        return self.state_init()

    def rule(self, hparam: str) -> Rule:
        return self.rules.get(hparam, RULES[hparam])


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(
        dpo.dpo_loss,
        "Rafailov et al. 2023, DPO (arXiv:2305.18290); cDPO: Mitchell 2023",
        "Sigmoid DPO; conservative DPO (cDPO) when label_smoothing > 0",
        {"beta": 0.1, "label_smoothing": 0.0},
    ),
    "robust_dpo": LossSpec(
        dpo.robust_dpo_loss,
        "Chowdhury et al. 2024, Provably Robust DPO (arXiv:2403.00409)",
        "DPO made unbiased under a known label-flip rate (TRL 'robust')",
        {"beta": 0.1, "label_smoothing": 0.1},
    ),
    "dpo_ref_free": LossSpec(
        dpo.dpo_ref_free_loss,
        "Rafailov et al. 2023, DPO (arXiv:2305.18290), reference-free variant",
        "DPO against a uniform reference: -logsig(beta*(logp_w - logp_l)), summed log-probs",
        {"beta": 0.1},
        needs_reference=False,
    ),
    "ipo": LossSpec(
        dpo.ipo_loss,
        "Azar et al. 2023, IPO (arXiv:2310.12036)",
        "Squared loss (h - 1/(2 tau))^2 with beta = tau; per-token log-ratios by default",
        {"beta": 0.1, "length_normalized": True},
        reduction="mean",
    ),
    "sigmoid_norm": LossSpec(
        dpo.sigmoid_norm_loss,
        "TRL 'sigmoid_norm' (length normalisation as in SimPO, arXiv:2405.14734)",
        "DPO on per-token log-ratios (not RSO's sigmoid-norm, which is plain DPO)",
        {"beta": 0.1},
        reduction="mean",
    ),
    "slic": LossSpec(
        simpo.slic_loss,
        "Zhao et al. 2023, SLiC-HF (arXiv:2305.10425)",
        "Hinge on summed log-probs, no reference, plus an NLL term on the chosen response",
        {"delta": 1.0, "nll_weight": 0.1},
        needs_reference=False,
    ),
    "hinge": LossSpec(
        dpo.hinge_loss,
        "Liu et al. 2024, RSO hinge-norm (arXiv:2309.06657)",
        "relu(1 - beta*h): RSO's hinge-norm, TRL's 'hinge' (not SLiC)",
        {"beta": 0.05},
    ),
    "dpop": LossSpec(
        dpo.dpop_loss,
        "Pal et al. 2024, Smaug / DPO-Positive (arXiv:2402.13228)",
        "DPO with a penalty inside the sigmoid when the chosen likelihood drops below ref",
        {"beta": 0.3, "dpop_lambda": 50.0},
    ),
    "rpo": LossSpec(
        dpo.rpo_loss,
        "Pang et al. 2024, Iterative RPO (arXiv:2404.19733)",
        "DPO plus nll_weight times the per-token NLL of the chosen response",
        {"beta": 0.1, "nll_weight": 1.0},
    ),
    "simpo": LossSpec(
        simpo.simpo_loss,
        "Meng, Xia, Chen 2024, SimPO (arXiv:2405.14734)",
        "Reference-free, per-token log-probs, target margin gamma = beta*gamma_beta_ratio",
        {"beta": 2.0, "gamma_beta_ratio": 0.5},
        reduction="mean",
        needs_reference=False,
    ),
    "orpo": LossSpec(
        simpo.orpo_loss,
        "Hong et al. 2024, ORPO (arXiv:2403.07691)",
        "Chosen NLL minus orpo_lambda * logsig(log odds ratio), reference-free",
        {"orpo_lambda": 0.1},
        reduction="mean",
        needs_reference=False,
    ),
    "alpha_dpo": LossSpec(
        simpo.alpha_dpo_loss,
        "Wu et al. 2025, AlphaDPO (arXiv:2410.10148)",
        "SimPO logits with a detached, z-scored, reference-based adaptive margin (EMA state)",
        {"beta": 2.5, "gamma_beta_ratio": 0.6, "alpha": 0.2, "momentum": 0.9, "z_score": True},
        reduction="mean",
        state_init=simpo.alpha_dpo_init_state,
    ),
    "dr_dpo": LossSpec(
        robust.dr_dpo_loss,
        "Wu et al. 2024, Dr. DPO (arXiv:2407.07880)",
        "Log-mean-exp of per-pair DPO losses over the batch; down-weights likely-flipped pairs",
        {"beta": 0.1, "beta_prime": 1.0, "label_smoothing": 0.0},
    ),
    "tdpo1": LossSpec(
        tdpo.tdpo1_loss,
        "Zeng et al. 2024, Token-level DPO (arXiv:2404.11999)",
        "DPO minus the sequential-KL difference (KL(ref||policy) summed over tokens)",
        {"beta": 0.1, "alpha": 0.5},
        needs_seq_kl=True,
    ),
    "tdpo2": LossSpec(
        tdpo.tdpo2_loss,
        "Zeng et al. 2024, Token-level DPO (arXiv:2404.11999)",
        "TDPO with alpha-weighted SeqKL difference, chosen SeqKL detached",
        {"beta": 0.1, "alpha": 0.5},
        needs_seq_kl=True,
    ),
    "kto": LossSpec(
        kto.kto_loss,
        "Ethayarajh et al. 2024, KTO (arXiv:2402.01306)",
        "Unpaired desirable/undesirable examples against a detached KL reference point",
        {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
        unpaired=True,
    ),
    "exo_pair": LossSpec(
        trl_extra.exo_pair_loss,
        "Ji et al. 2024, EXO (arXiv:2402.00856)",
        "Reverse KL between the model's pair distribution and smoothed labels (TRL 'exo_pair')",
        {"beta": 0.1, "label_smoothing": 1e-3},
        rules={
            "label_smoothing": Rule(
                lambda v: 0 < v < 0.5,
                "must be in (0, 0.5)",
                "EXO takes log(label_smoothing); TRL's default is 1e-3",
            )
        },
    ),
    "nca_pair": LossSpec(
        trl_extra.nca_pair_loss,
        "Chen et al. 2024, NCA (arXiv:2402.05369)",
        "Noise-contrastive alignment on absolute rewards (TRL 'nca_pair')",
        {"beta": 0.1},
    ),
    "bco_pair": LossSpec(
        trl_extra.bco_pair_loss,
        "Jung et al. 2024, BCO (arXiv:2404.04656)",
        "Binary classifier on implicit rewards around a running reward mean (TRL 'bco_pair')",
        {"beta": 0.1},
        state_init=trl_extra.bco_pair_init_state,
    ),
    "sppo_hard": LossSpec(
        trl_extra.sppo_hard_loss,
        "Wu et al. 2024, SPPO (arXiv:2405.00675)",
        "Squared loss pushing rewards to +1/2 and -1/2, hard labels (TRL 'sppo_hard')",
        {"beta": 0.1},
    ),
    "aot": LossSpec(
        trl_extra.aot_loss,
        "Melnyk et al. 2024, AOT (arXiv:2406.05882)",
        "Sorted policy vs reference log-ratios, quantile-wise DPO (TRL 'aot', paired)",
        {"beta": 0.1, "label_smoothing": 0.0},
    ),
    "aot_unpaired": LossSpec(
        trl_extra.aot_unpaired_loss,
        "Melnyk et al. 2024, AOT (arXiv:2406.05882)",
        "Sorted chosen vs rejected rewards, quantile-wise DPO (TRL 'aot_unpaired')",
        {"beta": 0.1, "label_smoothing": 0.0},
    ),
    "apo_zero": LossSpec(
        trl_extra.apo_zero_loss,
        "D'Oosterlinck et al. 2024, APO (arXiv:2408.06266)",
        "Anchored: raise chosen, lower rejected likelihood (TRL 'apo_zero')",
        {"beta": 0.1},
    ),
    "apo_down": LossSpec(
        trl_extra.apo_down_loss,
        "D'Oosterlinck et al. 2024, APO (arXiv:2408.06266)",
        "Anchored: lower both likelihoods, rejected more (TRL 'apo_down')",
        {"beta": 0.1},
    ),
    "discopop": LossSpec(
        trl_extra.discopop_loss,
        "Lu et al. 2024, DiscoPOP (arXiv:2406.08414)",
        "Log-ratio modulated blend of logistic and exponential losses (TRL 'discopop')",
        {"beta": 0.1, "discopop_tau": 0.05},
    ),
}


def get_spec(name: str) -> LossSpec:
    """LOSSES[name], or a ValueError listing the valid names with a did-you-mean."""
    if name in LOSSES:
        return LOSSES[name]
    close = difflib.get_close_matches(str(name), LOSSES, n=3)
    guess = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"Unknown loss {name!r}.{guess} Valid losses: {', '.join(LOSSES)}.")
