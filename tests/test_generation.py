"""Batched sampling: EOS truncation, has_eos, left padding, num_return_sequences, greedy;
the vLLM engine through a fake `vllm` module."""

import dataclasses

import pytest
import torch
from online_helpers import BOS, EOS, PAD, word_tokenizer

from preftune.generation import (
    Completion,
    GenerationEngine,
    HFEngine,
    SamplingConfig,
    VLLMEngine,
    generate,
    truncate_at_eos,
)
from preftune.models import tiny_causal_lm

PROMPTS = ["a", "one plus two equals", "b c d e f g h"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 32-wide model gains nothing from threads; on a busy 2-core machine two threads make
    each matmul ~30x slower (spin-waiting), so these tests run single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_causal_lm(
        len(tok), seed=0, hidden_size=32, layers=1, heads=2, eos_token_id=EOS, pad_token_id=PAD
    )


def test_truncate_at_eos():
    assert truncate_at_eos([5, 6, 1, 0, 0], [1]) == ([5, 6, 1], True)
    assert truncate_at_eos([5, 1, 1, 1], [1]) == ([5, 1], True)  # pad == eos
    assert truncate_at_eos([5, 6, 7], [1]) == ([5, 6, 7], False)
    assert truncate_at_eos([5, 9, 1, 9], [1, 9]) == ([5, 9], True)  # several stop ids
    assert truncate_at_eos([1], [1]) == ([1], True)


def _greedy_reference(model, prompt_ids, max_new_tokens):
    """Plain argmax loop without KV cache or padding: what greedy decoding must return."""
    ids = list(prompt_ids)
    out = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt == EOS:
            break
    return out


def test_greedy_batched_left_padded_equals_unpadded_reference(model, tok):
    cfg = SamplingConfig(do_sample=False, max_new_tokens=6)
    batched = generate(model, tok, PROMPTS, cfg)
    assert [c.prompt_index for c in batched] == [0, 1, 2]
    for i, c in enumerate(batched):
        prompt_ids = tok(PROMPTS[i], add_special_tokens=False)["input_ids"]
        assert c.prompt_token_ids == prompt_ids and BOS not in c.prompt_token_ids
        assert c.token_ids == _greedy_reference(model, prompt_ids, 6), i
        assert c.has_eos == (c.token_ids[-1] == EOS)
    again = generate(model, tok, PROMPTS, cfg, batch_size=1)  # deterministic, any batching
    assert [c.token_ids for c in again] == [c.token_ids for c in batched]


def test_sampling_truncates_at_first_eos_and_flags_missing_eos(model, tok):
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=8, num_return_sequences=5)
    torch.manual_seed(0)
    out = generate(model, tok, PROMPTS, cfg)
    assert len(out) == 15 and all(isinstance(c, Completion) for c in out)
    assert [c.prompt_index for c in out] == [0] * 5 + [1] * 5 + [2] * 5
    for c in out:
        if c.has_eos:
            assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1]
            assert len(c.token_ids) <= 8
        else:
            assert EOS not in c.token_ids and len(c.token_ids) == 8
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert "<eos>" not in c.text and "<pad>" not in c.text
    flags = {c.has_eos for c in out}
    assert flags == {True, False}, "the seed should give both endings; pick another seed"


def test_num_return_sequences_are_prompt_major(model, tok):
    """At a tiny temperature sampling is greedy, so every sample of prompt i must equal
    prompt i's greedy completion: this pins the prompt-major order."""
    greedy = generate(model, tok, PROMPTS, SamplingConfig(do_sample=False, max_new_tokens=5))
    cfg = SamplingConfig(temperature=1e-4, max_new_tokens=5, num_return_sequences=3)
    torch.manual_seed(0)
    out = generate(model, tok, PROMPTS, cfg, batch_size=2)
    assert [c.token_ids for c in out] == [g.token_ids for g in greedy for _ in range(3)]


