"""Judges: verifier, callable by import path, reward model read at the last real token."""

from pathlib import Path

import pytest
import torch
from online_helpers import EOS, word_tokenizer

from preftune.judges import (
    CallableJudge,
    Judge,
    RewardModelJudge,
    VerifierJudge,
    load_judge,
)
from preftune.models import ModelNotFoundError

PROMPTS = ["one plus two equals", "a", "b c d e f"]
COMPLETIONS = [" three", " b c d e", " yes no"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()  # tiny models: threads only add contention
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def helpers_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def _save_reward_model(path, pad_is_eos=False, num_labels=1):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = word_tokenizer(with_bos=False)
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, num_labels=num_labels,
        pad_token_id=tok.pad_token_id, eos_token_id=EOS, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a visible head: default init (std 0.02) gives near-equal scores
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return _save_reward_model(tmp_path_factory.mktemp("rm") / "model")


def _manual_last_token(model, tok, prompt, completion):
    """One unpadded sequence, head read at its final position."""
    ids = torch.tensor([tok(prompt + completion, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model.score(model.model(input_ids=ids).last_hidden_state)[0, -1, 0].item()


def test_reward_model_judge_equals_manual_last_token_read(rm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    judge = RewardModelJudge(rm_dir, batch_size=2)  # 3 pairs: a padded batch and a single
    scores = judge.score(PROMPTS, COMPLETIONS)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    tok = AutoTokenizer.from_pretrained(rm_dir)
    manual = [_manual_last_token(model, tok, p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert scores == pytest.approx(manual, abs=1e-5)
    # HF's own pooling agrees when no pad id occurs in the text
    ids = tok(PROMPTS[0] + COMPLETIONS[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert scores[0] == pytest.approx(hf, abs=1e-5)
    assert max(scores) - min(scores) > 1e-3  # distinct scores: a wrong position would show
    assert RewardModelJudge(rm_dir, batch_size=3).score(PROMPTS, COMPLETIONS) == pytest.approx(
        scores, abs=1e-5
    )


def test_reward_model_judge_reads_the_eos_when_pad_equals_eos(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _save_reward_model(tmp_path / "rm_pad_eos", pad_is_eos=True)
    completions = [c + " <eos>" for c in COMPLETIONS]
    scores = RewardModelJudge(path, batch_size=3).score(PROMPTS, completions)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.pad_token_id == EOS and model.config.pad_token_id == EOS
    manual = [_manual_last_token(model, tok, p, c) for p, c in zip(PROMPTS, completions)]
    assert scores == pytest.approx(manual, abs=1e-5)
    # HF's pooling (last id != pad_token_id) skips the trailing EOS and reads another token.
    ids = tok(PROMPTS[0] + completions[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert abs(hf - scores[0]) > 1e-4


def test_reward_model_judge_errors(rm_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    with pytest.raises(ValueError, match="needs tokenizer"):
        RewardModelJudge(model)
    two = _save_reward_model(tmp_path / "two", num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2"):
        RewardModelJudge(two)
    with pytest.raises(ModelNotFoundError, match="config.json"):
        RewardModelJudge(tmp_path)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        RewardModelJudge(rm_dir).score(["a", "b"], ["c"])


def test_verifier_judge_with_own_verify_fn():
    seen = []

    def verify(prompt, completion):
        seen.append((prompt, completion))
        return completion.strip() == "yes"

    judge = VerifierJudge(verify)
    assert judge.score(["q1", "q2", "q3"], [" yes", "no", "yes "]) == [1.0, 0.0, 1.0]
    assert seen[0] == ("q1", " yes")
    assert isinstance(judge, Judge)


def test_verifier_default_checks_arithmetic_answers():
    judge = VerifierJudge()
    assert judge.score(["What is 2 + 3?", "What is 2 + 3?"], ["5", "6"]) == [1.0, 0.0]


def test_callable_judge_from_import_path():
    judge = CallableJudge("online_helpers:length_score")
    assert judge.score(["p", "q"], ["a b c", ""]) == [3.0, 0.0]
    assert isinstance(judge, Judge)
    assert CallableJudge(lambda p, c: [1] * len(c)).score(["p"], ["c"]) == [1.0]


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("online_helpers", ValueError, "expected 'module:function'"),
        ("no_such_module_xyz:score", ImportError, "could not import module 'no_such_module_xyz'"),
        ("online_helpers:nope", AttributeError, "no attribute 'nope'"),
        ("online_helpers:WORDS", TypeError, "not a function"),
    ],
)
def test_callable_judge_errors_name_what_failed(spec, error, match):
    with pytest.raises(error, match=match):
        CallableJudge(spec)


def test_callable_judge_checks_its_output():
    with pytest.raises(TypeError, match="list of numbers"):
        CallableJudge("online_helpers:not_a_judge_result").score(["p"], ["c"])
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        CallableJudge(lambda p, c: [0.0]).score(["p", "q"], ["c", "d"])
    with pytest.raises(ValueError, match=r"non-finite scores at indices \[1\]"):
        CallableJudge(lambda p, c: [0.0, float("nan")]).score(["p", "q"], ["c", "d"])


def test_load_judge_dispatch(rm_dir, tmp_path):
    assert isinstance(load_judge("verifier"), VerifierJudge)
    assert isinstance(load_judge("Arithmetic"), VerifierJudge)
    assert isinstance(load_judge("online_helpers:length_score"), CallableJudge)
    rm = load_judge(str(rm_dir), batch_size=4)
    assert isinstance(rm, RewardModelJudge) and rm.batch_size == 4
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_judge(str(tmp_path))
    with pytest.raises(ValueError, match="unknown judge 'OpenAssistant/some-rm'.*--local-dir"):
        load_judge("OpenAssistant/some-rm")
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load_judge(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="non-empty"):
        load_judge("  ")
