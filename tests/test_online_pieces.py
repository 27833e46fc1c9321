"""RSO sampler and pairing (§4), ReMax returns and losses (§14), online-DPO labels (§13)."""

import math

import pytest
import torch
import torch.nn.functional as F

from preftune.online import (
    acceptance_probabilities,
    conduct_rejection_sampling,
    label_online_pairs,
    rank_into_pairs,
    remax_loss,
    remax_paper_loss,
    remax_returns,
    remax_sequence_losses,
)

# ---------------------------------------------------------------- RSO (METHODS.md §4)


def test_rso_first_pass_acceptance_vector():
    probs = acceptance_probabilities([0.5, 1.0, 2.0, 1.5], beta=0.5)
    expected = [0.049787, 0.135335, 1.000000, 0.367879]
    assert probs.tolist() == pytest.approx(expected, abs=1e-6)


def test_rso_accepted_distribution_follows_tilted_reference():
    """num_samples=1 draws from pi_ref(y) exp(r(y)/beta) / Z (rejection sampling, RSO §3).

    Each trial draws N=64 candidates from pi_ref over 6 outcomes. The best outcome has
    pi_ref = 0.2, so it is missing from a set with probability 0.8^64 < 1e-6 (then r_max, the
    bound M, would be wrong), and a pass accepts nothing before the end with probability
    (1 - Z)^64 < 1e-9; both biases are far below the test's resolution. With 20 000 trials
    the chi-square statistic over 6 cells has 5 degrees of freedom: 20.5 is its 99.9% point.
    Accepting from pi_ref instead (a sampler that ignores rewards) scores in the thousands.
    """
    pi_ref = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05], dtype=torch.float64)
    r = torch.tensor([0.0, 0.5, 1.2, -0.3, 1.0, 0.8], dtype=torch.float64)
    beta, trials, n_cand = 0.5, 20_000, 64
    target = pi_ref * torch.exp(r / beta)
    target /= target.sum()
    gen = torch.Generator().manual_seed(1234)
    counts = torch.zeros(6, dtype=torch.float64)
    for _ in range(trials):
        outcomes = torch.multinomial(pi_ref, n_cand, replacement=True, generator=gen)
        (idx,) = conduct_rejection_sampling(r[outcomes], 1, beta, generator=gen)
        counts[outcomes[idx]] += 1
    expected = trials * target
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5, (chi2, (counts / trials).tolist(), target.tolist())
    chi2_vs_ref = ((counts - trials * pi_ref) ** 2 / (trials * pi_ref)).sum().item()
    assert chi2_vs_ref > 1000  # the test has the power to see a reward-blind sampler


def test_rso_recomputes_r_max_over_remaining_candidates():
    """Rewards [0, 0.1, 5], beta=1, two samples. Pass 1 (r_max=5) almost surely takes only
    candidate 2; pass 2 recomputes r_max=0.1 and takes candidate 0 with prob e^-0.1. Keeping
    r_max=5 would give candidate 0 about half the time (e^-5 vs e^-4.9 per pass)."""
    p_20 = (1 - math.exp(-5)) * (1 - math.exp(-4.9)) * math.exp(-0.1)
    gen = torch.Generator().manual_seed(0)
    n = 4000
    hits = sum(conduct_rejection_sampling([0.0, 0.1, 5.0], 2, 1.0, gen) == [2, 0] for _ in range(n))
    # binomial sd = sqrt(p(1-p)/n) = 0.0049; 0.02 is four sd.
    assert abs(hits / n - p_20) < 0.02, (hits / n, p_20)


def test_rso_limits_and_sanity():
    rewards = [0.3, 2.0, -1.0, 1.5, 0.9, 1.7]
    gen = torch.Generator().manual_seed(0)
    # beta -> 0: best-of-N, one per pass, in decreasing reward order.
    assert conduct_rejection_sampling(rewards, 3, 0.0, gen) == [1, 5, 3]
    assert conduct_rejection_sampling(rewards, 3, 1e-8, gen) == [1, 5, 3]
    # beta -> inf: everything is accepted on the first pass, in candidate order.
    assert conduct_rejection_sampling(rewards, 4, 1e9, gen) == [0, 1, 2, 3]
    for k in range(len(rewards) + 1):
        got = conduct_rejection_sampling(rewards, k, 0.5, gen)
        assert len(got) == k and len(set(got)) == k and all(0 <= i < 6 for i in got)
    a = conduct_rejection_sampling(rewards, 4, 0.5, torch.Generator().manual_seed(7))
    b = conduct_rejection_sampling(rewards, 4, 0.5, torch.Generator().manual_seed(7))
    assert a == b


