"""Helpers for the online-piece tests: a tiny word-level tokenizer and a judge function that
`CallableJudge` loads by import path ("online_helpers:length_score")."""

from __future__ import annotations

WORDS = "a b c d e f g h one two three four plus equals yes no".split()
PAD, EOS, BOS = 0, 1, 2


def word_tokenizer(with_bos: bool = True):
    """A real `PreTrainedTokenizerFast` over 19 ids (pad 0, eos 1, bos 2, then WORDS), built
    offline. With `with_bos` its post-processor prepends <bos> when special tokens are added,
    so a caller that forgets `add_special_tokens=False` gets a visible extra token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", BOS)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def length_score(prompts: list[str], completions: list[str]) -> list[float]:
    """Judge: number of words in the completion."""
    return [float(len(c.split())) for c in completions]


def position_score(prompts: list[str], completions: list[str]) -> list[float]:
    """Judge: the completion's position in the call, so no two completions ever tie."""
    return [float(i) for i in range(len(completions))]


def not_a_judge_result(prompts: list[str], completions: list[str]):
    return "oops"


def rank_tie(prompts: list[str], completions: list[str]) -> list[float]:
    """Judge: every completion ties on process 1 of a distributed run (its pairs are all
    skipped), distinct scores elsewhere."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() == 1:
        return [0.0] * len(completions)
    return [float(i) for i in range(len(completions))]


def all_tie(prompts: list[str], completions: list[str]) -> list[float]:
    """Judge: every completion ties, on every process (no pair anywhere trains)."""
    return [0.0] * len(completions)
