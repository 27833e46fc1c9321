"""Data order: plain and length-grouped batches, and the micro-batch split."""

import random

from preftune.train.batches import global_batches, micro_batches


def padding(batches, lengths):
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def test_plain_batches_are_the_seeded_permutation_in_full_batches():
    batches = global_batches(21, 4, seed=3, epoch=0)
    assert [len(b) for b in batches] == [4] * 5  # the ragged last example is left out, not padded
    flat = sum(batches, [])
    assert len(set(flat)) == 20
    assert batches == global_batches(21, 4, seed=3, epoch=0)
    assert batches != global_batches(21, 4, seed=3, epoch=1)


def test_length_grouped_batches_keep_the_examples_and_cut_padding():
    rng = random.Random(0)
    lengths = [rng.randint(10, 400) for _ in range(1003)]
    plain = global_batches(1003, 8, seed=1, epoch=2)
    grouped = global_batches(1003, 8, seed=1, epoch=2, lengths=lengths)
    # the same examples (the same ragged remainder left out), only regrouped
    assert sorted(sum(grouped, [])) == sorted(sum(plain, []))
    assert all(len(b) == 8 for b in grouped)
    assert padding(grouped, lengths) < 0.2 * padding(plain, lengths)
    # deterministic per (seed, epoch); the batch order is shuffled, not longest-first
    assert grouped == global_batches(1003, 8, seed=1, epoch=2, lengths=lengths)
    assert grouped != global_batches(1003, 8, seed=1, epoch=3, lengths=lengths)
    firsts = [max(lengths[i] for i in b) for b in grouped[:50]]
    assert firsts != sorted(firsts, reverse=True)


def test_micro_batches_split_processes_then_accumulation():
    batch = list(range(8))
    assert micro_batches(batch, 0, 2, 2) == [[0, 2], [4, 6]]
    assert micro_batches(batch, 1, 2, 2) == [[1, 3], [5, 7]]
    assert micro_batches(batch, 0, 1, 1) == [batch]


def test_sharing_pays_for_long_prompts_not_for_long_completions():
    from preftune.logprob.plan import sharing_pays
    from preftune.train.batches import pair_batch

    def ex(p, c, r):
        return {"prompt_ids": [5] * p, "chosen_ids": [6] * c, "rejected_ids": [7] * r}

    chat = [ex(40, 10, 14)] * 8  # the bundled set's shape: the prompt is most of each sequence
    long = [ex(64, 2048, 2048)]  # W2's longest case: one row of 4160 would cost 2x the attention
    assert sharing_pays(chat, packed=False, hidden_size=576)
    assert not sharing_pays(long, packed=False, hidden_size=576)
    examples = chat + long
    auto_chat = pair_batch(examples, list(range(8)), 0, False, "auto", 576)
    auto_long = pair_batch(examples, [8], 0, False, "auto", 576)
    assert auto_chat.tokens.input_ids.shape[0] == 8  # one row per pair: shared
    assert auto_long.tokens.input_ids.shape[0] == 2  # prompt + chosen, prompt + rejected


def test_length_sorted_batches_cover_everything_within_the_token_budget():
    from preftune.train.batches import length_sorted_batches

    lengths = [5, 40, 12, 12, 3, 700, 64, 9, 33, 12]
    batches = length_sorted_batches(lengths, tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
        # padded size within budget, except an example longer than the budget, alone
        assert len(b) * lengths[b[0]] <= 100 or len(b) == 1
    assert [5] in batches  # the 700-token example is alone
    assert len(batches) == 4  # [700] [64] [40 33] [12 12 12 9 5 3]