def test_rso_errors():
    with pytest.raises(ValueError, match="only 3 candidates"):
        conduct_rejection_sampling([0.0, 1.0, 2.0], 4, 0.5)
    with pytest.raises(ValueError, match=">= 0"):
        conduct_rejection_sampling([0.0, 1.0], 1, -1.0)
    with pytest.raises(ValueError, match=r"indices \[1\]"):
        conduct_rejection_sampling([0.0, float("nan")], 1, 0.5)


def test_rank_into_pairs_first_round_rank():
    cands = ["a", "b", "c", "d", "e", "f", "g"]
    rewards = [1.0, 2.0, 3.0, 3.0, 5.0, 4.0, 0.0]
    out = rank_into_pairs(cands, rewards)
    assert out.pairs == [("b", "a"), ("e", "f")]
    assert out.chosen_rewards == [2.0, 5.0] and out.rejected_rewards == [1.0, 4.0]
    assert out.num_ties == 1 and out.num_unpaired == 1
    kept = rank_into_pairs(cands, torch.tensor(rewards), keep_ties=True)
    assert kept.pairs == [("b", "a"), ("c", "d"), ("e", "f")] and kept.num_ties == 1
    with pytest.raises(ValueError, match="7 candidates but 2 rewards"):
        rank_into_pairs(cands, [1.0, 2.0])


# ---------------------------------------------------------------- ReMax (METHODS.md §14)

LOGP = [-0.5, -1.0, -0.2]
REF = [-0.6, -0.8, -0.3]


def _remax_inputs(requires_grad=False):
    logps = torch.tensor([LOGP], dtype=torch.float64, requires_grad=requires_grad)
    ref = torch.tensor([REF], dtype=torch.float64)
    mask = torch.ones(1, 3)
    return logps, ref, mask, torch.tensor([2.0]), torch.tensor([1.5])


def test_remax_vectors():
    logps, ref, mask, r, rb = _remax_inputs()
    ret = remax_returns(logps, ref, mask, r, rb, kl_ctl=0.1, gamma=1.0, clip_reward_value=5.0)
    assert ret[0].tolist() == pytest.approx([0.49, 0.52, 0.49], abs=1e-6)
    loss, _ = remax_loss(logps, ref, mask, r, rb, kl_ctl=0.1, gamma=1.0, clip_reward_value=5.0)
    assert loss.item() == pytest.approx(0.287667, abs=1e-6)
    loss, _ = remax_loss(logps, ref, mask, r, rb, kl_ctl=0.05, gamma=0.99, clip_reward_value=5.0)
    assert loss.item() == pytest.approx(0.279375, abs=1e-6)
    paper = remax_paper_loss(logps.sum(-1), r.double(), rb.double())
    assert paper.tolist() == pytest.approx([0.85], abs=1e-6)


def test_remax_discount_last_token_gets_gamma_once():
    logps, ref, mask, r, rb = _remax_inputs()
    ret = remax_returns(logps, ref, mask, r, rb, kl_ctl=0.0, gamma=0.5, clip_reward_value=5.0)
    assert ret[0].tolist() == pytest.approx([0.5 * 0.125, 0.5 * 0.25, 0.5 * 0.5])


def test_remax_clips_after_subtracting_the_baseline():
    logps, ref, mask, _, _ = _remax_inputs()
    kw = dict(kl_ctl=0.0, gamma=1.0, clip_reward_value=5.0)
    # clip(10 - 9) = 1, while clip(10) - clip(9) = 0
    ret = remax_returns(logps, ref, mask, torch.tensor([10.0]), torch.tensor([9.0]), **kw)
    assert ret[0].tolist() == pytest.approx([1.0] * 3)
    # clip(10 - (-10)) = 5, while clip(10) - clip(-10) = 10
    ret = remax_returns(logps, ref, mask, torch.tensor([10.0]), torch.tensor([-10.0]), **kw)
    assert ret[0].tolist() == pytest.approx([5.0] * 3)


