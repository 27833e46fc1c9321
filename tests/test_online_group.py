"""RLOO / GRPO maths (METHODS.md §17b) against hand-computed values, the IPO-MD mixture sampler
against the closed form of the geometric mixture (§17), and k samples of a prompt from one
prefill against the plain call."""

import math

import pytest
import torch
from online_helpers import EOS, PAD, word_tokenizer

from preftune.generation import SamplingConfig, _left_pad, generate
from preftune.generation_mixture import generate_mixture, mixture_rows
from preftune.models import tiny_causal_lm
from preftune.online.group import (
    aggregation_denominator,
    all_equal_groups,
    group_loss,
    group_token_losses,
    grpo_advantages,
    k3_kl,
    rloo_advantages,
    sequence_values,
)
from preftune.online.mixture import filter_logprobs, mixture_logprobs

D = torch.float64


def test_rloo_and_grpo_advantages_match_the_methods_vectors():
    a = rloo_advantages(torch.tensor([1.0, 0, 0, 1, 3, 1, 2, 2], dtype=D), 4)
    # second group by hand: 3 - (1+2+2)/3, 1 - 7/3, 2 - 6/3, 2 - 6/3
    want = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 3 - 5 / 3, 1 - 7 / 3, 0.0, 0.0]
    torch.testing.assert_close(a, torch.tensor(want, dtype=D))
    g = grpo_advantages(torch.tensor([1.0, 0, 0, 0], dtype=D), 4, eps=0.0)
    torch.testing.assert_close(g, torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=D))
    # TRL's eps = 1e-4 on the sample std (0.5), and Dr. GRPO's unscaled form
    g = grpo_advantages(torch.tensor([1.0, 0, 0, 0], dtype=D), 4)
    torch.testing.assert_close(g, torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=D) / 0.5001)
    g = grpo_advantages(torch.tensor([2.0, 0, 5, 5], dtype=D), 2, scale_rewards=False)
    torch.testing.assert_close(g, torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=D))
    assert all_equal_groups(torch.tensor([2.0, 0, 5, 5, 1, 1]), 2) == 2
    with pytest.raises(ValueError, match="k=3"):
        rloo_advantages(torch.zeros(4), 3)


def _token_case():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], dtype=D, requires_grad=True)
    old = torch.tensor([[-1.2, -1.5], [-0.5, 0.0]], dtype=D)
    ref = torch.tensor([[-1.1, -2.5], [-0.7, 0.0]], dtype=D)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=D)
    return logps, old, ref, mask, torch.tensor([1.0, -2.0], dtype=D)


def test_clipped_surrogate_and_k3_equal_hand_values():
    logps, old, ref, mask, adv = _token_case()
    got = group_token_losses(logps, old, ref, adv, mask, epsilon=0.2, beta=0.1)
    k3 = [math.exp(d) - d - 1 for d in (-0.1, -0.5, -0.2)]  # d = ref - logp
    # rho = e^0.2 = 1.2214 clipped to 1.2 (A > 0); rho = e^-0.5 = 0.6065 below 0.8 keeps rho*A
    # for A > 0 (min); rho = 1 for the A = -2 row
    want = [[-1.2 + 0.1 * k3[0], -math.exp(-0.5) + 0.1 * k3[1]], [2.0 + 0.1 * k3[2], 0.0]]
    torch.testing.assert_close(got, torch.tensor(want, dtype=D))
    torch.testing.assert_close(
        k3_kl(logps[:1, :1], ref[:1, :1]).detach(), torch.tensor([[k3[0]]], dtype=D)
    )
    flat = got.detach()
    s0, s1 = flat[0].sum().item(), flat[1, 0].item()
    for agg, value in {
        "sequence": (s0 / 2 + s1 / 1) / 2,
        "token": (s0 + s1) / 3,
        "constant": (s0 + s1) / (2 * 4),
        "sum": (s0 + s1) / 2,
    }.items():
        assert group_loss(flat, mask, agg, max_new_tokens=4).item() == pytest.approx(value), agg
    assert aggregation_denominator("token", 2, 0, 4) == 1
    with pytest.raises(ValueError, match="aggregation"):
        sequence_values(flat, mask, "mean")


def test_on_policy_ratio_gives_the_reinforce_gradient():
    """With old = sg(logp) (one step per generation), rho = 1 and the clip never binds: the
    gradient of the summed surrogate is -A on every real token and 0 on padding."""
    logps, _, _, mask, adv = _token_case()
    losses = group_token_losses(logps, logps.detach(), None, adv, mask, epsilon=0.2)
    losses.sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.0, -1.0], [2.0, 0.0]], dtype=D))


