import json

import pytest

from preftune.data import arithmetic
from preftune.data.records import DataError, load_records, shared_prefix, unpair
from preftune.data.tokenize import completion_ids, prompt_ids, tokenize_records

CONV = {
    "prompt": [{"role": "user", "content": "What is 2 + 3?"}],
    "chosen": [{"role": "assistant", "content": "2 + 3 = 5"}],
    "rejected": [{"role": "assistant", "content": "2 + 3 = 6"}],
}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_invalid_record_names_file_line_and_field(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [CONV, {"prompt": "x", "chosen": "a"}, CONV])
    with pytest.raises(DataError, match=r"d.jsonl:2: missing field 'rejected'"):
        load_records(p)


def test_bad_json_and_skip_invalid_reports_counts(tmp_path):
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [CONV, "{not json", {"prompt": "x", "chosen": "", "rejected": "b"}, CONV],
    )
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        load_records(p)
    recs, report = load_records(p, skip_invalid=True)
    assert len(recs) == 2 and sum(report.skipped.values()) == 2
    assert "2 skipped" in report.summary()


def test_parquet_and_saved_dataset_read_like_jsonl(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3"}] * 3
    ds = Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_records(tmp_path / "d.parquet")[0] == rows
    assert load_records(tmp_path / "saved")[0] == rows


def test_implicit_prompt_is_the_shared_prefix():
    p, c, r = shared_prefix("Q: 2+2? A: 4", "Q: 2+2? A: 5")
    assert (p, c, r) == ("Q: 2+2? A:", " 4", " 5")  # the space opens the completion, as in TRL
    assert shared_prefix("A: 45", "A: 46") == ("A:", " 45", " 46")  # whole words
    msgs = CONV["prompt"]
    p, c, r = shared_prefix(msgs + CONV["chosen"], msgs + CONV["rejected"])
    assert p == msgs and c == CONV["chosen"] and r == CONV["rejected"]


def test_unpaired_records_and_unpair():
    recs, _ = load_records([{"prompt": "a", "completion": "b", "label": True}])
    assert recs[0]["label"] is True
    with pytest.raises(DataError, match="label"):
        load_records([{"prompt": "a", "completion": "b", "label": "yes"}])
    assert [r["label"] for r in unpair([{"prompt": "p", "chosen": "c", "rejected": "r"}])] == [
        True,
        False,
    ]


def test_conversational_equals_chat_template_and_standard_form(tokenizer):
    full = tokenizer.apply_chat_template(CONV["prompt"] + CONV["chosen"], tokenize=False)
    templ_prompt = tokenizer.apply_chat_template(
        CONV["prompt"], add_generation_prompt=True, tokenize=True
    )
    templ_prompt = (
        templ_prompt["input_ids"]
        if isinstance(templ_prompt, dict) or hasattr(templ_prompt, "keys")
        else templ_prompt
    )
    p = prompt_ids(tokenizer, CONV["prompt"])
    c = completion_ids(tokenizer, CONV["prompt"], CONV["chosen"])
    assert p == list(templ_prompt)
    assert c[-1] == tokenizer.eos_token_id and c.count(tokenizer.eos_token_id) == 1
    # the same content in standard (string) form gives the same ids
    prompt_text = tokenizer.apply_chat_template(
        CONV["prompt"], add_generation_prompt=True, tokenize=False
    )
    assert prompt_ids(tokenizer, prompt_text) == p
    assert completion_ids(tokenizer, prompt_text, full[len(prompt_text) :]) == c
    # and prompt + completion is exactly the template's rendering of the whole conversation, up to EOS
    whole = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert whole[: len(p) + len(c)] == p + c


def test_standard_completion_gets_eos(tokenizer):
    ids = completion_ids(tokenizer, "Q:", " 5")
    assert ids[-1] == tokenizer.eos_token_id


def test_truncation_keeps_prompt_end_and_is_counted(tokenizer):
    rec = {"prompt": "word " * 50 + "Question?", "chosen": " yes " * 30, "rejected": " no"}
    (ex,), stats = tokenize_records([rec], tokenizer, max_length=40, max_prompt_length=20)
    full_prompt = prompt_ids(tokenizer, rec["prompt"])
    assert ex["prompt_ids"] == full_prompt[-20:]  # the question survives, as in TRL
    assert len(ex["prompt_ids"]) + len(ex["chosen_ids"]) <= 40
    assert stats.prompt_truncated == 1 and stats.completion_truncated == 1
    assert "truncated 1 prompts" in stats.summary()


def test_arithmetic_verifier_and_splits():
    assert arithmetic.verify("What is 47 + 38?", "47 + 38 = 85")
    assert arithmetic.verify([{"role": "user", "content": "What is 47 + 38?"}], "85")
    assert not arithmetic.verify("What is 47 + 38?", "The answer is 86.")
    assert not arithmetic.verify("What is 47 + 38?", "To add 47 and 38")
    train, test = arithmetic.split_problems()
    assert not set(train) & set(test) and len(test) == arithmetic.N_TEST


def test_bundled_sets_are_valid_and_held_out():
    test = {
        tuple(arithmetic.parse_prompt(r["prompt"]))
        for r in map(json.loads, open(arithmetic.bundled_path("test")))
    }
    for kind in ("edit", "onpolicy"):
        rows = [json.loads(line) for line in open(arithmetic.bundled_path(kind))]
        assert len(rows) >= 256
        load_records(rows)
        for r in rows:
            a, b = arithmetic.parse_prompt(r["prompt"])
            assert (a, b) not in test
            assert arithmetic.verify(r["prompt"], r["chosen"][0]["content"])
            assert not arithmetic.verify(r["prompt"], r["rejected"][0]["content"])


def test_edit_pairs_differ_in_one_digit():
    for r in arithmetic.build_edit_pairs([(47, 38), (10, 10), (99, 99)]):
        c, w = r["chosen"][0]["content"].split("= ")[1], r["rejected"][0]["content"].split("= ")[1]
        assert len(c) == len(w) and sum(x != y for x, y in zip(c, w)) == 1


def test_a_users_file_is_used_whole_with_a_seeded_random_split(tokenizer, tmp_path):
    from preftune.config import build_config
    from preftune.data.split import split_records
    from preftune.train.setup import load_datasets

    rows = [{"prompt": f"Q{i}:", "chosen": " a", "rejected": " b"} for i in range(400)]
    cfg = build_config({"data": str(write_jsonl(tmp_path / "d.jsonl", rows)), "batch_size": 10})
    data = load_datasets(cfg, tokenizer, unpaired=False)
    assert (len(data.train), len(data.eval)) == (336, 64)  # not 256: num_train=auto is all of it
    assert "336 records train, 64 held out (drawn at random with seed 0)" in data.notes[-1]
    assert "the 6 past the last full batch are left out of each epoch" in data.notes[-1]
    held = split_records(400, 64, "auto", seed=0, bundled=False).eval
    assert held == split_records(400, 64, "auto", seed=0, bundled=False).eval  # seeded
    assert held != split_records(400, 64, "auto", seed=1, bundled=False).eval
    assert held != list(range(336, 400))  # not the file's tail
    # the bundled sets keep the default job's split: first 256 train, last 64 held out
    bundled = split_records(1024, 64, "auto", seed=0, bundled=True)
    assert (bundled.train, bundled.eval, bundled.unused) == (
        list(range(256)),
        list(range(960, 1024)),
        704,
    )
    assert len(split_records(400, 64, None, seed=0, bundled=True).train) == 336  # null: all


def test_prompt_without_room_is_refused_or_skipped_and_counted(tokenizer):
    recs = [
        {"prompt": "word " * 80, "chosen": " a", "rejected": " b"},
        {"prompt": "Q:", "chosen": " a", "rejected": " b"},
    ]
    with pytest.raises(DataError, match=r"d.jsonl:1: the prompt is 64 tokens.*max_length=32"):
        tokenize_records(recs, tokenizer, 32, 64, where=["d.jsonl:1", "d.jsonl:2"])
    out, stats = tokenize_records(recs, tokenizer, 32, 64, skip_invalid=True)
    assert len(out) == 1 and out[0]["index"] == 0 and stats.skipped == 1
    assert "skipped 1 examples" in stats.summary()


def test_chosen_equal_to_rejected_is_refused_with_an_explicit_prompt_too():
    with pytest.raises(DataError, match="identical"):
        load_records([{"prompt": "Q:", "chosen": " a", "rejected": " a"}])
    recs, report = load_records(
        [
            {"prompt": "Q:", "chosen": " a", "rejected": " a"},
            {"prompt": "Q:", "chosen": " a", "rejected": " b"},
        ],
        skip_invalid=True,
    )
    assert len(recs) == 1 and "1 'chosen' and 'rejected' are identical" in report.summary()


def test_reading_a_jsonl_or_a_bundled_set_never_imports_datasets(tmp_path):
    """`datasets` (with pandas and pyarrow, ~0.08 GiB resident) is imported by the sources that
    need it only; a run on a JSONL file or a bundled set does not hold it."""
    import subprocess
    import sys

    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    code = (
        "import sys, preftune.cli, preftune.train.entry\n"
        "from preftune.data.records import load_records\n"
        f"load_records({str(p)!r}); load_records('arithmetic_edit')\n"
        "assert 'datasets' not in sys.modules, 'datasets imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
