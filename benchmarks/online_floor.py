"""How fast and how small W5's online DPO step can be on this machine, against TRL run beside it.

    python benchmarks/online_floor.py [--steps 8] [--threads 2]

W5's target (docs/benchmarks.md) is >= 3x TRL's optimizer steps per second at <= 0.6x its
peak memory. In one invocation this runs TRL 1.16's online DPO for `--steps` W5 steps (its own
process, `online_worker.py`, as benchmarks/online.py runs it), measures the machine's best fp32
matmul rate and read bandwidth, runs preftune's trainer for the same steps and bounds what an
implementation of the step could reach with W5's settings (fp32, AdamW, clipping at 1.0, a
frozen fp32 reference) from the tokens preftune's steps sampled:

- **time**: the matrix products no implementation can skip, at the best fp32 rate of 1024^3,
  2048^3 and 4096^3 products. One pass over a step's samples feeds each prompt once (a prompt
  shared by its two samples) and every sampled token but the last through the decoder's linear
  layers (the last layer only needs keys and values at prompt positions that predict nothing),
  and the LM head at every position that predicts a sampled token. Sampling is one pass, the
  reference one, the policy's forward one and its backward two. Attention, norms, the sampler,
  Python: left out. Two designs: scoring with a separate policy forward after sampling without
  gradients (preftune, TRL): 5 passes; sampling under autograd, its forward reused for the
  loss: 4. Plus the optimizer's reads (clipping's norm over the gradients; AdamW reading
  parameters, gradients and both moments) at the best read bandwidth.
- **memory**: a fresh process importing torch and transformers and building the model's class
  on the meta device, plus five fp32 copies of the parameters that preftune and TRL both hold
  at the optimizer step: policy, reference, gradients (clipping reads their total norm before
  any update) and AdamW's two moments. Activations, KV caches and data: left out.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, matmul_rate, run_worker  # noqa: E402
from online_worker import preftune_trainer, w5_spec  # noqa: E402
from workloads import default_model  # noqa: E402

_IMPORTS = """
import resource, sys, torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM
with torch.device("meta"):
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def import_rss(model: str) -> int:
    """Peak RSS (bytes) of a fresh process that imports torch and transformers and builds the
    model's class on the meta device (no weights)."""
    out = subprocess.run([sys.executable, "-c", _IMPORTS, model], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"measuring the imports failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.split()[-1])


def shape(model: torch.nn.Module) -> dict:
    """Unique parameters; weights of the decoder's linear layers; the LM head's; and the last
    decoder layer's linear weights other than its key and value projections (Llama names)."""
    head = model.get_output_embeddings().weight
    unique = {id(p): p.numel() for p in model.parameters()}
    linear = lambda mod: [(n, m) for n, m in mod.named_modules() if isinstance(m, torch.nn.Linear)]  # noqa: E731
    last = model.get_decoder().layers[-1]
    return {
        "params": sum(unique.values()),
        "linear": sum(m.weight.numel() for _, m in linear(model) if m.weight is not head),
        "head": head.numel(),
        "last_not_kv": sum(
            m.weight.numel() for n, m in linear(last) if not n.endswith(("k_proj", "v_proj"))
        ),
    }


def read_bandwidth(mib: int = 512, reps: int = 5) -> float:
    """Best bytes/s of reading one fp32 tensor (a sum over it)."""
    x = torch.randn(mib * 2**18)
    x.sum()
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = max(best, x.nbytes / (time.perf_counter() - t))
    return best


def step_tokens(trainer, steps: int, prompts: int) -> list[dict]:
    """Prompt and sample lengths of `steps` real online DPO steps, with their wall times."""
    seen: list = []
    real = trainer._generate

    def capture(*a, **kw):
        seen.append(real(*a, **kw))
        return seen[-1]

    trainer._generate = capture
    out = []
    for s in range(steps):
        t = time.perf_counter()
        trainer.train_step(list(range(s * prompts, (s + 1) * prompts)))
        trainer.step += 1
        plen = {c.prompt_index: len(c.prompt_token_ids) for c in seen[-1]}
        out.append(
            {
                "seconds": time.perf_counter() - t,
                "prompts": list(plen.values()),
                "samples": [len(c.token_ids) for c in seen[-1]],
            }
        )
    return out


def pass_flops(tok: dict, m: dict) -> int:
    """Matrix-product FLOPs of one pass over a step's prompts and samples (module docstring)."""
    p, n = sum(tok["prompts"]), len(tok["prompts"])
    c, rows = sum(tok["samples"]), len(tok["samples"])
    fed = p + c - rows  # a sample's last token predicts nothing
    predicting = c - rows + n  # each sampled token's distribution; a prompt's last shared
    idle = p - n  # prompt positions whose last-layer queries, output and MLP nobody reads
    return 2 * (m["linear"] * fed + m["head"] * predicting - m["last_not_kv"] * idle)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = default_model()
    spec = w5_spec(model, "online_dpo", steps=args.steps, threads=args.threads)
    trl = run_worker({**spec, "tool": "trl"}, script="online_worker.py")
    if not trl["ok"]:
        raise SystemExit(f"TRL's run failed:\n{trl['log_tail']}")
    imports = import_rss(model)
    trainer = preftune_trainer({**spec, "workdir": tempfile.mkdtemp(prefix="w5-floor-")})
    m = shape(trainer.policy)
    rate = max(max(matmul_rate(n)) for n in (1024, 2048, 4096)) * 1e9
    optimizer_s = 5 * 4 * m["params"] / read_bandwidth()
    torch.manual_seed(spec["seed"])  # W5's seed for the steps' sampling
    steps = step_tokens(trainer, args.steps, spec["prompts_per_step"])
    report(args, m, rate, optimizer_s, steps, trl, imports)


def report(args, m, rate, optimizer_s, steps, trl, imports) -> None:
    one = statistics.mean(pass_flops(s, m) for s in steps)
    bound = {k: k * one / rate + optimizer_s for k in (5, 4)}
    mine = statistics.mean(s["seconds"] for s in steps)
    theirs = trl["train_s"] / args.steps
    gib, state = 2**30, 5 * 4 * m["params"]
    print(f"{machine()['cpu']}, {args.threads} threads, {args.steps} W5 online DPO steps; fp32 "
          f"matmul {rate / 1e9:.1f} GFLOP/s (best of 1024^3-4096^3), optimizer reads >= "
          f"{optimizer_s:.2f} s")  # fmt: skip
    print(f"preftune: {sum(sum(s['prompts']) for s in steps)} prompt + "
          f"{sum(sum(s['samples']) for s in steps)} sampled tokens, mean step {mine:.2f} s, "
          f"{one / 1e9:.0f} GFLOP a pass; TRL: {trl['gen_tokens']} sampled tokens, mean step "
          f"{theirs:.2f} s, peak RSS {trl['peak_rss'] / gib:.2f} GiB")  # fmt: skip
    for k, design in ((5, "separate scoring forward (preftune, TRL)"),
                      (4, "policy forward shared with sampling under autograd")):  # fmt: skip
        print(f"bound, {design}: {bound[k]:.2f} s a step = x{theirs / bound[k]:.2f} TRL's "
              f"steps/s (preftune's step is {bound[k] / mine:.0%} of this bound's speed)")  # fmt: skip
    floor = imports + state
    print(f"memory: imports {imports / gib:.2f} GiB + 5 x {4 * m['params'] / gib:.3f} GiB "
          f"({m['params'] / 1e6:.1f} M parameters) = {floor / gib:.2f} GiB = "
          f"x{floor / trl['peak_rss']:.2f} TRL's peak (targets: >= x3 steps/s, <= x0.6)")  # fmt: skip


if __name__ == "__main__":
    main()