def test_remax_masks_and_padding_layout():
    """Padding on either side gives the same returns on real tokens and zero elsewhere, and
    the loss is a token mean over the whole batch, not a mean of per-sequence means."""
    kw = dict(kl_ctl=0.1, gamma=0.9, clip_reward_value=5.0)
    lp = torch.tensor([[-0.5, -1.0, -0.2, 0.0], [-0.3, -0.4, 0.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[-0.6, -0.8, -0.3, 0.0], [-0.1, -0.9, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    r, rb = torch.tensor([2.0, -1.0]), torch.tensor([1.5, 0.0])
    right = remax_returns(lp, ref, mask, r, rb, **kw)
    left_idx = torch.tensor([[3, 0, 1, 2], [2, 3, 0, 1]])  # real tokens moved to the end
    left = remax_returns(
        lp.gather(1, left_idx), ref.gather(1, left_idx), mask.gather(1, left_idx), r, rb, **kw
    )
    assert torch.allclose(left, right.gather(1, left_idx))
    assert (right[mask == 0] == 0).all()
    loss, ret = remax_loss(lp, ref, mask, r, rb, **kw)
    assert loss.item() == pytest.approx((-(ret * lp).sum() / 5).item())
    per_seq = remax_sequence_losses(lp, mask, ret)
    assert per_seq.sum().item() / 5 == pytest.approx(loss.item())


def test_remax_gradient_flows_through_logps_only():
    logps, ref, mask, r, rb = _remax_inputs(requires_grad=True)
    r = r.clone().requires_grad_(True)
    rb = rb.clone().requires_grad_(True)
    loss, ret = remax_loss(logps, ref, mask, r, rb, kl_ctl=0.1, gamma=1.0, clip_reward_value=5.0)
    loss.backward()
    # The KL inside the returns is detached: d loss / d logp_t = -ret_t / n_tokens exactly.
    assert torch.allclose(logps.grad, -ret / 3)
    assert r.grad is None and rb.grad is None and not ret.requires_grad


# ---------------------------------------------------------------- online DPO (METHODS.md §13)


def test_online_dpo_labels_then_dpo_vector():
    """Sample 1 scores higher but lacks EOS; the penalty makes y2 chosen -> DPO 0.678260."""
    first, second = torch.tensor([1.0]), torch.tensor([0.5])
    eos1, eos2 = torch.tensor([False]), torch.tensor([True])
    labels = label_online_pairs(first, second, eos1, eos2, missing_eos_penalty=1.0)
    assert labels.first_is_chosen.tolist() == [False]
    assert labels.chosen_scores.tolist() == [0.5] and labels.rejected_scores.tolist() == [0.0]
    # per-completion log-probs in TRL's [first; second] layout
    policy = torch.tensor([-10.0, -12.0], dtype=torch.float64)
    ref = torch.tensor([-10.2, -12.5], dtype=torch.float64)
    c, rj = labels.chosen_index, labels.rejected_index
    h = (policy[c] - ref[c]) - (policy[rj] - ref[rj])
    loss = -F.logsigmoid(0.1 * h)
    assert loss.item() == pytest.approx(0.678260, abs=1e-6)
    no_penalty = label_online_pairs(first, second, eos1, eos2)
    assert no_penalty.first_is_chosen.tolist() == [True]


def test_online_dpo_ties_go_to_first_and_can_be_skipped():
    first = torch.tensor([1.0, 1.0, 0.5])
    second = torch.tensor([1.0, 0.0, 0.7])
    labels = label_online_pairs(first, second)
    assert labels.first_is_chosen.tolist() == [True, True, False]
    assert labels.chosen_index.tolist() == [0, 1, 5]
    assert labels.rejected_index.tolist() == [3, 4, 2]
    assert labels.num_ties == 1 and labels.keep.all()
    skipped = label_online_pairs(first, second, skip_ties=True)
    assert skipped.keep.tolist() == [False, True, True] and skipped.num_ties == 1


def test_online_dpo_penalty_applies_per_sample_and_needs_flags():
    first, second = torch.tensor([0.9, 0.2]), torch.tensor([0.5, 0.6])
    labels = label_online_pairs(
        first,
        second,
        torch.tensor([True, False]),
        torch.tensor([False, False]),
        missing_eos_penalty=0.5,
    )
    # scores become [0.9, -0.3] vs [0.0, 0.1]
    assert labels.first_is_chosen.tolist() == [True, False]
    assert labels.chosen_scores.tolist() == pytest.approx([0.9, 0.1])
    assert first.tolist() == pytest.approx([0.9, 0.2])  # inputs untouched
    with pytest.raises(ValueError, match="has_eos"):
        label_online_pairs(first, second, missing_eos_penalty=1.0)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        label_online_pairs(first, torch.zeros(3))
