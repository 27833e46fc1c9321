"""W5 (BENCHMARK.md): online DPO and GRPO, preftune against TRL 1.16, side by side.

    python benchmarks/online.py                          # the embedded model, 8 steps each
    python benchmarks/online.py --steps 2 --prompts 2 --k 2 --new-tokens 4 --tiny   # smoke test
    python benchmarks/online.py --tools preftune,preftune-set,trl --set reference_offload=disk

Same prompts (preftune's bundled arithmetic training prompts, in order), same samples per prompt
(GRPO: `--k`; online DPO: 2), same new-token budget, temperature 0.9, top-p 1, the same judge
(the last-integer verifier), AdamW at the same constant lr, clip 1.0, fp32 (`--precision bf16`:
both under bf16 autocast), 2 torch threads, KL
to a frozen reference in both GRPO runs (`--kl-coef`, TRL's `beta`), TRL GRPO with
`loss_type="grpo"`, `scale_rewards="group"` (preftune's GRPO defaults). Each (tool, method) runs
in a fresh process (`online_worker.py`); reported: generated tokens/s, optimizer steps/s and
peak RSS, medians over `--repeats`, and preftune / TRL ratios. One JSON line per invocation goes
to benchmarks/results.jsonl. The machine should be otherwise idle: the load average is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

from common import (
    append_result,
    fmt_range,
    git_commit,
    machine,
    print_table,
    run_worker,
    summary,
)
from online_worker import W5, w5_spec


def _model(args) -> str:
    if not args.tiny:
        from workloads import default_model

        return default_model()
    from preftune.models import save_tiny_model_dir

    return str(save_tiny_model_dir(Path(tempfile.mkdtemp(prefix="w5-tiny-")) / "model", seed=0))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="online_dpo,grpo")
    p.add_argument("--tools", default="preftune,trl")
    p.add_argument("--steps", type=int, default=W5["steps"])
    p.add_argument("--prompts", type=int, default=W5["prompts_per_step"], help="prompts a step")
    p.add_argument("--k", type=int, default=W5["k"], help="GRPO samples per prompt")
    p.add_argument("--new-tokens", type=int, default=W5["new_tokens"])
    p.add_argument("--lr", type=float, default=W5["lr"])
    p.add_argument("--kl-coef", type=float, default=W5["kl_coef"])
    p.add_argument("--beta", type=float, default=W5["beta"], help="online DPO's beta")
    p.add_argument("--threads", type=int, default=W5["threads"])
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="both tools in fp32, or both under bf16 autocast over fp32 weights (each tool's "
        "default on a CPU with bf16 units: preftune's bf16=auto, TRL 1.16's bf16=True)",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="preftune settings for the `preftune-set` tool, which runs beside plain preftune "
        "and TRL when --tools names it (e.g. --tools preftune,preftune-set,trl --set "
        "reference_offload=disk)",
    )
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    args = p.parse_args(argv)
    if bool(args.set) != ("preftune-set" in args.tools.split(",")):
        p.error("--set and --tools preftune-set go together (preftune-set is preftune with --set)")
    model = _model(args)
    settings = dict(steps=args.steps, prompts_per_step=args.prompts, k=args.k,
                    new_tokens=args.new_tokens, lr=args.lr, kl_coef=args.kl_coef, beta=args.beta,
                    threads=args.threads, bf16=args.precision == "bf16")  # fmt: skip
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for method in args.methods.split(","):
            for tool in args.tools.split(","):
                spec = {**w5_spec(model, method, **settings), "tool": tool}
                if tool == "preftune-set":  # preftune with `--set` on top
                    spec.update(tool="preftune", overrides=args.set)
                r = run_worker(spec, script="online_worker.py")
                if not r["ok"]:
                    print(f"{tool} {method} failed: {r['error']}\n{r['log_tail']}", file=sys.stderr)
                    continue
                r["gen_tokens_per_s"] = r["gen_tokens"] / r["train_s"]
                r["steps_per_s"] = args.steps / r["train_s"]
                runs.setdefault((tool, method), []).append(r)
    _report(args, runs)


def _ratio(s: dict, peer: dict | None, f: str) -> str:
    return f"x{s[f]['median'] / peer[f]['median']:.2f}" if peer and peer[f]["median"] else ""


def _report(args, runs: dict) -> None:
    stats = {
        key: {
            f: summary([r[f] for r in rs]) for f in ("gen_tokens_per_s", "steps_per_s", "peak_rss")
        }
        for key, rs in runs.items()
    }
    rows = []
    for (tool, method), s in stats.items():
        peer = stats.get(("trl", method)) if tool.startswith("preftune") else None
        rows.append([
            method, tool,
            fmt_range(s["gen_tokens_per_s"]), fmt_range(s["steps_per_s"], digits=3),
            fmt_range(s["peak_rss"], 2**-30, 2),
            _ratio(s, peer, "steps_per_s"), _ratio(s, peer, "peak_rss"),
        ])  # fmt: skip
    print_table(
        ["method", "tool", "gen tok/s", "steps/s", "peak RSS GiB", "steps/s ratio", "RSS ratio"],
        rows,
    )
    append_result(
        {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "workload": "w5",
            "command": "python benchmarks/online.py " + " ".join(sys.argv[1:]),
            "commit": git_commit(),
            "machine": machine(),
            "args": vars(args),
            "runs": {f"{t}/{m}": rs for (t, m), rs in runs.items()},
            "stats": {f"{t}/{m}": s for (t, m), s in stats.items()},
        }
    )


if __name__ == "__main__":
    main()
