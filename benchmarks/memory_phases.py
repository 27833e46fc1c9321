"""Resident memory through a training run's phases, to see where a workload's peak comes from.

    python benchmarks/memory_phases.py w1 [--steps 6] [--allocator reuse|glibc|BYTES] [--profile]
                                          [--lean]
    python benchmarks/memory_phases.py w3 [--vocabs 32000,256000]

W1: the embedded default model on W1's data and settings (BENCHMARK.md; batch 8, the first
`--steps` batches of W1's order). W3: W3's random 2-layer model per vocabulary (built in a child
process, so its construction leaves nothing in this one's heap), 16 synthetic pairs, two steps.
A thread samples the resident set (/proc/self/statm) every 2 ms and keeps the largest value seen
in each phase: imports, model load + optimizer state, the reference precompute, each step's
forward and backward, each optimizer step. At each phase's end it also reads glibc's heap
(mallinfo2): bytes in use, and bytes free but still resident in the heap (what the allocator
holds for reuse; fragmentation when it is there at the peak) and bytes in blocks glibc mmapped
on their own. A phase's peak minus the one
before is what that phase added. One process, one run: the figures are this run's.

`--allocator`: `reuse` (preftune's default, `keep_freed_memory`: freed blocks stay in the heap),
`glibc` (glibc's defaults: blocks above a threshold that adapts up to 32 MB are mmapped), or a
byte count (glibc with that fixed mmap threshold, so every block above it goes back to the
system when freed and is page-faulted in again when next allocated).

`--lean` (W1): the memory-lean setting (`gradient_checkpointing=true`,
`optimizer_in_backward=true`, no clipping), benchmarks/run.py's `preftune-lean`.

`--profile` (W1) records one more step under torch.profiler with memory profiling and prints
the bytes torch holds beyond the step's start over the step (40 slices): the step's own need,
without the allocator's slack.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import (  # noqa: E402
    W1_DATA,
    batch_order,
    default_model,
    dpo_config,
    random_model_dir,
    synthetic_pairs,
    write_jsonl,
)

from preftune.allocator import M_MMAP_THRESHOLD  # noqa: E402

# run.py's `preftune-lean`: activations recomputed, each gradient applied and freed in backward
LEAN = {"gradient_checkpointing": True, "optimizer_in_backward": True, "max_grad_norm": None}


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def _libc():
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc


def _resident_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e9


class PhaseSampler:
    def __init__(self):
        self.phase, self.peaks, self.heap = "start", {}, {}
        self._libc = _libc()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            r = _resident_gb()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), r)
            time.sleep(0.002)

    def enter(self, phase: str):
        time.sleep(0.01)  # let the sampler see the end of the previous phase
        m = self._libc.mallinfo2()
        self.heap[self.phase] = (m.uordblks / 1e9, m.fordblks / 1e9, m.hblkhd / 1e9)
        self.phase = phase

    def report(self) -> None:
        prev = 0.0
        print(
            f"  {'phase':36s} {'peak GB':>8s} {'added':>7s} {'heap in use':>12s} {'heap free':>10s} {'mmapped':>8s}"
        )
        for phase, gb in list(self.peaks.items()):
            if phase in ("start", "end"):
                continue
            used, free, mapped = self.heap.get(phase, (float("nan"),) * 3)
            print(
                f"  {phase:36s} {gb:8.3f} {gb - prev:+7.3f} {used:12.3f} {free:10.3f} {mapped:8.3f}"
            )
            prev = gb


def _instrument(trainer, sampler: PhaseSampler) -> None:
    step = trainer.optimizer.step

    def timed_step(*args, **kwargs):
        sampler.enter(f"step {trainer.step}: optimizer")
        return step(*args, **kwargs)

    trainer.optimizer.step = timed_step


def _trainer(cfg, sampler: PhaseSampler):
    from preftune.train.trainer import Trainer

    original = Trainer._precompute

    def precompute(self):
        sampler.enter("reference precompute")
        return original(self)

    Trainer._precompute = precompute
    try:
        sampler.enter("load + optimizer state")
        return Trainer(cfg)
    finally:
        Trainer._precompute = original


def _steps(trainer, batches, sampler: PhaseSampler) -> list[float]:
    times = []
    for batch in batches:
        sampler.enter(f"step {trainer.step}: forward + backward")
        times.append(trainer.train_step(batch)["step_time"])
        trainer.step += 1
    sampler.enter("end")
    return times


def _profile_step(trainer, batch) -> None:
    """One step under torch.profiler: bytes torch holds beyond the step's start, over the step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step(batch)
    trainer.step += 1
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    t0, t1 = events[0][0], events[-1][0]
    held, peak, peak_at, top, last = 0, 0, t0, [0] * 40, 0
    for t, n in events:
        k = min(39, int(40 * (t - t0) / max(1, t1 - t0)))
        for j in range(last + 1, k + 1):  # slices without an event hold what was held
            top[j] = held
        last = k
        held += n
        top[k] = max(top[k], held)
        if held > peak:
            peak, peak_at = held, t
    print(
        f"  torch's allocations beyond the step's start: peak {peak / 1e9:.3f} GB at "
        f"{(peak_at - t0) / (t1 - t0):.0%} of the step; largest held per 1/40 of the step (GB):"
    )
    print("  " + " ".join(f"{x / 1e9:.2f}" for x in top))


