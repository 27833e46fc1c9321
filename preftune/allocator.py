"""Keep memory the training loop frees inside the process (glibc only).

glibc's malloc serves every block above its mmap threshold (at most 32 MB) with a fresh `mmap`
and gives it back with `munmap` on free, and trims the top of its heap whenever more than 128 KB
is free there. A training step frees and re-allocates the same gigabyte of gradients, activations
and LM-head logits every step, so every step page-faults that memory back in and has the kernel
zero it again (tests/test_allocator.py shows the faults go away). How much time that buys depends
on how much a step allocates: in W1 of BENCHMARK.md it made TRL's DPOTrainer, which materialises
full logits, 1.35x faster, and preftune, which allocates far less, about the same within the
noise (docs/benchmarks.md, "Allocator").

`keep_freed_memory()` turns both off with `mallopt`: no mmap for large blocks, no trimming below
2 GB free. Freed memory is then reused by the next step without faults when the step's blocks
are the same from step to step. Where they change (W6's answers differ in length from batch to
batch), freed blocks do not always fit the next step's, so the heap grows, and faults, for the
first steps (`benchmarks/step_faults.py`; docs/benchmarks.md, W6). Peak resident memory is
about the same as with glibc's defaults (the peak is reached inside a step either way); the
process keeps its peak until it exits. The opposite setting, a fixed small mmap threshold that
hands every freed block back, leaves no free memory resident at the peak but faults every block
in again each step: in W1 a 9% lower peak at 1.8x the step time (docs/benchmarks.md, W1 memory
by phase), so it is not offered. It is what `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...` does from the environment,
applied at run time; PyTorch's CPU tuning guide reaches for jemalloc/tcmalloc for the same
reason, which would need a preloaded library.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # glibc's malloc.h parameter numbers
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest free top it leaves alone


def keep_freed_memory() -> str | None:
    """Configure glibc malloc to reuse freed memory; returns what was done, or None where it
    does not apply (not Linux, not glibc: musl has no tunable mallopt, macOS none at all)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return None
    return "glibc malloc keeps freed memory for reuse (no mmap per large block, no trimming)"
