"""Page faults and system time of each training step of preftune (W1 or W6), in one process.

    python benchmarks/step_faults.py [--workload w6] [--bf16] [--steps 4] [--set key=value ...]

A step that allocates memory the process has not touched before has the kernel fault in and
zero every new page: system time, not computation. This prints, for each step: its wall time,
the minor page faults (`ru_minflt`) and system CPU seconds (`ru_stime`) it caused, and the peak
RSS after it. Run with `THP_MEM_ALLOC_ENABLE=1` in the environment to have PyTorch ask for
transparent huge pages on blocks of 2 MB and more (PyTorch reads it once, at its first large
allocation). Figures are for one process on whatever else the machine runs (BENCHMARK.md):
compare settings side by side.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import diagnostic_trainer  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="w6", choices=["w1", "w6"])
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (default: fp32)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--set", nargs="*", default=[], help="more preftune keys: key=value ...")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as work:
        trainer, batches = diagnostic_trainer(args.workload, args.steps, work, args.bf16, args.set)
        for i, batch in enumerate(batches):
            before = resource.getrusage(resource.RUSAGE_SELF)
            t = time.perf_counter()
            trainer.train_step(batch)
            wall = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_SELF)
            print(
                f"step {i + 1}: {wall:.2f} s, {after.ru_minflt - before.ru_minflt} minor faults, "
                f"{after.ru_stime - before.ru_stime:.2f} s system time, peak RSS "
                f"{after.ru_maxrss / 2**20:.2f} GiB",
                flush=True,
            )


if __name__ == "__main__":
    main()
