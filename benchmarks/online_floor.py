"""How fast and how small a W5 online DPO step can be on this machine, whatever the code.

    python benchmarks/online_floor.py [--steps 3] [--threads 2]

W5's target (docs/benchmarks.md) is >= 3x TRL's optimizer steps per second at <= 0.6x its
peak memory. This script bounds what any implementation of W5's online DPO step (exact fp32
training, AdamW, gradient clipping at 1.0, a frozen fp32 reference; TRL's settings in W5)
could reach here, from quantities measured in this invocation:

- **time**: the matrix-product FLOPs the step cannot avoid, at the machine's best fp32 matmul
  rate. Every prompt token and every generated token but the last goes once through the
  decoder while sampling; the reference and the policy then read each prompt once and each
  completion (the fewest tokens: a prompt shared by its two samples); the backward costs two
  forwards. Linear layers, the LM head and the causal attention of the scoring passes (each
  query against the keys at and before it, no more), at the machine's best fp32 matmul rate;
  plus what the optimizer step must read (the norm for clipping reads the gradients; AdamW
  reads the parameters, gradients and both moments: 5 fp32 passes over the parameters, its
  writes not counted) at the machine's best read bandwidth. Norms, activations, the sampler
  and the attention while sampling are left out, so the bound is low. Token counts
  come from real steps of preftune's trainer on W5's prompts and settings.
- **memory**: the resident set of importing torch and transformers and building the model's
  class (a subprocess), plus five fp32 copies of the parameters that must all exist at the
  optimizer step: the policy, the reference, the gradients (clipping needs their total norm
  before any update) and AdamW's two moments. Activations, KV caches and data are left out.

Both bounds are set against TRL's online DPO in the fp32 W5 records of benchmarks/results.jsonl
taken on a machine with this CPU and instruction sets (its fastest step and its largest peak,
the figures most favourable to the target).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, matmul_rate  # noqa: E402
from online_worker import preftune_trainer  # noqa: E402
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
    model's class on the meta device (no weights): what any HF-based trainer holds first."""
    out = subprocess.run(
        [sys.executable, "-c", _IMPORTS, model], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


def shape(model: torch.nn.Module) -> dict:
    """Unique parameters, weights of the decoder's linear layers, LM head weights, and the
    attention's layers x width (query heads x head size)."""
    head = model.get_output_embeddings().weight
    unique = {id(p): p.numel() for p in model.parameters()}
    lin = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m.weight is not head
    )
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    width = c.num_attention_heads * head_dim
    return {"params": sum(unique.values()), "linear": lin, "head": head.numel(),
            "attn": c.num_hidden_layers * width}  # fmt: skip


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
    """Token counts of `steps` real online DPO steps (and their measured times)."""
    seen: list = []
    real = trainer._generate

    def capture(*a, **kw):
        comps = real(*a, **kw)
        seen.append(comps)
        return comps

    trainer._generate = capture
    out = []
    for s in range(steps):
        t = time.perf_counter()
        trainer.train_step(list(range(s * prompts, (s + 1) * prompts)))
        trainer.step += 1
        comps = seen[-1]
        plen = {c.prompt_index: len(c.prompt_token_ids) for c in comps}
        out.append(
            {
                "seconds": time.perf_counter() - t,
                "prompts": list(plen.values()),
                "rows": [(plen[c.prompt_index], len(c.token_ids)) for c in comps],
            }
        )
    return out