def test_mixture_is_the_normalised_geometric_mixture():
    zp, zr = torch.tensor([1.0, 0.0, -1.0], dtype=D), torch.tensor([0.0, 1.0, 0.0], dtype=D)
    got = mixture_logprobs(zp, zr, 0.5)
    assert got[0].item() == pytest.approx(-0.861995, abs=1e-6)  # METHODS.md §17 sanity vector
    p, r = torch.softmax(zp, 0), torch.softmax(zr, 0)
    for b in (0.0, 0.25, 1.0):
        closed = p ** (1 - b) * r**b
        torch.testing.assert_close(mixture_logprobs(zp, zr, b).exp(), closed / closed.sum())
    lp = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=D))
    kept = filter_logprobs(lp, top_p=0.8).exp()  # 0.5 + 0.3 reaches 0.8: two tokens left
    torch.testing.assert_close(kept, torch.tensor([0.625, 0.375, 0.0, 0.0], dtype=D))
    hot = filter_logprobs(lp, temperature=2.0, top_k=3).exp()
    want = torch.tensor([0.5, 0.3, 0.15]).double().sqrt()
    torch.testing.assert_close(hot[:3], want / want.sum())


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    def make(seed):
        kw = dict(hidden_size=32, layers=2, heads=2, eos_token_id=EOS, pad_token_id=PAD)
        model = tiny_causal_lm(len(tok), seed=seed, **kw).double()
        with torch.no_grad():  # x4: a random init barely sees positions, so cache errors hide
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.mul_(4)
        return model

    return make(0), make(1)


def _closed_form_logps(policy, ref, row, new, b):
    """log pi_mix of each new token, from full forwards without a cache."""
    ids = torch.tensor([row + new])
    lp = torch.log_softmax(policy(ids).logits[0].double(), -1)
    lr = torch.log_softmax(ref(ids).logits[0].double(), -1)
    out = []
    for t, token in enumerate(new):
        pos = len(row) - 1 + t
        mix = (1 - b) * lp[pos] + b * lr[pos]
        out.append((mix - torch.logsumexp(mix, 0))[token].item())
    return out


def test_mixture_sampler_draws_from_the_closed_form(models, tok):
    """Each drawn token's log-prob, accumulated through both KV caches over a left-padded
    batch with k samples per prompt, equals the closed form from cache-free forwards; the first
    token's frequencies over 4000 draws match the closed form (chi-square)."""
    policy, ref = models
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in ["a", "one plus two equals"]]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=5, num_return_sequences=3)
    torch.manual_seed(0)
    new, logps = mixture_rows(policy, ref, rows, cfg, 0.3, [EOS], PAD)
    assert new.shape[0] == 6
    for j, toks in enumerate(new.tolist()):
        kept = toks[: toks.index(EOS) + 1] if EOS in toks else toks
        want = _closed_form_logps(policy, ref, rows[j // 3], kept, 0.3)
        torch.testing.assert_close(logps[j, : len(kept)], torch.tensor(want, dtype=D))
    one = SamplingConfig(temperature=1.0, max_new_tokens=1, num_return_sequences=4000)
    first, _ = mixture_rows(policy, ref, rows[1:], one, 0.7, [EOS], PAD)
    with torch.no_grad():
        ids = torch.tensor([rows[1]])
        mix = 0.3 * torch.log_softmax(policy(ids).logits[0, -1], -1)
        mix = mix + 0.7 * torch.log_softmax(ref(ids).logits[0, -1], -1)
        p = torch.softmax(mix, -1)
    counts = torch.bincount(first[:, 0], minlength=p.numel()).double()
    expected = 4000 * p
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 45.3, chi2  # 99.9% quantile of chi-square with 18 degrees of freedom


def test_mixture_at_beta_zero_is_the_policy_under_the_same_seed(models, tok):
    policy, ref = models
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=6, num_return_sequences=2)
    prompts = ["a b", "one plus two equals"]
    torch.manual_seed(3)
    mix = generate_mixture(policy, ref, tok, prompts, cfg, mixture_beta=0.0)
    torch.manual_seed(3)
    plain = generate(policy, tok, prompts, cfg)
    assert [c.token_ids for c in mix] == [c.token_ids for c in plain]
    assert [c.prompt_index for c in mix] == [0, 0, 1, 1]


def test_k_samples_from_one_prefill_equal_the_plain_call(models, tok):
    """`generate` prefills each prompt once and repeats its cache k times; the samples are
    those of transformers' own num_return_sequences path (k prefills) under the same seed,
    with and without a shared chat head, and rows stop at their first EOS."""
    policy, _ = models
    head = "a b c d e f g h a b c"
    for prompts in (["a", "one plus two equals", "b c d"], [f"{head} one", f"{head} b c"]):
        cfg = SamplingConfig(temperature=1.0, max_new_tokens=8, num_return_sequences=16)
        torch.manual_seed(5)
        fast = generate(policy, tok, prompts, cfg)
        torch.manual_seed(5)
        plain = _plain(policy, tok, prompts, cfg)
        assert [c.token_ids for c in fast] == plain
        assert all(EOS not in c.token_ids[:-1] for c in fast)


def _plain(model, tok, prompts, cfg):
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids, mask = _left_pad(rows, PAD)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=cfg.max_new_tokens,
        num_return_sequences=cfg.num_return_sequences,
        eos_token_id=[EOS],
        pad_token_id=PAD,
    )
    new = out[:, ids.shape[1] :].tolist()
    return [r[: r.index(EOS) + 1] if EOS in r else r for r in new]