def test_sampling_is_reproducible_under_a_seed_and_restores_train_mode(model, tok):
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=6, num_return_sequences=2)
    model.train()
    torch.manual_seed(3)
    a = generate(model, tok, PROMPTS, cfg)
    assert model.training
    model.eval()
    torch.manual_seed(3)
    b = generate(model, tok, PROMPTS, cfg)
    assert not model.training
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_engine_protocol_and_config_checks(model, tok):
    engine = HFEngine(model, tok, batch_size=2)
    assert isinstance(engine, GenerationEngine)
    out = engine.generate(["a b"], SamplingConfig(do_sample=False, max_new_tokens=3))
    assert len(out) == 1 and out[0].prompt_index == 0
    assert engine.generate([], SamplingConfig()) == []
    base = SamplingConfig(temperature=1.0, top_p=0.9, num_return_sequences=4)
    g = base.greedy()
    assert (g.do_sample, g.num_return_sequences, g.top_p) == (False, 1, 0.9)
    with pytest.raises(ValueError, match="temperature=0"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="num_return_sequences=1 or do_sample"):
        SamplingConfig(do_sample=False, num_return_sequences=2)
    with pytest.raises(ValueError, match=r"top_p=1.5.*max_new_tokens=0"):
        SamplingConfig(top_p=1.5, max_new_tokens=0)
    with pytest.raises(TypeError, match="list of prompt strings"):
        generate(model, tok, "a b", SamplingConfig())


def test_vllm_engine_explains_missing_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install vllm"):
            VLLMEngine("some/model")
    else:
        pytest.skip("vllm is installed; the missing-package error cannot be shown here")


def test_shared_prefix_cache_gives_the_plain_greedy_tokens(model, tok):
    """Prompts with a long common head (a chat system prompt) prefill it once and repeat its
    KV cache over the batch; the tokens must be those of plain greedy decoding, prompt by prompt."""
    from preftune import layouts

    head = "a b c d e f g h a b c"
    prompts = [f"{head} one plus two equals", f"{head} b", f"{head} one c d e"]
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert layouts.common_prefix_length(rows) >= layouts.MIN_SHARED_PREFIX
    cfg = SamplingConfig(do_sample=False, max_new_tokens=6)
    got = generate(model, tok, prompts, cfg)
    for c, row in zip(got, rows):
        assert c.token_ids == _greedy_reference(model, row, 6)
    # the prefills here ran without the LM head on the positions nobody reads
    from preftune.generation import last_logits_only

    assert last_logits_only(model) == {"logits_to_keep": 1}


def test_common_prefix_length_leaves_every_row_a_token():
    from preftune.layouts import common_prefix_length

    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix_length([[7, 2], [1, 2]]) == 0
    assert common_prefix_length([[1], [1, 2]]) == 0


# ---- VLLMEngine through a fake `vllm` module --------------------------------------------------
# vLLM needs a GPU, so preftune's side of the engine (SamplingConfig -> SamplingParams, request
# and output shapes, EOS handling, the weight sync) runs against a stand-in with vLLM's surface:
# `LLM(model=..., **kw)` with `get_tokenizer`, `generate(requests, params, use_tqdm)` returning
# `[RequestOutput(outputs=[CompletionOutput(token_ids)])]`, `llm_engine.model_config.hf_config`
# and `llm_engine.model_executor.driver_worker.model_runner.model.load_weights(items)`. Its
# "engine" is a tiny transformers model of its own decoding greedily (temperature 0), which
# stops at the first stop id and includes it, as vLLM does.


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        for k, v in kwargs.items():
            setattr(self, k, v)


class FakeLLM:
    """One vLLM engine holding its own copy of the weights (`seed` picks them)."""

    seed = 1
    stop_ids_of_config: list[int] | None = None  # hf_config.eos_token_id; None: the model's
    with_driver_worker = True
    made: list = []

    def __init__(self, model: str, **kwargs):
        from types import SimpleNamespace as NS

        FakeLLM.made.append(self)
        self.model_name, self.kwargs, self.calls = model, kwargs, []
        self.net = tiny_causal_lm(
            len(word_tokenizer()),
            seed=self.seed,
            hidden_size=32,
            layers=1,
            heads=2,
            eos_token_id=EOS,
            pad_token_id=PAD,
        ).eval()
        hf_config = self.net.config
        if self.stop_ids_of_config is not None:
            hf_config = NS(eos_token_id=self.stop_ids_of_config)
        runner = NS(model=NS(load_weights=self._load_weights))
        executor = NS(driver_worker=NS(model_runner=runner)) if self.with_driver_worker else NS()
        self.llm_engine = NS(model_config=NS(hf_config=hf_config), model_executor=executor)

    def get_tokenizer(self):
        return word_tokenizer()

    def _load_weights(self, items):
        self.net.load_state_dict(dict(items), strict=True)

    def generate(self, requests, params, use_tqdm=True):
        from types import SimpleNamespace as NS

        self.calls.append((requests, params))  # greedy at any temperature: see the tests
        results = []
        for req in requests:
            toks = _greedy_reference(self.net, req["prompt_token_ids"], params.max_tokens)
            stops = [i for i, t in enumerate(toks) if t in params.stop_token_ids]
            toks = toks[: stops[0] + 1] if stops else toks
            results.append(NS(outputs=[NS(token_ids=tuple(toks)) for _ in range(params.n)]))
        return results