def floor_flops(tok: dict, m: dict) -> float:
    """The step's unavoidable matrix-product FLOPs (module docstring)."""
    p, rows = sum(tok["prompts"]), tok["rows"]
    c = sum(n for _, n in rows)
    sample = 2 * m["linear"] * (p + c - len(rows)) + 2 * m["head"] * c  # a distribution a token
    # causal attention: query t meets t keys; QK^T and AV, 2 FLOPs a multiply-add
    pairs = sum(n * (n + 1) // 2 for n in tok["prompts"])
    pairs += sum(n * q + n * (n + 1) // 2 for q, n in rows)
    score = 2 * m["linear"] * (p + c) + 2 * m["head"] * c + 4 * m["attn"] * pairs
    return sample + score + 3 * score  # reference forward; policy forward and its backward


def trl_records() -> list[dict]:
    """TRL's online DPO figures from the W5 records taken on this CPU model and ISA."""
    here = machine()
    rows = []
    for line in RESULTS.read_text().splitlines():
        r = json.loads(line)
        st = (r.get("stats") or {}).get("trl/online_dpo")
        m = r.get("machine") or {}
        same = (m.get("cpu"), m.get("isa")) == (here["cpu"], here["isa"])
        fp32 = (r.get("args") or {}).get("precision", "fp32") == "fp32"
        if r.get("workload") == "w5" and st and same and fp32:
            rows.append({"date": r["date"], "steps_per_s": st["steps_per_s"]["median"],
                         "peak_rss": st["peak_rss"]["median"]})  # fmt: skip
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = default_model()
    spec = dict(model=model, steps=args.steps, prompts_per_step=8, k=2, new_tokens=16, lr=1e-6,
                kl_coef=0.04, beta=0.1, temperature=0.9, seed=0, method="online_dpo",
                workdir=tempfile.mkdtemp(prefix="w5-floor-"))  # fmt: skip
    imports = import_rss(model)
    trainer = preftune_trainer(spec)
    m = shape(trainer.policy)
    total = m["params"]
    peak_rate = max(max(matmul_rate(n)) for n in (1024, 2048, 4096)) * 1e9
    bandwidth = read_bandwidth()
    adamw_s = 5 * 4 * total / bandwidth
    torch.manual_seed(0)  # the steps sample as in W5, whatever the measurements drew
    steps = step_tokens(trainer, args.steps, 8)
    flops = [floor_flops(s, m) for s in steps]
    floor_s = min(flops) / peak_rate + adamw_s
    state = 5 * 4 * total
    print(f"{machine()['cpu']}, {args.threads} threads; fp32 matmul peak {peak_rate / 1e9:.1f} "
          f"GFLOP/s (best of 1024^3, 2048^3, 4096^3); read {bandwidth / 1e9:.1f} GB/s, so "
          f"the optimizer step >= {adamw_s:.2f} s")  # fmt: skip
    for i, (s, f) in enumerate(zip(steps, flops)):
        c = sum(n for _, n in s["rows"])
        print(f"step {i + 1}: {sum(s['prompts'])} prompt + {c} completion tokens, {f / 1e9:.0f} "
              f"GFLOP = {f / peak_rate + adamw_s:.2f} s at best; preftune took "
              f"{s['seconds']:.2f} s")  # fmt: skip
    gib = 2**30
    print(f"memory floor: imports {imports / gib:.2f} GiB + 5 x {4 * total / gib:.3f} GiB "
          f"(policy, reference, gradients, 2 AdamW moments; {total / 1e6:.1f} M parameters) = "
          f"{(imports + state) / gib:.2f} GiB")  # fmt: skip
    trl = trl_records()
    if not trl:
        print("no W5 record of TRL on this CPU in benchmarks/results.jsonl (benchmarks/online.py)")
        return
    fastest = max(r["steps_per_s"] for r in trl)
    largest = max(r["peak_rss"] for r in trl)
    print(f"TRL online DPO, {len(trl)} W5 records on this CPU: fastest step {1 / fastest:.2f} s, "
          f"largest peak {largest / gib:.2f} GiB")  # fmt: skip
    print(f"=> at best x{1 / fastest / floor_s:.2f} TRL's steps/s (target x3), at least "
          f"x{(imports + state) / largest:.2f} its peak memory (target x0.6)")  # fmt: skip


if __name__ == "__main__":
    main()
