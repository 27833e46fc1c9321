"""Shared fixtures: the default model's tokenizer (converted once into the cache) and tiny
random-weight models with the same tokenizer, so most tests run in seconds."""

from __future__ import annotations

import os

import pytest
import torch

# bf16=auto (the default) would train in bf16 on a machine with bf16 units and fp32 elsewhere;
# the suite's expected values are fp32 ones, so every machine answers "no bf16 units" unless a
# test says otherwise (tests/test_precision.py). Subprocesses (CLI, torchrun) inherit it.
os.environ.setdefault("PREFTUNE_FAST_BF16", "0")
# Tiny models gain nothing from a second thread and lose much when the machine is busy;
# tests on the real model raise it for their own duration.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_dir():
    from preftune.models import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tokenizer(default_dir):
    from preftune.models import load_tokenizer

    return load_tokenizer(str(default_dir))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, default_dir):
    from preftune.models import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
def tiny_model(tiny_dir):
    from preftune.models import load_causal_lm

    return load_causal_lm(str(tiny_dir))
