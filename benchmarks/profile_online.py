"""Where one W5 step of preftune's online trainers spends its time, by phase.

    python benchmarks/profile_online.py [--method online_dpo|grpo] [--steps 3] [--threads 2]
                                        [--set gradient_checkpointing=true ...] [--memory]

Builds the trainer as benchmarks/online_worker.py does (the embedded model, W5's prompts,
samples, new tokens and settings; `--set` changes any preftune setting on top) and wraps its
phases in timers: generation (the sampler: prefill and per-token loop), judging, the policy
forward, the reference forward, the backward, the optimizer step, and the rest of the step.
Prints each phase's share of the step,
the median over the steps after the first (warm-up), and the process's peak RSS. The shares
are ratios within one process: on a loaded machine they show where the time goes, not W5
figures.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_phases import PhaseSampler  # noqa: E402
from online_worker import W5, preftune_trainer, w5_spec  # noqa: E402
from workloads import default_model  # noqa: E402


class Phases:
    """Seconds per phase; with a `PhaseSampler` (--memory) also the resident set's peak in each
    (outside every wrapped phase: "between phases")."""

    def __init__(self, sampler=None):
        self.now: dict[str, float] = defaultdict(float)
        self.sampler = sampler

    @contextlib.contextmanager
    def timed(self, name: str):
        if self.sampler is not None:
            self.sampler.enter(name)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.now[name] += time.perf_counter() - t
            if self.sampler is not None:
                self.sampler.enter("between phases")

    def wrap(self, owner, attr: str, name: str) -> None:
        real = getattr(owner, attr)

        def timed(*a, **kw):
            with self.timed(name):
                return real(*a, **kw)

        setattr(owner, attr, timed)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="online_dpo")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=W5["prompts_per_step"])
    p.add_argument("--k", type=int, default=W5["k"])
    p.add_argument("--new-tokens", type=int, default=W5["new_tokens"])
    p.add_argument("--set", nargs="*", default=[], help="more preftune keys: key=value ...")
    p.add_argument(
        "--memory",
        action="store_true",
        help="also the peak resident set in each phase (a 2 ms sampler thread; each phase "
        "boundary waits 10 ms for it, so the times then include that)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = w5_spec(default_model(), args.method, steps=args.steps, prompts_per_step=args.prompts,
                   k=args.k, new_tokens=args.new_tokens, workdir=tempfile.mkdtemp(prefix="w5-prof-"))  # fmt: skip
    trainer = preftune_trainer(spec, args.set)
    ph = Phases(PhaseSampler() if args.memory else None)
    ph.wrap(trainer, "_generate", "generate")
    ph.wrap(trainer, "_score", "judge")
    ref = trainer.reference
    for attr in ("logps", "hidden"):
        if ref is not None and hasattr(ref, attr):
            ph.wrap(ref, attr, "reference forward")
    ph.wrap(trainer, "run_policy", "policy forward")
    ph.wrap(trainer.acc, "backward", "backward")
    ph.wrap(trainer.optimizer, "step", "optimizer")
    rows = []
    B = args.prompts
    for s in range(args.steps):
        ph.now.clear()
        t = time.perf_counter()
        trainer.train_step(list(range(s * B, (s + 1) * B)))
        trainer.step += 1
        total = time.perf_counter() - t
        rows.append({**ph.now, "total": total})
        print(
            f"step {s + 1}: {total:.2f} s " + ", ".join(f"{k} {v:.2f}" for k, v in ph.now.items())
        )
    keep = rows[1:] or rows
    total = statistics.median(r["total"] for r in keep)
    names = [n for n in keep[0] if n != "total"]
    print(f"\n{args.method}: median step {total:.2f} s over {len(keep)} steps")
    for n in names:
        v = statistics.median(r.get(n, 0.0) for r in keep)
        print(f"  {n:20s} {v:6.2f} s  {100 * v / total:5.1f}%")
    rest = total - sum(statistics.median(r.get(n, 0.0) for r in keep) for n in names)
    print(f"  {'rest':20s} {rest:6.2f} s  {100 * rest / total:5.1f}%")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {rss:.2f} GiB")
    if args.memory:
        print("peak resident set in each phase, over all steps (GB = 1e9 bytes):")
        ph.sampler.report()


if __name__ == "__main__":
    main()
