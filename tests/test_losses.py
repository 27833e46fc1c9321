"""The loss registry against METHODS.md: exact test vectors, identities, gradients, errors.

All vectors are float64 and checked to 1e-6, the precision METHODS.md quotes them at.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from pathlib import Path

import pytest
import torch

from preftune.losses import (
    LOSSES,
    LossOutput,
    PreferenceLogps,
    UnpairedLogps,
    compute,
    loss_table,
    seq_kl_from_logits,
    validate_hparams,
)
from preftune.losses.simpo import alpha_dpo_margin

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]

# (logp_w, logp_l, ref_w, ref_l, len_w, len_l), METHODS.md §0 and the sections that use them.
A = (-10.0, -12.0, -11.0, -11.5, 5, 8)  # h = 1.5
B = (-20.5, -18.0, -19.0, -19.5, 10, 6)  # h = -3.0
C = (-12.0, -15.0, -11.0, -13.0, 1, 1)  # h = 1, DPOP penalty 1
D1 = (-10.0, -12.0, -11.0, -11.0, 5, 8)
D3 = (-7.0, -9.0, -8.0, -8.5, 4, 4)
ORPO_O = (-2.0, -6.0, None, None, 4, 6)  # ORPO: avg_w = -0.5, avg_l = -1.0
ONLINE = (-12.0, -10.0, -12.5, -10.2, 1, 1)


def t(values, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=F64, requires_grad=requires_grad)


def pairs(*rows, seq_kl=None, ref: bool = True) -> PreferenceLogps:
    w, lo, rw, rl, lw, ll = zip(*rows, strict=True)
    has_ref = ref and rw[0] is not None
    return PreferenceLogps(
        policy_chosen_logps=t(w),
        policy_rejected_logps=t(lo),
        ref_chosen_logps=t(rw) if has_ref else None,
        ref_rejected_logps=t(rl) if has_ref else None,
        chosen_lengths=t(lw),
        rejected_lengths=t(ll),
        chosen_seq_kl=None if seq_kl is None else t(seq_kl[0]),
        rejected_seq_kl=None if seq_kl is None else t(seq_kl[1]),
    )


def losses(name: str, logps, **hparams) -> list[float]:
    return compute(name, logps, **hparams).losses.tolist()


def softplus(x: float) -> float:
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# METHODS.md test vectors
# ---------------------------------------------------------------------------------------------

VECTORS = [
    # §1 DPO, cDPO, rDPO, reference-free
    ("dpo", [A], {"beta": 0.1}, [0.620957]),
    ("dpo", [B], {"beta": 0.5}, [1.701413]),
    ("dpo", [A], {"beta": 0.1, "label_smoothing": 0.1}, [0.635957]),
    ("dpo", [B], {"beta": 0.5, "label_smoothing": 0.2}, [1.401413]),
    ("robust_dpo", [A], {"beta": 0.1, "label_smoothing": 0.1}, [0.602207]),
    ("dpo_ref_free", [A], {"beta": 0.1}, [0.598139]),
    ("dpo_ref_free", [B], {"beta": 0.5}, [1.501929]),
    # §2 IPO, both forms
    ("ipo", [A], {"beta": 0.1, "length_normalized": False}, [12.25]),
    ("ipo", [A], {"beta": 0.1, "length_normalized": True}, [22.443906]),
    ("ipo", [B], {"beta": 0.5, "length_normalized": False}, [16.0]),
    ("ipo", [B], {"beta": 0.5, "length_normalized": True}, [1.96]),
    # §3 SLiC-HF (delta 1, lambda 0.1); token-mean NLL is the implemented form
    ("slic", [A], {"delta": 1.0, "nll_weight": 0.1}, [0.2]),
    # §4 RSO: hinge-norm = `hinge`, sigmoid-norm = plain DPO with beta = gamma, TRL hinge
    ("hinge", [A], {"beta": 0.05}, [0.925]),
    ("hinge", [B], {"beta": 0.5}, [2.5]),
    ("dpo", [A], {"beta": 0.05}, [0.656350]),
    ("hinge", [A], {"beta": 0.1}, [0.85]),
    # §5 DPOP
    ("dpop", [A], {"beta": 0.1, "dpop_lambda": 50.0}, [0.620957]),
    ("dpop", [C], {"beta": 0.1, "dpop_lambda": 50.0}, [4.907419]),
    ("dpop", [C], {"beta": 0.3, "dpop_lambda": 5.0}, [1.463282]),
    ("dpo", [C], {"beta": 0.1}, [0.644397]),
    # §7 Dr. DPO: every entry holds the batch objective
    ("dr_dpo", [D1, B, D3], {"beta": 0.1, "beta_prime": 1.0}, [0.684636] * 3),
    ("dr_dpo", [D1, B, D3], {"beta": 0.1, "beta_prime": 0.5}, [0.678531] * 3),
    ("dpo", [D1, B, D3], {"beta": 0.1}, [0.598139, 0.854355, 0.620957]),
    # §10 ORPO
    ("orpo", [ORPO_O], {"orpo_lambda": 0.1}, [0.532030]),
    ("orpo", [ORPO_O], {"orpo_lambda": 1.0}, [0.820300]),
    # §11 SimPO
    ("simpo", [A], {"beta": 2.0, "gamma_beta_ratio": 0.5}, [2.126928]),
    ("simpo", [B], {"beta": 2.5, "gamma_beta_ratio": 0.55}, [0.313262]),
    ("simpo", [A], {"beta": 10.0, "gamma_beta_ratio": 0.3}, [8.000335]),
    # §13 online DPO, after labelling (y2 chosen)
    ("dpo", [ONLINE], {"beta": 0.1}, [0.678260]),
    # §15 RPO, NLL = -logp_w / len_w
    ("rpo", [A], {"beta": 0.1, "nll_weight": 1.0}, [2.620957]),
    ("rpo", [A], {"beta": 0.1, "nll_weight": 0.2}, [1.020957]),
]


@pytest.mark.parametrize(("name", "rows", "hparams", "expected"), VECTORS)
def test_methods_vector(name, rows, hparams, expected):
    assert losses(name, pairs(*rows), **hparams) == pytest.approx(expected, abs=1e-6)


def test_slic_sequence_sum_nll_vectors():
    # METHODS §3 also quotes the sequence-sum NLL; it is the token mean with unit lengths.
    a_sum = (*A[:4], 1, 1)
    b_sum = (*B[:4], 1, 1)
    assert losses("slic", pairs(a_sum)) == pytest.approx([1.0], abs=1e-6)
    out = compute("slic", pairs(b_sum))
    assert out.losses.tolist() == pytest.approx([5.55], abs=1e-6)
    assert out.losses.item() - 0.1 * out.metrics["nll"].item() == pytest.approx(3.5, abs=1e-6)


def test_orpo_log_odds_ratio():
    out = compute("orpo", pairs(ORPO_O), orpo_lambda=0.1)
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(0.974077, abs=1e-6)
    assert softplus(-out.metrics["log_odds_ratio"].item()) == pytest.approx(0.320300, abs=1e-6)
    assert out.metrics["nll"].item() == pytest.approx(0.5, abs=1e-6)


def test_orpo_is_finite_when_average_logprob_is_zero():
    chosen = t([0.0], requires_grad=True)
    logps = PreferenceLogps(chosen, t([-6.0]), None, None, t([4.0]), t([6.0]))
    out = compute("orpo", logps)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(chosen.grad).all()


def test_rpo_nll_is_mean_of_per_sequence_means():
    # METHODS §15: TRL's batch token mean is 2.033333, the per-sequence mean 2.025000.
    out = compute("rpo", pairs(A, B))
    assert out.metrics["nll"].item() == pytest.approx(2.025, abs=1e-6)


def test_sigmoid_norm_vector():
    # vector A: lr_w = 1 over 5 tokens, lr_l = -0.5 over 8 -> h_avg = 0.2 + 0.0625
    assert losses("sigmoid_norm", pairs(A), beta=0.1) == pytest.approx(
        [softplus(-0.1 * 0.2625)], abs=1e-9
    )


ALPHA_BATCH = [D1, B, D3]
ALPHA_STATE = {"mu": torch.tensor(0.05, dtype=F64), "s": torch.tensor(0.3, dtype=F64)}
ALPHA_HP = {"beta": 2.5, "gamma_beta_ratio": 0.6, "alpha": 0.2}


def test_alpha_dpo_vectors_margins_and_ema():
    logps = pairs(*ALPHA_BATCH)
    out = compute("alpha_dpo", logps, state=dict(ALPHA_STATE), **ALPHA_HP)
    assert out.state["mu"].item() == pytest.approx(0.055, abs=1e-6)
    assert out.state["s"].item() == pytest.approx(0.313373, abs=1e-6)
    assert out.losses.tolist() == pytest.approx([3.221508, 0.183738, 1.144064], abs=1e-6)
    assert out.losses.mean().item() == pytest.approx(1.516437, abs=1e-6)

    gap = t([(w - rw) / lw - (lo - rl) / ll for w, lo, rw, rl, lw, ll in ALPHA_BATCH])
    margins = alpha_dpo_margin(
        gap, out.state["mu"], out.state["s"], alpha=0.2, gamma_beta_ratio=0.6, z_score=True
    )
    assert margins.tolist() == pytest.approx([0.772318, 0.309612, 0.804229], abs=1e-6)


def test_alpha_dpo_paper_form_without_z_score():
    out = compute("alpha_dpo", pairs(*ALPHA_BATCH), state=dict(ALPHA_STATE), z_score=False)
    assert out.losses[0].item() == pytest.approx(2.965415, abs=1e-6)


def test_alpha_dpo_state_flows_between_calls():
    logps = pairs(*ALPHA_BATCH)
    first = compute("alpha_dpo", logps, **ALPHA_HP)  # state None -> zeros
    # gaps [0.325, -0.4, 0.375], mean 0.1
    assert first.state["mu"].item() == pytest.approx(0.1 * 0.1, abs=1e-9)
    second = compute("alpha_dpo", logps, state=first.state, **ALPHA_HP)
    assert second.state["mu"].item() == pytest.approx(0.9 * 0.01 + 0.01, abs=1e-9)
    assert not torch.equal(first.losses, second.losses)


def test_alpha_dpo_first_step_with_policy_equal_reference_is_finite():
    same = (-10.0, -12.0, -10.0, -12.0, 5, 8)
    out = compute("alpha_dpo", pairs(same, same))
    assert torch.isfinite(out.losses).all()
    single = compute("alpha_dpo", pairs(A))  # one pair: std 0, margin = gamma_beta_ratio
    assert single.losses.item() == pytest.approx(softplus(-2.5 * (-2 + 1.5 - 0.6)), abs=1e-9)


def test_alpha_dpo_rewards_are_not_dpo_rewards():
    out = compute("alpha_dpo", pairs(A), **ALPHA_HP)
    # beta * (avg - alpha * (avg - ref_avg)) with avg_w = -2, ref_avg_w = -2.2
    assert out.chosen_rewards.item() == pytest.approx(2.5 * (-2.0 - 0.2 * 0.2), abs=1e-9)


T1 = ((1.0, -1.0, 0.0, 0.0, 3, 3), (0.3, 0.8))  # u = 2, SeqKL_w = 0.3, SeqKL_l = 0.8
T2 = ((-5.5, -4.6, -5.0, -5.0, 3, 3), (1.2, 0.2))  # lr_w = -0.5, lr_l = 0.4


TDPO_VECTORS = [
    ("tdpo1", T1, {"beta": 0.1}, 0.620957),
    ("tdpo2", T1, {"beta": 0.1, "alpha": 0.5}, 0.609470),
    ("tdpo1", T2, {"beta": 0.5}, 0.668460),
    ("tdpo2", T2, {"beta": 0.5, "alpha": 0.5}, 0.798139),
]


@pytest.mark.parametrize(("name", "case", "hparams", "expected"), TDPO_VECTORS)
def test_tdpo_vectors(name, case, hparams, expected):
    row, (kl_w, kl_l) = case
    logps = pairs(row, seq_kl=((kl_w,), (kl_l,)))
    assert losses(name, logps, **hparams) == pytest.approx([expected], abs=1e-6)


def test_seq_kl_toy():
    p_ref = t([[[0.5, 0.3, 0.2], [0.6, 0.2, 0.2]]])
    p_theta = t([[[0.4, 0.4, 0.2], [0.7, 0.1, 0.2]]])
    kl = seq_kl_from_logits(p_theta.log(), p_ref.log(), torch.ones(1, 2))
    assert kl.tolist() == pytest.approx([0.071406], abs=1e-6)
    # the direction matters: KL(theta || ref) is a different number
    assert seq_kl_from_logits(p_ref.log(), p_theta.log(), torch.ones(1, 2)).item() != (
        pytest.approx(0.071406, abs=1e-4)
    )
    # masked positions do not count
    masked = seq_kl_from_logits(p_theta.log(), p_ref.log(), torch.tensor([[1.0, 0.0]]))
    assert masked.item() == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4))


def kto_batch(kl_pairs) -> UnpairedLogps:
    return UnpairedLogps(
        policy_logps=t([-10.0, -7.0, -12.0]),
        ref_logps=t([-11.0, -8.5, -11.0]),
        labels=torch.tensor([True, True, False]),
        kl_policy_logps=t([p for p, _ in kl_pairs]),
        kl_ref_logps=t([r for _, r in kl_pairs]),
    )


KTO_KL = [(-30.0, -30.4), (-25.0, -25.1), (-28.0, -27.9)]


def test_kto_vectors():
    out = compute("kto", kto_batch(KTO_KL), beta=0.1)
    assert out.metrics["kl"].item() == pytest.approx(0.133333, abs=1e-6)
    assert out.losses.tolist() == pytest.approx([0.478347, 0.465886, 0.471697], abs=1e-6)
    assert out.losses.mean().item() == pytest.approx(0.471977, abs=1e-6)
    weighted = compute("kto", kto_batch(KTO_KL), undesirable_weight=1.33)
    assert weighted.losses.mean().item() == pytest.approx(0.523863, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.15])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1])


def test_kto_negative_kl_is_clamped():
    out = compute("kto", kto_batch([(-30.0, -29.0), (-25.0, -25.5)]))
    assert out.metrics["kl"].item() == 0.0
    assert out.losses.mean().item() == pytest.approx(0.470871, abs=1e-6)


def test_kto_handles_batches_without_undesirable_examples():
    batch = kto_batch(KTO_KL)
    only_good = UnpairedLogps(**{**vars(batch), "labels": torch.tensor([True, True, True])})
    out = compute("kto", only_good)
    assert out.rejected_rewards.numel() == 0 and torch.isfinite(out.losses).all()


# TRL's extra objectives: METHODS.md has no vectors, so each is checked against its formula
# written out independently with scalars (vector A, beta 0.1: h = 1.5, lr_w = 1, lr_l = -0.5).
LR_W, LR_L, H = 1.0, -0.5, 1.5


def logsig(x: float) -> float:
    return -softplus(-x)


TRL_FORMULAS = {
    "exo_pair": lambda b, eps=1e-3: (
        sigmoid(b * H) * (logsig(b * H) - math.log(1 - eps))
        + sigmoid(-b * H) * (logsig(-b * H) - math.log(eps))
    ),
    "nca_pair": lambda b: -logsig(b * LR_W) - 0.5 * logsig(-b * LR_W) - 0.5 * logsig(-b * LR_L),
    "sppo_hard": lambda b: (LR_W - 0.5 / b) ** 2 + (LR_L + 0.5 / b) ** 2,
    "apo_zero": lambda b: 1 - sigmoid(b * LR_W) + sigmoid(b * LR_L),
    "apo_down": lambda b: sigmoid(b * LR_W) + 1 - sigmoid(b * H),
    "discopop": lambda b, tau=0.05: (
        -logsig(b * H) * (1 - sigmoid(b * H / tau)) + math.exp(-b * H) * sigmoid(b * H / tau)
    ),
    # first call: the running mean is this batch's mean reward
    "bco_pair": lambda b: (
        -logsig(b * LR_W - b * (LR_W + LR_L) / 2) - logsig(-(b * LR_L - b * (LR_W + LR_L) / 2))
    ),
    "aot": lambda b: -logsig(b * H),
    "aot_unpaired": lambda b: -logsig(b * H),
}


@pytest.mark.parametrize("name", sorted(TRL_FORMULAS))
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_trl_extra_losses_match_their_formulas(name, beta):
    assert losses(name, pairs(A), beta=beta) == pytest.approx([TRL_FORMULAS[name](beta)], abs=1e-9)


def test_aot_sorts_quantiles_across_the_batch():
    # pair 0 has the larger policy log-ratio, pair 1 the larger reference log-ratio
    logps = pairs((0.0, -4.0, 0.0, -1.0, 1, 1), (0.0, -1.0, 0.0, -3.0, 1, 1))
    # sorted policy [1, 4], sorted ref [1, 3] -> deltas [0, 1]
    assert losses("aot", logps, beta=1.0) == pytest.approx([softplus(0.0), softplus(-1.0)])
    # unpaired: chosen rewards [0, 0], rejected rewards [-3, 2] -> sorted deltas [3, -2]
    assert losses("aot_unpaired", logps, beta=1.0) == pytest.approx([softplus(-3), softplus(2)])


def test_bco_pair_running_mean_is_cumulative_over_calls():
    first = compute("bco_pair", pairs(A), beta=0.1)
    assert first.state["reward_mean"].item() == pytest.approx(0.1 * (LR_W + LR_L) / 2)
    second = compute("bco_pair", pairs(B), state=first.state, beta=0.1)
    mean_b = 0.1 * ((-20.5 + 19.0) + (-18.0 + 19.5)) / 2
    assert second.state["reward_mean"].item() == pytest.approx((0.025 + mean_b) / 2)
    assert second.state["count"].item() == 2


def test_discopop_is_finite_for_very_negative_margins():
    out = compute("discopop", pairs((-500.0, 0.0, 0.0, 0.0, 1, 1)), beta=1.0)
    assert torch.isfinite(out.losses).all()
    assert out.losses.item() == pytest.approx(500.0, abs=1e-6)  # the logistic part only


# ---------------------------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------------------------

BATCH = pairs(A, B, C, D3)


def test_label_smoothing_zero_is_dpo():
    dpo = compute("dpo", BATCH, beta=0.2).losses
    logits = 0.2 * (BATCH.policy_chosen_logps - BATCH.policy_rejected_logps)
    logits = logits - 0.2 * (BATCH.ref_chosen_logps - BATCH.ref_rejected_logps)
    torch.testing.assert_close(dpo, -torch.nn.functional.logsigmoid(logits))
    torch.testing.assert_close(
        compute("robust_dpo", BATCH, beta=0.2, label_smoothing=0.0).losses, dpo
    )
    torch.testing.assert_close(compute("aot", pairs(A), beta=0.2).losses, dpo[:1])


@pytest.mark.parametrize(
    ("name", "hparams"),
    [
        ("dpop", {"dpop_lambda": 0.0, "beta": 0.1}),
        ("rpo", {"nll_weight": 0.0}),
        ("robust_dpo", {"label_smoothing": 0.0}),
        ("sigmoid_norm", {}),  # with unit lengths below
    ],
)
def test_reduces_to_dpo(name, hparams):
    unit = pairs(*[(*row[:4], 1, 1) for row in (A, B, C, D3)])
    torch.testing.assert_close(
        compute(name, unit, **hparams).losses,
        compute("dpo", unit, beta=hparams.get("beta", 0.1)).losses,
    )


def test_ipo_forms_agree_with_unit_lengths():
    unit = pairs(*[(*row[:4], 1, 1) for row in (A, B, C)])
    torch.testing.assert_close(
        compute("ipo", unit, length_normalized=True).losses,
        compute("ipo", unit, length_normalized=False).losses,
    )


@pytest.mark.parametrize("name", ["tdpo1", "tdpo2"])
def test_tdpo_with_zero_kl_is_dpo(name):
    zero = torch.zeros(4, dtype=F64)
    logps = PreferenceLogps(**{**vars(BATCH), "chosen_seq_kl": zero, "rejected_seq_kl": zero})
    torch.testing.assert_close(compute(name, logps).losses, compute("dpo", BATCH).losses)


def test_dr_dpo_tends_to_mean_dpo_as_beta_prime_grows():
    mean_dpo = compute("dpo", BATCH).losses.mean()
    far = compute("dr_dpo", BATCH, beta_prime=1e6).losses.mean()
    near = compute("dr_dpo", BATCH, beta_prime=1.0).losses.mean()
    assert abs(far - mean_dpo) < 1e-6 < abs(near - mean_dpo)
    # and towards the smallest pair loss as beta_prime -> 0
    low = compute("dr_dpo", BATCH, beta_prime=1e-4).losses.mean()
    assert low.item() == pytest.approx(compute("dpo", BATCH).losses.min().item(), abs=1e-3)


def test_dr_dpo_gradient_weights_pairs_by_softmax():
    logps = pairs(D1, B, D3)
    chosen = logps.policy_chosen_logps.clone().requires_grad_(True)
    logps = PreferenceLogps(**{**vars(logps), "policy_chosen_logps": chosen})
    compute("dr_dpo", logps, beta_prime=0.5).losses.mean().backward()
    pair = compute("dpo", logps).losses.detach()
    weights = torch.softmax(-pair / 0.5, dim=0)
    h = t([2.0, -3.0, 1.5])  # per-pair h of D1, B, D3
    expected = weights * (-0.1 * torch.sigmoid(-0.1 * h))
    torch.testing.assert_close(chosen.grad, expected)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------


def random_pairs(batch: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: lo + (hi - lo) * torch.rand(batch, generator=g, dtype=F64)  # noqa: E731
    return {
        "policy_chosen_logps": rand(-20, -5),
        "policy_rejected_logps": rand(-20, -5),
        "ref_chosen_logps": rand(-20, -5),
        "ref_rejected_logps": rand(-20, -5),
        "chosen_lengths": torch.randint(3, 12, (batch,), generator=g).to(F64),
        "rejected_lengths": torch.randint(3, 12, (batch,), generator=g).to(F64),
        "chosen_seq_kl": rand(0, 2),
        "rejected_seq_kl": rand(0, 2),
    }


def random_unpaired(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "policy_logps": -5 - 10 * torch.rand(5, generator=g, dtype=F64),
        "ref_logps": -5 - 10 * torch.rand(5, generator=g, dtype=F64),
        "labels": torch.tensor([True, False, True, True, False]),
        "kl_policy_logps": -5 - 10 * torch.rand(5, generator=g, dtype=F64),
        "kl_ref_logps": -5 - 10 * torch.rand(5, generator=g, dtype=F64),
    }


# Losses with a stop-gradient cannot be gradchecked through it: finite differences see the
# detached path move. Each gets a setting where the detached quantity is constant, or leaves
# that input out; the stop-gradients themselves are tested below.
GRADCHECK_SETUP = {
    "alpha_dpo": ({"alpha": 0.0}, None, None),
    "bco_pair": ({}, {"reward_mean": torch.tensor(0.3), "count": torch.tensor(1e12)}, None),
    "tdpo2": ({}, None, {"chosen_seq_kl"}),
    "kto": ({}, None, {"kl_policy_logps", "kl_ref_logps"}),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck(name):
    spec = LOSSES[name]
    hparams, state, frozen = GRADCHECK_SETUP.get(name, ({}, None, None))
    frozen = set(frozen or ()) | {"labels", "chosen_lengths", "rejected_lengths"}
    fields = random_unpaired() if spec.unpaired else random_pairs()
    if not spec.needs_seq_kl:
        fields.pop("chosen_seq_kl", None), fields.pop("rejected_seq_kl", None)
    names = [k for k in fields if k not in frozen]
    cls = UnpairedLogps if spec.unpaired else PreferenceLogps

    def fn(*inputs):
        logps = cls(**{**fields, **dict(zip(names, inputs, strict=True))})
        return compute(name, logps, state=state, **hparams).losses

    inputs = tuple(fields[k].clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def grads_of(name: str, wrt: list[str], fields: dict, cls=PreferenceLogps, **hparams):
    leaves = {k: fields[k].clone().requires_grad_(True) for k in wrt}
    out = compute(name, cls(**{**fields, **leaves}), **hparams)
    grads = torch.autograd.grad(out.losses.sum(), list(leaves.values()), allow_unused=True)
    return dict(zip(wrt, grads, strict=True)), out


def is_zero(grad) -> bool:
    return grad is None or bool((grad == 0).all())


def test_kto_reference_point_is_detached():
    grads, _ = grads_of(
        "kto", ["policy_logps", "kl_policy_logps"], random_unpaired(), cls=UnpairedLogps
    )
    assert is_zero(grads["kl_policy_logps"])
    assert not is_zero(grads["policy_logps"])


def test_tdpo2_detaches_only_the_chosen_seq_kl():
    fields = random_pairs()
    grads, _ = grads_of("tdpo2", ["chosen_seq_kl", "rejected_seq_kl"], fields)
    assert is_zero(grads["chosen_seq_kl"]) and not is_zero(grads["rejected_seq_kl"])
    grads, _ = grads_of("tdpo1", ["chosen_seq_kl", "rejected_seq_kl"], fields)
    assert not is_zero(grads["chosen_seq_kl"]) and not is_zero(grads["rejected_seq_kl"])


def test_alpha_dpo_margin_is_detached():
    fields = random_pairs()
    grads, out = grads_of(
        "alpha_dpo", ["policy_chosen_logps", "ref_chosen_logps"], fields, **ALPHA_HP
    )
    assert is_zero(grads["ref_chosen_logps"])  # the reference only enters the margin
    # d/d logp_w of -logsig(beta * (avg_w - avg_l - margin)) with the margin held constant
    p = torch.exp(-out.losses.detach())  # sigma(x)
    expected = -2.5 * (1 - p) / fields["chosen_lengths"]
    torch.testing.assert_close(grads["policy_chosen_logps"], expected)


@pytest.mark.parametrize("name", list(LOSSES))
def test_rewards_are_detached_and_losses_per_example(name):
    spec = LOSSES[name]
    if spec.unpaired:
        fields = {k: v.requires_grad_(v.is_floating_point()) for k, v in random_unpaired().items()}
        logps, size = UnpairedLogps(**fields), 5
    else:
        fields = {k: v.requires_grad_(True) for k, v in random_pairs().items()}
        logps, size = PreferenceLogps(**fields), 4
    out = compute(name, logps)
    assert isinstance(out, LossOutput)
    assert out.losses.shape == (size,) and out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    for key, value in out.metrics.items():
        assert not (isinstance(value, torch.Tensor) and value.requires_grad), key
        assert not isinstance(value, torch.Tensor) or value.dim() == 0, key
    assert (out.state is not None) == spec.stateful


# ---------------------------------------------------------------------------------------------
# registry and errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LOSSES))
def test_spec_matches_its_function(name):
    spec = LOSSES[name]
    params = inspect.signature(spec.fn).parameters
    keywords = {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert keywords == set(spec.defaults) | ({"state"} if spec.stateful else set())
    assert all(params[k].default is inspect.Parameter.empty for k in keywords)
    assert spec.reduction in {"sum", "mean"}
    assert "arXiv:" in spec.paper and spec.description and spec.fn.__doc__
    for hparam in spec.defaults:
        spec.rule(hparam)  # every hyper-parameter has a check
    if spec.stateful:
        state = spec.init_state()
        assert state and all(isinstance(v, torch.Tensor) for v in state.values())


# Losses whose exact values are pinned by a table above, or by a test of their own (KTO's
# METHODS.md vectors, alpha-DPO's, sigmoid_norm's hand-worked one).
VECTOR_TESTED = (
    {row[0] for row in VECTORS}
    | {row[0] for row in TDPO_VECTORS}
    | set(TRL_FORMULAS)
    | {"kto", "alpha_dpo", "sigmoid_norm"}
)


def test_every_registry_entry_has_exact_test_vectors():
    missing = sorted(set(LOSSES) - VECTOR_TESTED)
    assert not missing, f"add exact test vectors (METHODS.md or worked by hand) for {missing}"
    assert VECTOR_TESTED <= set(LOSSES), "a vector table names a loss the registry lacks"
    assert [row["name"] for row in loss_table()] == list(LOSSES)


@pytest.mark.parametrize("name", list(LOSSES))
def test_defaults_pass_their_own_checks(name):
    assert validate_hparams(name, {}) == dict(LOSSES[name].defaults)


@pytest.mark.parametrize("name", list(LOSSES))
def test_needs_reference_says_whether_the_loss_reads_it(name):
    """The trainer builds a reference model only for losses that declare it: a loss that reads
    the reference without declaring it would train against None, one that declares it without
    reading it would pay for a second model for nothing."""
    spec = LOSSES[name]
    if spec.unpaired:
        fields, ref_keys, cls = random_unpaired(), ("ref_logps", "kl_ref_logps"), UnpairedLogps
    else:
        fields, cls = random_pairs(), PreferenceLogps
        ref_keys = ("ref_chosen_logps", "ref_rejected_logps")
    base = compute(name, cls(**fields)).losses
    shifted = compute(name, cls(**{**fields, ref_keys[0]: fields[ref_keys[0]] + 0.7})).losses
    if spec.needs_reference:
        assert not torch.allclose(base, shifted), "declares a reference it does not read"
    else:
        torch.testing.assert_close(base, shifted, rtol=0, atol=0)
        without = compute(name, cls(**{**fields, **dict.fromkeys(ref_keys)})).losses
        torch.testing.assert_close(base, without, rtol=0, atol=0)


def test_stateful_losses_start_from_init_state():
    for name in ("alpha_dpo", "bco_pair"):
        spec = LOSSES[name]
        a = compute(name, BATCH)
        b = compute(name, BATCH, state=spec.init_state())
        torch.testing.assert_close(a.losses, b.losses)
        assert a.state.keys() == spec.init_state().keys()


def test_unknown_loss_suggests_a_name():
    with pytest.raises(
        ValueError, match=r"Unknown loss 'dpoo'. Did you mean 'dpo'.*Valid losses:.*simpo"
    ):
        compute("dpoo", BATCH)
    with pytest.raises(ValueError, match="Valid losses: dpo, robust_dpo"):
        validate_hparams("nonsense_xyz", {})


def test_unknown_hyperparameter_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"no hyper-parameter 'bta'.*'beta'.*label_smoothing"):
        compute("dpo", BATCH, bta=0.1)
    with pytest.raises(ValueError, match=r"'simpo' has no hyper-parameter 'gamma'"):
        validate_hparams("simpo", {"gamma": 1.0})


@pytest.mark.parametrize(
    ("name", "hparams", "message"),
    [
        ("dpo", {"beta": 0.0}, r"'dpo'.*'beta' must be > 0, got 0.0"),
        ("dpo", {"beta": -1}, r"must be > 0"),
        ("dpo", {"beta": float("nan")}, r"must be > 0"),
        ("dpo", {"label_smoothing": 0.5}, r"'label_smoothing' must be in \[0, 0.5\)"),
        ("robust_dpo", {"label_smoothing": -0.1}, r"\[0, 0.5\)"),
        ("exo_pair", {"label_smoothing": 0.0}, r"must be in \(0, 0.5\)"),
        ("alpha_dpo", {"momentum": 1.0}, r"'momentum' must be in \[0, 1\)"),
        ("dr_dpo", {"beta_prime": 0}, r"'beta_prime' must be > 0"),
        ("dpo", {"beta": "0.1"}, r"must be a number, got '0.1'"),
        ("dpo", {"beta": True}, r"must be a number"),
        ("ipo", {"length_normalized": 1}, r"must be true or false"),
        ("kto", {"desirable_weight": 0.0}, r"must be > 0"),
    ],
)
def test_bad_values_are_rejected(name, hparams, message):
    with pytest.raises(ValueError, match=message):
        validate_hparams(name, hparams)


def test_validate_hparams_fills_defaults():
    given = validate_hparams("dpo", {"beta": 1})
    assert given == {**LOSSES["dpo"].defaults, "beta": 1.0} and isinstance(given["beta"], float)
    assert validate_hparams("ipo", {}) == dict(LOSSES["ipo"].defaults)


def test_missing_reference_is_a_clear_error():
    no_ref = PreferenceLogps(**{**vars(BATCH), "ref_chosen_logps": None})
    with pytest.raises(ValueError, match=r"'dpo' needs reference.*ref_chosen_logps.*dpo_ref_free"):
        compute("dpo", no_ref)
    ref_free = pairs(A, B, ref=False)
    compute("simpo", ref_free)  # fine without a reference


def test_tdpo_without_seq_kl_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'tdpo1' needs chosen_seq_kl.*seq_kl_from_logits"):
        compute("tdpo1", BATCH)


def test_wrong_input_kind_and_shapes():
    with pytest.raises(TypeError, match="takes UnpairedLogps"):
        compute("kto", BATCH)
    with pytest.raises(TypeError, match="takes PreferenceLogps"):
        compute("dpo", kto_batch(KTO_KL))
    short = PreferenceLogps(**{**vars(BATCH), "rejected_lengths": t([1.0, 2.0])})
    with pytest.raises(ValueError, match=r"rejected_lengths has shape \(2,\), expected \(4,\)"):
        compute("simpo", short)
    with pytest.raises(ValueError, match="keeps no state"):
        compute("dpo", BATCH, state={"mu": torch.zeros(())})


# ---------------------------------------------------------------------------------------------
# docs/losses.md is generated from the registry
# ---------------------------------------------------------------------------------------------


def test_docs_are_in_sync_with_the_registry():
    path = ROOT / "scripts" / "gen_loss_docs.py"
    spec = importlib.util.spec_from_file_location("gen_loss_docs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (ROOT / "docs" / "losses.md").read_text()
    assert committed == module.render(), "run: python scripts/gen_loss_docs.py"
    for name in LOSSES:
        assert f"`{name}`" in committed
