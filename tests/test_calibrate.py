"""β-DPO calibration against METHODS.md §6, its identities, gradients and resumption."""

from __future__ import annotations

import pytest
import torch

from preftune.calibrate import (
    BetaCalibration,
    calibrated_step,
    fixed_selection,
    gaussian_weights,
    update_statistics,
)
from preftune.losses import LOSSES, PreferenceLogps, compute

F64 = torch.float64
GAPS = [2.0, -3.0, 1.5, 0.5, 4.0]


def from_gaps(gaps, requires_grad: bool = False) -> PreferenceLogps:
    """Pairs whose DPO gap h is `gaps` (the reference and rejected log-probs are 0)."""
    h = torch.tensor(gaps, dtype=F64, requires_grad=requires_grad)
    zero, one = torch.zeros(len(gaps), dtype=F64), torch.ones(len(gaps), dtype=F64)
    return PreferenceLogps(h, zero, zero, zero, one, one)


def random_pairs(n: int, seed: int = 0, requires_grad: bool = False) -> PreferenceLogps:
    g = torch.Generator().manual_seed(seed)
    cols = [-5 - 15 * torch.rand(n, generator=g, dtype=F64) for _ in range(4)]
    cols[0].requires_grad_(requires_grad)
    lengths = [torch.randint(2, 9, (n,), generator=g).to(F64) for _ in range(2)]
    return PreferenceLogps(*cols, *lengths)


def methods_step(keep):
    return calibrated_step(
        "dpo",
        from_gaps(GAPS),
        {"beta": 0.1},
        M0=0.2,
        sigma=1.0,
        alpha=0.6,
        momentum=0.9,
        filter_ratio=1 - len(keep) / len(GAPS),
        eps=1e-6,
        select=fixed_selection(keep),
    )


def test_methods_statistics_and_weights():
    gaps = torch.tensor(GAPS, dtype=F64)
    assert gaps.std().item() == pytest.approx(2.573908, abs=1e-6)
    M0, sigma = update_statistics(gaps, 0.2, 1.0, 0.9)
    assert M0 == pytest.approx(0.28, abs=1e-6)
    assert sigma == pytest.approx(1.157391, abs=1e-6)
    weights = gaussian_weights(gaps, M0, sigma, 1e-6)
    assert weights.tolist() == pytest.approx(
        [0.331460, 0.018031, 0.573752, 0.982096, 0.005711], abs=1e-6
    )


def test_methods_vector_with_filtering():
    out, M0, sigma = methods_step([0, 2, 3, 4])
    assert (M0, sigma) == pytest.approx((0.28, 1.157391), abs=1e-6)
    assert out.metrics["beta"] == pytest.approx(0.2032, abs=1e-6)  # A_used = 2.0
    assert out.losses.mean().item() == pytest.approx(0.518388, abs=1e-6)
    assert out.losses[1].item() == 0.0  # the dropped pair
    assert out.metrics["filtered_fraction"] == pytest.approx(0.2)
    assert out.metrics["calibration/M0"] == pytest.approx(0.28)


def test_methods_vector_keeping_everything():
    out, _, _ = methods_step([0, 1, 2, 3, 4])
    assert out.metrics["beta"] == pytest.approx(0.1432, abs=1e-6)
    assert out.losses.mean().item() == pytest.approx(0.637542, abs=1e-6)


def test_logged_rewards_use_beta0():
    out, _, _ = methods_step([0, 2, 3, 4])
    assert out.chosen_rewards.tolist() == pytest.approx([0.1 * g for g in GAPS])


def test_beta_is_detached():
    logps = from_gaps(GAPS, requires_grad=True)
    out, _, _ = calibrated_step(
        "dpo",
        logps,
        {"beta": 0.1},
        M0=0.2,
        sigma=1.0,
        alpha=0.6,
        momentum=0.9,
        filter_ratio=0.2,
        eps=1e-6,
        select=fixed_selection([0, 2, 3, 4]),
    )
    out.losses.mean().backward()
    beta, h = 0.2032, torch.tensor(GAPS, dtype=F64)
    kept = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0], dtype=F64)
    # d/dh of mean_kept -logsig(beta * h), beta a constant: no term through mean(A[idx])
    expected = kept * (-beta * torch.sigmoid(-beta * h)) / 4
    torch.testing.assert_close(logps.policy_chosen_logps.grad, expected)