def probe_w1(args, sampler: PhaseSampler) -> None:
    sampler.enter("import torch, transformers, preftune")
    import torch
    import transformers  # noqa: F401

    import preftune.train.trainer  # noqa: F401

    sampler.enter("import transformers' Llama code")
    from transformers import LlamaForCausalLM  # noqa: F401  (what loading the model imports)

    torch.set_num_threads(2)
    model = default_model()  # resolved in the user's cache, before the run gets its own
    with tempfile.TemporaryDirectory() as work:
        # a fresh cache, as benchmarks/run.py gives each run: the precompute runs, not a reuse
        os.environ["PREFTUNE_CACHE"] = str(Path(work) / "cache")
        steps = args.steps + args.profile  # the profiled step is one more
        n = 8 * steps
        cfg = dpo_config(
            model,
            W1_DATA,
            n,
            steps,
            Path(work),
            "probe",
            max_length=512,
            max_prompt_length=256,
            optimizer="adamw",
            keep_freed_memory=args.allocator == "reuse",
            **(LEAN if args.lean else {}),
        )
        trainer = _trainer(cfg, sampler)
        _instrument(trainer, sampler)
        batches = batch_order(n, 8, 0, steps)
        times = _steps(trainer, batches[: args.steps], sampler)
        print(
            f"W1{', lean' if args.lean else ''}, allocator {args.allocator}: {args.steps} steps, "
            f"{len(batches[0])} pairs each"
        )
        sampler.report()
        print("  step times (s): " + ", ".join(f"{t:.2f}" for t in times))
        if args.profile:
            _profile_step(trainer, batches[-1])


def probe_w3(vocab: int, work: Path, sampler: PhaseSampler) -> None:
    import torch

    from preftune.models import load_tokenizer

    torch.set_num_threads(2)
    mdir = work / f"model-{vocab}"
    subprocess.run(
        [sys.executable, __file__, "--build", str(mdir), str(vocab)], check=True
    )  # a child process: the construction's memory is not this process's
    tok = load_tokenizer(default_model())
    data = write_jsonl(
        synthetic_pairs(tok, 16, 32, 128, max_id=min(vocab, 32000)), work / "d.jsonl"
    )
    cfg = dpo_config(
        str(mdir), str(data), 16, 2, work / "runs", "probe", max_length=168, max_prompt_length=40
    )
    trainer = _trainer(cfg, sampler)
    _instrument(trainer, sampler)
    _steps(trainer, [list(range(8)), list(range(8, 16))], sampler)
    state = vocab * 128 * 4 / 1e9  # one V x H fp32 copy (the layers add ~0.6 MB)
    print(f"W3, vocab {vocab}: one V x H copy = {state:.3f} GB")
    sampler.report()


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--build":
        random_model_dir(Path(sys.argv[2]), int(sys.argv[3]), 128, 256, 2, 2, 2)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", choices=["w1", "w3"])
    ap.add_argument("--vocabs", default="32000,256000", help="W3: one process per vocabulary")
    ap.add_argument("--steps", type=int, default=6, help="W1: training steps sampled")
    ap.add_argument(
        "--allocator",
        default="reuse",
        help="W1: reuse (default), glibc, or an mmap threshold in bytes",
    )
    ap.add_argument(
        "--profile", action="store_true", help="W1: profile one more step's allocations"
    )
    ap.add_argument("--lean", action="store_true", help="W1: checkpointing + optimizer_in_backward")
    args = ap.parse_args(argv)
    if args.workload != "w1" and (args.lean or args.profile):
        ap.error("--lean and --profile are W1 options")
    if args.allocator not in ("reuse", "glibc"):
        if not args.allocator.isdigit():
            ap.error(f"--allocator {args.allocator!r}: use reuse, glibc or a byte count")
        # before torch is imported, so every later block follows it
        if _libc().mallopt(M_MMAP_THRESHOLD, int(args.allocator)) != 1:
            ap.error(f"glibc refused mmap threshold {args.allocator}")
    sampler = PhaseSampler()
    if args.workload == "w1":
        probe_w1(args, sampler)
        return
    vocabs = args.vocabs.split(",")
    for vocab in vocabs:
        if len(vocabs) > 1:  # one process per vocabulary, as in W3: each starts from an empty heap
            subprocess.run([sys.executable, __file__, "w3", "--vocabs", vocab], check=True)
            continue
        sampler.enter("imports")
        with tempfile.TemporaryDirectory() as work:
            probe_w3(int(vocab), Path(work), sampler)


if __name__ == "__main__":
    main()
