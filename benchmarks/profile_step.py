"""Where a W1 training step of preftune spends its time, by aten operator.

    python benchmarks/profile_step.py [--steps 6] [--warmup 2] [--workload w1|w6] [--bf16]

Runs preftune's W1 setting (SmolLM2-135M, the bundled one-digit-edit pairs, batch 8, DPO,
fp32, 2 threads, precomputed reference), or W6's chat pairs with long answers, in fp32 or bf16
autocast, for warm-up steps, then times every aten call of the
profiled steps with a TorchDispatchMode. It prints the share of the step each operator takes,
the FLOPs of the matmuls (2·M·K·N from their shapes) and the rate they ran at, against the
2048³ matmul rate of the step's precision measured in the same process before and after. Figures are ratios
within one run (BENCHMARK.md); the dispatch mode adds its own overhead to the step, so the
step times it prints are not W1 figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import matmul_rate  # noqa: E402
from workloads import diagnostic_trainer  # noqa: E402

MATMULS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default"}


class OpTimer(TorchDispatchMode):
    """Wall time and call count of each aten operator, and the FLOPs of the matmuls."""

    def __init__(self):
        super().__init__()
        self.time = defaultdict(float)
        self.calls = defaultdict(int)
        self.mm_flops = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        name = str(func)
        self.time[name] += time.perf_counter() - t
        self.calls[name] += 1
        if name in MATMULS:
            a, b = (args[1], args[2]) if name == "aten.addmm.default" else (args[0], args[1])
            batch = a.shape[0] if a.dim() == 3 else 1
            self.mm_flops += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="profiled steps")
    ap.add_argument("--warmup", type=int, default=2, help="steps run first, not profiled")
    ap.add_argument("--top", type=int, default=15, help="operators listed")
    ap.add_argument("--workload", default="w1", choices=["w1", "w6"])
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (default: fp32)")
    ap.add_argument("--set", nargs="*", default=[], help="more preftune keys: key=value ...")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    n = args.steps + args.warmup
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    with tempfile.TemporaryDirectory() as work:
        rates = matmul_rate(dtype=dtype)
        trainer, batches = diagnostic_trainer(args.workload, n, work, args.bf16, args.set)
        for b in batches[: args.warmup]:
            trainer.train_step(b)
        timer, steps = OpTimer(), []
        for b in batches[args.warmup :]:
            t = time.perf_counter()
            with timer:
                trainer.train_step(b)
            steps.append(time.perf_counter() - t)
        rates += matmul_rate(dtype=dtype)
    total, ops = sum(steps), sum(timer.time.values())
    mm = sum(v for k, v in timer.time.items() if k in MATMULS)
    rate = statistics.median(rates)
    print(
        f"{args.steps} profiled steps, {total / args.steps:.2f} s/step under the dispatch mode; "
        f"aten calls {ops / total:.0%} of it, the rest Python and dispatch"
    )
    print(
        f"matmuls: {mm / total:.0%} of the step, {timer.mm_flops / args.steps / 1e9:.0f} GFLOP "
        f"per step at {timer.mm_flops / mm / 1e9:.0f} GFLOP/s = {timer.mm_flops / mm / 1e9 / rate:.0%}"
        f" of the 2048³ {'bf16' if args.bf16 else 'fp32'} rate measured in this run ({rate:.0f} GFLOP/s, min {min(rates):.0f}, "
        f"max {max(rates):.0f})"
    )
    print(f"{'share':>6} {'calls/step':>10}  operator")
    for name, v in sorted(timer.time.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{v / total:6.1%} {timer.calls[name] / args.steps:10.0f}  {name}")


if __name__ == "__main__":
    main()
