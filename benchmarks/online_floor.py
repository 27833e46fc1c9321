"""How fast and how small W5's online DPO step can be on this machine, against TRL run beside it.

    python benchmarks/online_floor.py [--steps 8] [--threads 2]

W5's target (docs/benchmarks.md) is >= 3x TRL's optimizer steps per second at <= 0.6x its
peak memory. In one invocation this runs TRL 1.16's online DPO for `--steps` W5 steps (its own
process, `online_worker.py`, as benchmarks/online.py runs it), measures the machine's best fp32
matmul rate and read bandwidth, runs preftune's trainer for the same steps and bounds what an
implementation of the step could reach with W5's settings (fp32, AdamW, clipping at 1.0, a
frozen fp32 reference) from the tokens preftune's steps sampled:

- **time**: the matrix products no implementation can skip, at the best fp32 rate of 1024^3,
  2048^3 and 4096^3 products. A pass computes the decoder's linear layers once for every
  distinct token prefix that predicts a needed token or feeds one that does (prefixes the rows
  share, such as the chat template's system prompt or a prompt shared by its two samples,
  once; a sample's last token feeds nothing; the last layer only keys and values where nothing
  is predicted) and the LM head once for every distinct prefix predicting a needed token.
  Sampling needs every sampled token; scoring only those after the point where a pair's two
  samples part (the log-probs of a common start cancel in DPO's log-ratio difference, and an
  identical pair has no gradient). Attention, norms, the sampler and Python are left out.
  Designs: (A) sampling without gradients, then the reference's forward, the policy's forward
  and its backward (two passes: input and weight gradients), all gradients held for clipping:
  what preftune and TRL do; (B) as A, the policy's forward reused from sampling under
  autograd; (C) as A, clipping without holding gradients: the first backward only measures
  the norm, a second pass recomputes the weight gradients from kept output gradients and
  updates; (D) B and C together. Plus AdamW's reads (the parameters and both moments; the
  held gradients too in A and B) at the best read bandwidth.
- **memory**: a fresh process importing torch and transformers and building the model's class
  on the meta device, plus the fp32 copies of the parameters held at the optimizer step:
  policy, reference, AdamW's two moments, and (A, B) the gradients. Activations, KV caches
  and data are left out.
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
from online_worker import W5, preftune_trainer, w5_spec  # noqa: E402
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
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"online_floor: importing torch and transformers failed: {last}")
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
    """Each step's rows (prompt ids, sample ids; two rows a prompt) and its wall time."""
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
        comps = seen[-1]
        assert [c.prompt_index for c in comps] == [i // 2 for i in range(len(comps))]  # pairs
        rows = [(tuple(c.prompt_token_ids), tuple(c.token_ids)) for c in comps]
        out.append({"seconds": time.perf_counter() - t, "rows": rows})
    return out


def pass_flops(rows: list[tuple], m: dict) -> int:
    """Matrix-product FLOPs of one pass over `rows` (prompt ids, sample ids, first sample
    position whose prediction is needed; module docstring)."""
    fed, predicting = set(), set()
    for prompt, sample, start in rows:
        full = prompt + sample
        for i in range(len(full) - 1):  # position i predicts token i + 1
            fed.add(full[: i + 1])
            if i >= len(prompt) - 1 + start:
                predicting.add(full[: i + 1])
    idle = len(fed) - len(predicting)
    return 2 * (m["linear"] * len(fed) + m["head"] * len(predicting) - m["last_not_kv"] * idle)


def sampling_rows(rows: list[tuple]) -> list[tuple]:
    """Sampling predicts every sampled token."""
    return [(p, s, 0) for p, s in rows]


def scoring_rows(rows: list[tuple]) -> list[tuple]:
    """Scoring a pair (rows 2i, 2i + 1) needs its tokens from where its samples part; none for
    an identical pair."""
    out = []
    for (p, a), (_, b) in zip(rows[0::2], rows[1::2]):
        if a != b:
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            out += [(p, a, same), (p, b, same)]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=W5["steps"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = default_model()
    spec = w5_spec(model, "online_dpo", steps=args.steps, threads=args.threads)
    trl = run_worker({**spec, "tool": "trl"}, script="online_worker.py")
    if not trl["ok"]:
        last = (trl["log_tail"].strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"online_floor: TRL's run failed ({trl['error']}): {last}")
    imports = import_rss(model)
    trainer = preftune_trainer({**spec, "workdir": tempfile.mkdtemp(prefix="w5-floor-")})
    m = shape(trainer.policy)
    rate = max(max(matmul_rate(n)) for n in (1024, 2048, 4096)) * 1e9
    read_s = 4 * m["params"] / read_bandwidth()  # one fp32 pass over the parameters
    torch.manual_seed(spec["seed"])  # W5's seed for the steps' sampling
    steps = step_tokens(trainer, args.steps, spec["prompts_per_step"])
    report(args, m, rate, read_s, steps, trl, imports)


DESIGNS = (  # name, scoring passes, fp32 copies held (AdamW reads every one but the reference)
    ("A: sampling without gradients, then score; gradients held (preftune, TRL)", 4, 5),
    ("B: as A, the policy's forward reused from sampling", 3, 5),
    ("C: as A, clipping from a first backward; no gradients held", 5, 4),
    ("D: B and C", 4, 4),
)


def report(args, m: dict, rate: float, read_s: float, steps: list, trl: dict, imports: int) -> None:
    sample = statistics.mean(pass_flops(sampling_rows(s["rows"]), m) for s in steps)
    score = statistics.mean(pass_flops(scoring_rows(s["rows"]), m) for s in steps)
    mine = statistics.mean(s["seconds"] for s in steps)
    theirs = trl["train_s"] / args.steps
    gib, copy = 2**30, 4 * m["params"]
    sampled = sum(len(r[1]) for s in steps for r in s["rows"])
    print(f"{machine()['cpu']}, {args.threads} threads, {args.steps} W5 online DPO steps, one "
          f"invocation; fp32 matmul {rate / 1e9:.1f} GFLOP/s (best of 1024^3-4096^3); a pass "
          f"{sample / 1e9:.0f} GFLOP sampling, {score / 1e9:.0f} scoring (means over the steps)")  # fmt: skip
    print(f"preftune: {sampled} sampled tokens, mean step {mine:.2f} s; TRL: "
          f"{trl['gen_tokens']} sampled tokens, mean step {theirs:.2f} s, peak RSS "
          f"{trl['peak_rss'] / gib:.2f} GiB; preftune x{theirs / mine:.2f} TRL's steps/s")  # fmt: skip
    for name, passes, copies in DESIGNS:
        bound = (sample + passes * score) / rate + (copies - 1) * read_s
        floor = imports + copies * copy
        mine_part = f"; preftune's step ran at {bound / mine:.0%} of it" if name[0] == "A" else ""
        print(f"{name}: step >= {bound:.2f} s = x{theirs / bound:.2f} TRL's steps/s (3x needs "
              f">= {3 * bound / theirs:.0%} of the best rate throughout{mine_part}); memory >= "
              f"{imports / gib:.2f} + {copies} x {copy / gib:.3f} = {floor / gib:.2f} GiB = "
              f"x{floor / trl['peak_rss']:.2f} TRL's peak")  # fmt: skip


if __name__ == "__main__":
    main()
