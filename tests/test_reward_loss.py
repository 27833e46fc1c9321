"""Bradley–Terry loss (METHODS.md §16 (e)) and last-real-token pooling."""

import pytest
import torch

from preftune.reward import bradley_terry_loss, last_token_index, pool_last_token


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


@pytest.mark.parametrize(
    "r_w, r_l, margin, center, expected",
    [
        (1.2, 0.3, None, None, 0.341154),
        (1.2, 0.3, 1.0, None, 0.744397),
        (1.2, 0.3, None, 0.01, 0.363654),
        (-0.4, 0.6, None, None, 1.313262),
    ],
)
def test_bradley_terry_vectors(r_w, r_l, margin, center, expected):
    loss = bradley_terry_loss(_t(r_w), _t(r_l), margin=margin, center_coef=center)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_bradley_terry_is_per_pair_and_centering_matches_trl_batch_form():
    r_w, r_l, m = _t(1.2, -0.4, 2.0), _t(0.3, 0.6, -1.0), _t(1.0, 0.0, 0.5)
    losses = bradley_terry_loss(r_w, r_l, margin=m, center_coef=0.01)
    assert losses.shape == (3,)
    # TRL: mean(-logsig(r_w - r_l - m)) + c * mean((r_w + r_l)^2)
    trl = -torch.nn.functional.logsigmoid(r_w - r_l - m).mean() + 0.01 * ((r_w + r_l) ** 2).mean()
    assert losses.mean().item() == pytest.approx(trl.item(), abs=1e-12)


def test_bradley_terry_stable_for_large_margins_and_gradient_sign():
    r_w = torch.tensor([-200.0, 200.0], requires_grad=True)
    r_l = torch.tensor([200.0, -200.0])
    losses = bradley_terry_loss(r_w, r_l)
    assert torch.isfinite(losses).all()
    assert losses[0].item() == pytest.approx(400.0) and losses[1].item() == pytest.approx(0.0)
    losses.sum().backward()
    assert (r_w.grad <= 0).all()  # raising the chosen reward lowers the loss


def test_bradley_terry_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


EOS = 2  # also the pad id in the pad == eos cases


def test_last_token_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 0]


def test_last_token_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(mask).tolist() == [4, 4, 4]


def test_pool_when_pad_equals_eos_keeps_the_eos():
    # Sequences end in EOS; padding uses the same id. A "first pad token - 1" or
    # "last non-pad id" rule would pick position 1 in row 0 / 3 in row 1 instead of the EOS.
    ids = torch.tensor([[5, 6, EOS, EOS, EOS], [EOS, EOS, 7, 8, EOS]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])  # right-padded / left-padded
    # The ids go through the function: what it reads must be each row's own closing EOS.
    assert last_token_index(mask).tolist() == [2, 4]
    assert pool_last_token(ids, mask).tolist() == [EOS, EOS]
    # Position-valued scores tell which EOS was read (a pad EOS at 3 or 4 would also be EOS).
    scores = torch.arange(10, dtype=torch.float32).view(2, 5)
    assert pool_last_token(scores, mask).tolist() == [2.0, 9.0]
    k_scores = torch.stack([scores, -scores], dim=-1)  # (B, T, K) heads pool the same way
    assert pool_last_token(k_scores, mask).tolist() == [[2.0, -2.0], [9.0, -9.0]]


def test_pool_accepts_bool_masks_and_rejects_empty_rows():
    mask = torch.tensor([[True, True, False]])
    assert pool_last_token(torch.tensor([[1.0, 2.0, 3.0]]), mask).tolist() == [2.0]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="disagree"):
        pool_last_token(torch.zeros(2, 3), torch.ones(2, 4))