@pytest.mark.parametrize("name", ["dpo", "ipo", "dr_dpo", "simpo", "aot", "tdpo2", "alpha_dpo"])
def test_alpha_zero_without_filtering_is_the_base_loss(name):
    logps = random_pairs(6)
    if LOSSES[name].needs_seq_kl:
        kl = torch.rand(6, dtype=F64)
        logps = PreferenceLogps(**{**vars(logps), "chosen_seq_kl": kl, "rejected_seq_kl": kl / 2})
    calib = BetaCalibration(alpha=0.0, filter_ratio=0.0)
    rng_before = calib.generator.get_state()
    state = LOSSES[name].init_state() if LOSSES[name].stateful else None
    for _ in range(3):  # the statistics move; the loss must not
        out = calib(name, logps, {}, state=state)
        base = compute(name, logps, state=state)
        assert torch.equal(out.losses, base.losses)
        assert torch.equal(out.chosen_rewards, base.chosen_rewards)
        if state is not None:
            assert torch.equal(out.state["mu"], base.state["mu"])
            state = out.state
    assert torch.equal(calib.generator.get_state(), rng_before)  # no randomness drawn
    assert calib.M0 != 0.0


def test_filtering_keeps_a_masked_mean():
    logps = random_pairs(10, requires_grad=True)
    calib = BetaCalibration(alpha=0.6, filter_ratio=0.2, seed=3)
    out = calib("dpo", logps, {"beta": 0.1})
    kept = out.losses != 0
    assert int(kept.sum()) == 8 and out.metrics["filtered_fraction"] == pytest.approx(0.2)
    plain = compute("dpo", logps, beta=out.metrics["beta"]).losses
    torch.testing.assert_close(out.losses.mean(), plain[kept].mean())
    # gradients only reach the kept pairs
    out.losses.mean().backward()
    grad = logps.policy_chosen_logps.grad
    assert bool((grad[~kept] == 0).all()) and bool((grad[kept] != 0).all())


def test_batch_objective_sees_only_the_kept_pairs():
    logps = random_pairs(5)
    out, _, _ = calibrated_step(
        "dr_dpo",
        logps,
        {},
        M0=0.0,
        sigma=1.0,
        alpha=0.0,
        momentum=0.9,
        filter_ratio=0.4,
        eps=1e-6,
        select=fixed_selection([0, 3, 4]),
    )
    subset = compute("dr_dpo", logps.select(torch.tensor([0, 3, 4])))
    torch.testing.assert_close(out.losses.mean(), subset.losses.mean())


def test_degenerate_first_step_policy_equals_reference():
    same = torch.full((4,), -7.0, dtype=F64)
    logps = PreferenceLogps(same, same - 1, same, same - 1, same.abs(), same.abs())
    calib = BetaCalibration()
    out = calib("dpo", logps, {"beta": 0.1})  # gaps all 0: std 0, sigma 0
    assert torch.isfinite(out.losses).all()
    assert calib.sigma == 0.0 and out.metrics["beta"] == pytest.approx(0.1)
    single = BetaCalibration()("dpo", from_gaps([1.0]), {"beta": 0.1})  # one pair is kept
    assert torch.isfinite(single.losses).all() and single.losses.item() > 0


def test_outliers_whose_weights_underflow_do_not_break_sampling():
    # sigma stays ~1 while every gap sits hundreds away from M0: all weights are exactly 0 in
    # float64 and torch.multinomial would refuse them without the positive floor.
    calib = BetaCalibration(filter_ratio=0.25, momentum=0.999)
    calib.load_state_dict({**calib.state_dict(), "M0": 0.0, "sigma": 1.0})
    out = calib("dpo", from_gaps([500.0, 501.0, -500.0, 800.0]), {"beta": 0.1})
    assert torch.isfinite(out.losses).all() and out.metrics["filtered_fraction"] == 0.25
    # zero-weight pairs are only drawn once every positive-weight pair is taken
    drawn = calib._sample(torch.tensor([1.0, 0.0, 0.5, 0.0], dtype=F64), 2)
    assert sorted(drawn.tolist()) == [0, 2]


def test_beta_is_clamped_from_below():
    out, _, _ = calibrated_step(
        "dpo",
        from_gaps([-50.0, -60.0]),
        {"beta": 0.1},
        M0=0.0,
        sigma=1.0,
        alpha=1.0,
        momentum=0.9,  # M0 -> -5.5, kept mean -55: 0.1 * (1 - 49.5) < 0
        filter_ratio=0.0,
        eps=1e-6,
        select=fixed_selection([0, 1]),
    )
    assert out.metrics["beta"] == 1e-3


def run(calib: BetaCalibration, steps: int) -> list[torch.Tensor]:
    return [calib("dpo", random_pairs(8, seed=s), {"beta": 0.1}).losses for s in range(steps)]


