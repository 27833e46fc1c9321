"""Decoding on weights prepacked for oneDNN (preftune/prepacked.py): the packed layers compute
F.linear's products (fp32, and bf16 under CPU autocast), the layers are restored after the
call, generation returns the tokens of an unpacked call, and what must not be packed is not."""

import pytest
import torch
import torch.nn.functional as F
from online_helpers import EOS, PAD, word_tokenizer

from preftune import prepacked
from preftune.generation import SamplingConfig, generate
from preftune.generation_mixture import generate_mixture
from preftune.models import tiny_causal_lm
from preftune.prepacked import prepacked_linears

pytestmark = pytest.mark.skipif(
    not prepacked.available(), reason="this torch has no oneDNN prepacked linear ops"
)

PROMPTS = ["a", "one plus two equals", "b c d e f g h"]


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_causal_lm(
        len(tok), seed=0, hidden_size=32, layers=2, heads=2, eos_token_id=EOS, pad_token_id=PAD
    )


REAL_PACK = prepacked._pack


def _count_packing(monkeypatch) -> list:
    """A list that gets one entry per layer packed from now on."""
    calls: list = []
    monkeypatch.setattr(prepacked, "_pack", lambda *a: calls.append(a) or REAL_PACK(*a))
    return calls


def _linears(model):
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


@pytest.mark.parametrize("bias", [False, True])
def test_packed_layer_computes_f_linear(bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=bias)
    for shape in [(5, 48), (2, 7, 48), (1, 48)]:  # 2-D, 3-D, and row counts other than the hint
        x = torch.randn(*shape)
        with prepacked_linears([layer], rows=16) as n:
            got = layer(x)
        assert n == 1
        torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert "forward" not in layer.__dict__  # the class's forward again


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no oneDNN bf16"
)
def test_packed_layer_under_bf16_autocast_computes_what_autocast_would():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = layer(x)
        with prepacked_linears([layer], rows=3) as n:
            got = layer(x)
    assert n == 1
    assert got.dtype == want.dtype == torch.bfloat16
    # the same bf16 operands, products summed in fp32 in another order: one bf16 rounding apart
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_what_is_packed_and_what_is_not(model):
    with prepacked_linears([model, model], rows=4) as n:  # a module listed twice packs once
        assert n == len(_linears(model)) > 0
        assert all("forward" in m.__dict__ for m in _linears(model))
    assert not any("forward" in m.__dict__ for m in _linears(model))
    wide = torch.nn.Linear(4, 4).double()  # fp64 stays on the plain call
    zero3 = torch.nn.Linear(4, 4)
    zero3.weight.ds_id = 0  # a DeepSpeed ZeRO-3 parameter keeps its id when gathered
    with prepacked_linears([wide, zero3], rows=4) as n:
        assert n == 0
    with torch.autocast("cpu", dtype=torch.float16), prepacked_linears([model], rows=4) as n:
        assert n == 0  # fp16 autocast: the plain call (oneDNN fp16 needs CPU features)


def test_the_switch_is_checked_and_the_run_says_how_it_decodes(monkeypatch):
    from preftune.errors import ConfigError

    assert "prepacked for oneDNN" in prepacked.describe(torch.device("cpu"))
    assert "plain" in prepacked.describe(torch.device("cuda"))
    monkeypatch.setenv(prepacked.ENV, "0")
    assert "PREFTUNE_PREPACK=0" in prepacked.describe(torch.device("cpu"))
    monkeypatch.setenv(prepacked.ENV, "disable")
    with pytest.raises(ConfigError, match="PREFTUNE_PREPACK='disable' is not a switch"):
        prepacked.available()


