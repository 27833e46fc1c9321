"""Decoding on prepacked oneDNN weights against the plain linear layers (preftune/prepacked.py).

    python benchmarks/decode_ab.py [--reps 3] [--threads 2] [--ks 2,4] [--new-tokens 16] [--bf16]

Two in-process A/Bs, each alternating the two settings after a warm-up (ratios within one run,
BENCHMARK.md; not a W-workload figure):
1. one product per linear shape of the embedded model (SmolLM2-135M: attention 576->576 and
   576->192, MLP 576->1536 and 1536->576, the LM head 576->49152) at decode row counts (16, 32),
   the plain layers (`F.linear`) against the prepacked ones, over 256 MB of distinct weights
   per shape (a decode step reads each weight from memory, not from cache), under `no_grad` as
   generation runs; median microseconds per product over the repetitions;
2. `preftune.generation.generate` on W5's first 8 prompts (the bundled arithmetic training
   prompts), k samples each, 16 new tokens (`--new-tokens`), temperature 0.9, `PREFTUNE_PREPACK=0` against 1 under
   the same seed per repetition: median seconds a call, and whether the tokens are equal.
`--bf16` runs both under CPU bf16 autocast (what `bf16=auto` gives on a CPU with bf16 units).
It also prints what packing the model's linear layers once costs (median of the repetitions).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from online_worker import _prompts  # noqa: E402
from workloads import default_model  # noqa: E402

from preftune import prepacked  # noqa: E402
from preftune.generation import SamplingConfig, generate  # noqa: E402
from preftune.models import load_causal_lm, load_tokenizer  # noqa: E402

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
COLD_BYTES = 256 << 20


def _per_call(layers: list[torch.nn.Linear], x: torch.Tensor, sweeps: int = 5) -> float:
    """Microseconds per product over sweeps through `layers` (plain or prepacked, as they are
    now): distinct weights, as in a decode step, so each is read from memory, not cache."""
    t = time.perf_counter()
    for _ in range(sweeps):
        for layer in layers:
            layer(x)
    return (time.perf_counter() - t) / (sweeps * len(layers)) * 1e6


@torch.no_grad()  # as generation runs (a call that needs gradients takes the plain layer)
def layer_ab(reps: int) -> None:
    print("rows  in -> out    layers  plain us  packed us  ratio")
    torch.manual_seed(0)
    for rows in (16, 32):
        for k, n in SHAPES:
            count = max(1, COLD_BYTES // (4 * k * n))  # together larger than the CPU's caches
            layers = [torch.nn.Linear(k, n, bias=False) for _ in range(count)]
            x = torch.randn(rows, k)
            times: dict[str, list[float]] = {"plain": [], "packed": []}
            for r in range(reps + 1):
                plain = _per_call(layers, x)
                with prepacked.prepacked_linears(layers, rows):
                    packed = _per_call(layers, x)
                if r:  # the first round warms up
                    times["plain"].append(plain)
                    times["packed"].append(packed)
            p, q = (statistics.median(times[s]) for s in ("plain", "packed"))
            print(f"{rows:4d}  {k:5d} -> {n:5d}  {count:6d}  {p:8.0f}  {q:9.0f}  x{p / q:.2f}")


def generate_ab(reps: int, ks: list[int], new_tokens: int) -> None:
    model_dir = default_model()
    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir)
    spec = {"model": model_dir, "steps": 1, "prompts_per_step": 8}
    texts = [p["text"] for p in _prompts(spec)]
    costs = []
    for _ in range(reps):
        t = time.perf_counter()
        with prepacked.prepacked_linears([model], 16) as n:
            costs.append(time.perf_counter() - t)
    print(f"packing the model's {n} linear layers: {statistics.median(costs):.3f} s")
    for k in ks:
        cfg = SamplingConfig(temperature=0.9, max_new_tokens=new_tokens, num_return_sequences=k)
        times: dict[str, list[float]] = {"0": [], "1": []}
        same = []
        for r in range(reps + 1):
            tokens = {}
            for flag in ("0", "1"):
                os.environ[prepacked.ENV] = flag
                torch.manual_seed(r)
                t = time.perf_counter()
                tokens[flag] = [c.token_ids for c in generate(model, tok, texts, cfg)]
                if r:
                    times[flag].append(time.perf_counter() - t)
            same.append(tokens["0"] == tokens["1"])
        p, q = (statistics.median(times[f]) for f in ("0", "1"))
        print(
            f"generate 8 prompts x {k}, {new_tokens} new tokens: plain {p:.2f} s, prepacked {q:.2f} s (x{p / q:.2f}); "
            f"each repetition {' '.join(f'{a:.2f}/{b:.2f}' for a, b in zip(times['0'], times['1']))}"
            f"; same tokens {same}"
        )
    os.environ.pop(prepacked.ENV, None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ks", default="2,4", help="samples per prompt, comma-separated")
    ap.add_argument("--bf16", action="store_true", help="under CPU bf16 autocast")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--no-layers", action="store_true", help="the generate A/B only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not prepacked.available():
        sys.exit("this torch has no oneDNN prepacked linear ops (or PREFTUNE_PREPACK=0)")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        if not args.no_layers:
            layer_ab(args.reps)
        generate_ab(args.reps, [int(k) for k in args.ks.split(",")], args.new_tokens)


if __name__ == "__main__":
    main()