def test_state_dict_round_trip_resumes_identically():
    uninterrupted = BetaCalibration(seed=7)
    expected = run(uninterrupted, 6)

    first = BetaCalibration(seed=7)
    run(first, 3)
    saved = first.state_dict()
    resumed = BetaCalibration(seed=7)
    resumed.load_state_dict(saved)
    got = [resumed("dpo", random_pairs(8, seed=s), {"beta": 0.1}).losses for s in range(3, 6)]
    for a, b in zip(expected[3:], got, strict=True):
        assert torch.equal(a, b)
    assert resumed.state_dict()["step"] == 6
    assert resumed.M0 == uninterrupted.M0 and resumed.sigma == uninterrupted.sigma


def test_seed_controls_the_mask():
    # equal gaps give equal weights: the mask is a uniform draw, decided by the seed alone
    # (on the first step sigma is 0 and M0 lags, so the equal weights are the positive floor)
    def masks(seed: int) -> list[torch.Tensor]:
        calib = BetaCalibration(seed=seed)
        return [calib("dpo", from_gaps([1.0] * 8), {}).losses != 0 for _ in range(4)]

    assert all(torch.equal(a, b) for a, b in zip(masks(0), masks(0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(masks(0), masks(1), strict=True))


def test_gathered_processes_match_one_process():
    full = random_pairs(8)
    gaps = (full.policy_chosen_logps - full.policy_rejected_logps) - (
        full.ref_chosen_logps - full.ref_rejected_logps
    )
    halves = [full.select(torch.arange(0, 4)), full.select(torch.arange(4, 8))]
    single = BetaCalibration(seed=5)
    procs = [BetaCalibration(seed=5), BetaCalibration(seed=5)]
    for _ in range(3):
        whole = single("dpo", full, {"beta": 0.1})
        parts = [
            proc("dpo", half, {"beta": 0.1}, gather=lambda _: gaps, process_index=i)
            for i, (proc, half) in enumerate(zip(procs, halves, strict=True))
        ]
        assert parts[0].metrics["beta"] == parts[1].metrics["beta"] == whole.metrics["beta"]
        torch.testing.assert_close(torch.cat([p.losses for p in parts]), whole.losses)
        # averaging the processes' means (what DDP does to gradients) gives the global mean
        average = (parts[0].losses.mean() + parts[1].losses.mean()) / 2
        torch.testing.assert_close(average, whole.losses.mean())


def test_process_index_defaults_to_the_distributed_rank(monkeypatch):
    import preftune.calibrate as calibrate

    full = random_pairs(8)
    gaps = (full.policy_chosen_logps - full.policy_rejected_logps) - (
        full.ref_chosen_logps - full.ref_rejected_logps
    )
    second_half = full.select(torch.arange(4, 8))
    explicit = BetaCalibration(seed=2)(
        "dpo", second_half, {}, gather=lambda _: gaps, process_index=1
    )
    monkeypatch.setattr(calibrate, "_rank", lambda: 1)
    implicit = BetaCalibration(seed=2)("dpo", second_half, {}, gather=lambda _: gaps)
    assert torch.equal(explicit.losses, implicit.losses)


def test_gather_of_the_wrong_size_is_an_error():
    with pytest.raises(ValueError, match="same batch size"):
        BetaCalibration()("dpo", random_pairs(4), {}, gather=lambda x: x[:2], process_index=1)


def test_reference_free_losses_use_the_policy_log_ratio():
    logps = random_pairs(6)
    no_ref = PreferenceLogps(
        **{**vars(logps), "ref_chosen_logps": None, "ref_rejected_logps": None}
    )
    out = BetaCalibration(alpha=0.0, filter_ratio=0.0)("simpo", no_ref, {})
    assert torch.equal(out.losses, compute("simpo", no_ref).losses)


def test_losses_without_beta_are_refused_by_name():
    with pytest.raises(ValueError, match=r"loss 'orpo' has none.*Losses it applies to: dpo"):
        BetaCalibration()("orpo", random_pairs(4), {})
    with pytest.raises(ValueError, match=r"loss 'kto' is unpaired"):
        BetaCalibration()("kto", random_pairs(4), {})
    with pytest.raises(ValueError, match=r"no hyper-parameter 'bta'"):
        BetaCalibration()("dpo", random_pairs(4), {"bta": 0.1})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"filter_ratio": 1.0}, r"filter_ratio must be in \[0, 1\)"),
        ({"momentum": -0.1}, r"momentum must be in \[0, 1\)"),
        ({"alpha": -1.0}, r"alpha must be >= 0"),
        ({"eps": 0.0}, r"eps must be > 0"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BetaCalibration(**kwargs)


def test_metrics_and_base_metrics_are_reported():
    out = BetaCalibration()("rpo", random_pairs(6), {"beta": 0.1})
    assert {"beta", "filtered_fraction", "calibration/M0", "calibration/sigma", "nll"} <= set(
        out.metrics
    )
