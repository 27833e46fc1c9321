"""preftune.allocator: once glibc keeps freed memory, a training-like step of large tensors is
served again from memory the process already holds, without page faults."""

import json
import platform
import subprocess
import sys

import pytest

from preftune.allocator import keep_freed_memory

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# One "step" allocates and frees what a SmolLM2-135M step does in the large: two 113 MB
# vocabulary-sized tensors (the tied embedding's and the LM head's gradients), a 60 MB one and
# forty 3.5 MB weight-sized ones, all written in full.
STEP = """
import json, resource, sys, torch
from preftune.allocator import keep_freed_memory
assert keep_freed_memory()
sizes = [113 << 20, 113 << 20, 60 << 20] + [int(3.5 * (1 << 20))] * 40
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(n // 4) for n in sizes]
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps([step() for _ in range(6)]))
"""


@pytest.mark.skipif(not glibc, reason="glibc only")
def test_a_repeated_step_reuses_freed_memory_without_page_faults():
    out = subprocess.run([sys.executable, "-c", STEP], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    faults = json.loads(out.stdout.strip().splitlines()[-1])
    first = faults[0]
    assert first > 90_000  # ~430 MB written: one fault per 4 KB page the first time
    # glibc's default maps every block above its mmap threshold afresh each step (measured:
    # 44k-109k faults per later step); kept, the later steps fault (almost) nothing
    assert max(faults[2:]) < first // 50


def test_not_applied_where_it_does_not_apply(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert keep_freed_memory() is None