def test_calls_the_packing_does_not_fit_take_the_plain_call():
    """With gradients wanted, or autocast switched inside the call, the layer computes what the
    plain layer would, gradients included."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 6)
    x = torch.randn(3, 8, requires_grad=True)
    with prepacked_linears([layer], rows=3):
        layer(x).sum().backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = layer(x.detach())
    assert x.grad is not None and layer.weight.grad is not None
    torch.testing.assert_close(layer.weight.grad, x.detach().sum(0).expand(6, 8))
    layer.weight.requires_grad_(False)  # a frozen weight with a trained bias (BitFit)
    with prepacked_linears([layer], rows=3):
        layer(x.detach()).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((6,), 6.0))  # 3 rows, two backwards
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(inside, layer(x.detach()))  # bf16, as autocast's own


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_the_switch_turns_packing_off(model, monkeypatch, value):
    monkeypatch.setenv(prepacked.ENV, value)
    with prepacked_linears([model], rows=4) as n:
        assert n == 0


def test_a_forward_set_on_the_instance_is_left_alone(model):
    """accelerate's hooks set `forward` on the instance; a nested call finds the outer's."""
    hooked = torch.nn.Linear(4, 4)
    hooked.forward = own = lambda x: x
    with prepacked_linears([hooked], rows=2) as n:
        assert n == 0 and hooked.forward is own
    assert hooked.forward is own
    with prepacked_linears([model], rows=4) as outer:
        with prepacked_linears([model], rows=4) as inner:
            assert inner == 0
        assert all("forward" in m.__dict__ for m in _linears(model))  # the outer's, still there
    assert outer > 0 and not any("forward" in m.__dict__ for m in _linears(model))


def test_layers_are_restored_when_the_call_fails(model):
    with pytest.raises(RuntimeError, match="boom"):
        with prepacked_linears([model], rows=4):
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in _linears(model))


def _greedy_gaps(model, tok, prompts, steps):
    """The smallest gap between the two largest logits over plain greedy decoding: the packed
    call must give the same tokens only where no two logits tie to within fp32 rounding."""
    gaps = []
    for p in prompts:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        for _ in range(steps):
            with torch.no_grad():
                top = model(torch.tensor([ids])).logits[0, -1].topk(2)
            gaps.append(float(top.values[0] - top.values[1]))
            ids.append(int(top.indices[0]))
    return min(gaps)


@pytest.mark.parametrize("do_sample", [False, True])
def test_generation_gives_the_tokens_of_an_unpacked_call(model, tok, monkeypatch, do_sample):
    cfg = SamplingConfig(
        do_sample=do_sample, max_new_tokens=6, num_return_sequences=2 if do_sample else 1
    )
    if not do_sample:
        assert _greedy_gaps(model, tok, PROMPTS, 6) > 1e-4
    runs, packed = {}, {}
    for flag in ("0", "1"):
        monkeypatch.setenv(prepacked.ENV, flag)
        calls = _count_packing(monkeypatch)
        torch.manual_seed(3)
        runs[flag] = [c.token_ids for c in generate(model, tok, PROMPTS, cfg)]
        packed[flag] = len(calls)
    assert runs["0"] == runs["1"]
    assert packed == {"0": 0, "1": len(_linears(model))}  # the packed call did run packed
    assert not any("forward" in m.__dict__ for m in _linears(model))


def test_mixture_sampler_gives_the_tokens_of_an_unpacked_call(model, tok, monkeypatch):
    reference = tiny_causal_lm(
        len(tok), seed=1, hidden_size=32, layers=2, heads=2, eos_token_id=EOS, pad_token_id=PAD
    )
    cfg = SamplingConfig(max_new_tokens=5, num_return_sequences=2)
    runs, packed = {}, {}
    for flag in ("0", "1"):
        monkeypatch.setenv(prepacked.ENV, flag)
        calls = _count_packing(monkeypatch)
        torch.manual_seed(4)
        got = generate_mixture(model, reference, tok, PROMPTS, cfg, mixture_beta=0.25)
        runs[flag] = [c.token_ids for c in got]
        packed[flag] = len(calls)
    assert runs["0"] == runs["1"]
    assert packed == {"0": 0, "1": len(_linears(model)) + len(_linears(reference))}


def test_lora_generation_gives_the_tokens_of_an_unpacked_call(tok, monkeypatch):
    peft = pytest.importorskip("peft")
    base = tiny_causal_lm(
        len(tok), seed=2, hidden_size=32, layers=2, heads=2, eos_token_id=EOS, pad_token_id=PAD
    )
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    cfg = SamplingConfig(max_new_tokens=5, num_return_sequences=2)
    runs, packed = {}, {}
    for flag in ("0", "1"):
        monkeypatch.setenv(prepacked.ENV, flag)
        calls = _count_packing(monkeypatch)
        torch.manual_seed(5)
        runs[flag] = [c.token_ids for c in generate(lora, tok, PROMPTS, cfg)]
        with lora.disable_adapter():
            torch.manual_seed(5)
            runs[flag + "off"] = [c.token_ids for c in generate(lora, tok, PROMPTS, cfg)]
        packed[flag] = len(calls)
    assert runs["0"] == runs["1"] and runs["0off"] == runs["1off"]
    assert packed["0"] == 0 and packed["1"] == 2 * len(_linears(lora))  # base and adapters