@pytest.fixture
def fake_vllm(monkeypatch):
    import sys
    import types

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams, module.__version__ = FakeLLM, FakeSamplingParams, "0.fake"
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(FakeLLM, "made", [])
    return FakeLLM


def test_vllm_engine_translates_the_sampling_config(fake_vllm, monkeypatch, tok):
    end_of_turn = tok.convert_tokens_to_ids("yes")  # a chat model's extra stop id, config only
    monkeypatch.setattr(fake_vllm, "stop_ids_of_config", [EOS, end_of_turn])
    engine = VLLMEngine("org/model", gpu_memory_utilization=0.3)
    (llm,) = fake_vllm.made
    assert (llm.model_name, llm.kwargs) == ("org/model", {"gpu_memory_utilization": 0.3})
    sample = SamplingConfig(
        temperature=0.7, top_p=0.9, top_k=40, max_new_tokens=5, num_return_sequences=2
    )
    cases = [
        (sample, dict(n=2, max_tokens=5, temperature=0.7, top_p=0.9, top_k=40)),
        (SamplingConfig(top_k=0), dict(n=1, max_tokens=64, temperature=0.9, top_p=1.0, top_k=-1)),
        (sample.greedy(), dict(n=1, max_tokens=5, temperature=0.0, top_p=1.0, top_k=-1)),
    ]
    monkeypatch.setattr(
        llm,
        "generate",
        lambda requests, params, use_tqdm: llm.calls.append((requests, params)) or [],
    )
    for cfg, want in cases:
        engine.generate(PROMPTS, cfg)
        requests, params = llm.calls[-1]
        assert params.kwargs == {**want, "stop_token_ids": [EOS, end_of_turn]}, cfg
    # prompts tokenized without special tokens: no BOS from the tokenizer's post-processor
    assert requests == [
        {"prompt_token_ids": tok(p, add_special_tokens=False)["input_ids"]} for p in PROMPTS
    ]
    assert all(BOS not in r["prompt_token_ids"] for r in requests)


def test_vllm_engine_completions_equal_hf_engine_and_follow_weight_syncs(fake_vllm, model, tok):
    """Greedy completions of the same weights are the same through either engine (prompt-major,
    has_eos, text); after `load_weights(policy)` the vLLM copy samples from the policy."""
    cfg = SamplingConfig(do_sample=False, max_new_tokens=6)
    engine = VLLMEngine("org/model", tokenizer=tok)
    llm = fake_vllm.made[0]
    policy = tiny_causal_lm(
        len(tok), seed=0, hidden_size=32, layers=1, heads=2, eos_token_id=EOS, pad_token_id=PAD
    )
    noise = torch.Generator().manual_seed(7)  # a policy that ends some completions with EOS
    with torch.no_grad():  # a policy after some optimizer steps
        for p in policy.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=noise))
    outputs = []
    for weights in (model, policy):  # neither is the engine's own starting copy (seed 1)
        engine.load_weights(weights)
        synced = llm.net.state_dict()
        assert all(torch.equal(synced[n], t) for n, t in weights.state_dict().items())
        got = engine.generate(PROMPTS, cfg)
        want = HFEngine(weights, tok).generate(PROMPTS, cfg)
        assert [dataclasses.astuple(c) for c in got] == [dataclasses.astuple(c) for c in want]
        outputs.append(got)
    assert [c.token_ids for c in outputs[0]] != [c.token_ids for c in outputs[1]]
    endings = {c.has_eos for c in outputs[0] + outputs[1]}
    assert endings == {True, False}, "both endings should be compared; change the noise seed"
    many = dataclasses.replace(cfg, do_sample=True, temperature=1.0, num_return_sequences=3)
    assert [c.prompt_index for c in engine.generate(PROMPTS, many)] == [0] * 3 + [1] * 3 + [2] * 3


def test_vllm_engine_weight_sync_without_in_process_worker_says_what_to_do(
    fake_vllm, monkeypatch, model, tok
):
    monkeypatch.setattr(fake_vllm, "with_driver_worker", False)
    engine = VLLMEngine("org/model", tokenizer=tok)
    with pytest.raises(NotImplementedError, match=r"0\.fake.*collective_rpc"):
        engine.load_weights(model)
