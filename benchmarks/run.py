"""preftune vs TRL's DPOTrainer on the workloads of /work/shared/BENCHMARK.md.

    python benchmarks/run.py w1 [--steps 32] [--precision fp32|bf16|both] [--variants ...]
    python benchmarks/run.py w2 [--steps 2] [--lengths 128,512,1024,2048]
    python benchmarks/run.py w3 [--steps 2] [--vocabs 32000,128000,256000]
    python benchmarks/run.py w4 [--steps 4]
    python benchmarks/run.py w6 [--steps 16] [--precision both]   # chat pairs, long answers
    python benchmarks/run.py matmul

Every tool run is its own subprocess (worker.py), so its peak resident set is its own; each
invocation prints a table and appends one JSON line to benchmarks/results.jsonl. The 2048³
matmul rate that MFU is divided by is measured in the same invocation, before and after the
runs, under the same thread settings.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    append_result,
    fmt_range,
    print_table,
    run_worker,
    summary,
)
from harness import (  # noqa: E402
    GB,
    VARIANTS,
    base_spec,
    clips,
    compare,
    derive,
    header,
    matmul,
    max_rel_diff,
    peer_of,
    run_many,
)
from scaling import w2, w3, w4  # noqa: E402
from workloads import (  # noqa: E402
    W1_DATA,
    conversational_pairs,
    default_model,
    write_jsonl,
)


# ---- W1 / W6: the pairs workloads -----------------------------------------------------------------
def w1(args) -> None:
    pairs_workload(args, "w1", W1_DATA, f"SmolLM2-135M-Instruct, {W1_DATA}")


def w6(args) -> None:
    """W6: conversational records, a system + user prompt and two long answers (50-250 tokens)
    that share nothing; seeded, written to a temporary file both tools read."""
    from preftune.models import load_tokenizer

    with tempfile.TemporaryDirectory() as work:
        records = conversational_pairs(load_tokenizer(default_model()), args.steps * 8)
        data = str(write_jsonl(records, Path(work) / "w6.jsonl"))
        pairs_workload(args, "w6", data, "SmolLM2-135M-Instruct, W6 chat pairs (answers 50-250)")


def pairs_workload(args, workload: str, data: str, title: str) -> None:
    """W1 and W6: every variant in each precision on one pass over `data`, against TRL."""
    model = args.model or default_model()
    precisions = {"fp32": [False], "bf16": [True], "both": [False, True]}[args.precision]
    names = args.variants.split(",")
    for n in names:
        if n not in VARIANTS:
            raise SystemExit(f"unknown variant {n!r}; choose from {', '.join(VARIANTS)}")
        if VARIANTS[n]["tool"] != "trl" and peer_of(n) not in names:
            if peer_of(n) != "trl" or not any(peer_of(m) == n for m in names):
                raise SystemExit(
                    f"variant {n!r} is compared with {peer_of(n)!r} (the same update rule); "
                    f"add {peer_of(n)} to --variants"
                )
            # an A/B of preftune against itself (preftune,preftune-compile): no TRL run
            print(f"[bench] note: no {peer_of(n)} run; {n}'s losses are not compared with TRL's")
    rec = header(args)
    rates = [matmul(args, bf16=True in precisions)]
    specs = []
    for rep in range(args.repeats):
        for bf16 in precisions:
            for n in names:
                spec = {
                    **base_spec(args),
                    **{k: v for k, v in VARIANTS[n].items() if k != "peer"},
                    "model": model,
                    "data": data,
                    "num_train": args.steps
                    * 8,  # one pass: the precompute covers what is trained on
                    "batch_size": 8,
                    "steps": args.steps,
                    "bf16": bf16,
                }
                specs.append((f"{n}/{'bf16' if bf16 else 'fp32'}/{rep}", spec))
    raw = run_many(specs, args)
    rates.append(matmul(args, bf16=True in precisions))
    fp32_rates = [x for r in rates for x in r["fp32"]]
    bf16_rates = [x for r in rates for x in r.get("bf16", [])]
    # MFU against the matmul rate of the run's own precision, measured in this invocation
    rate = {"fp32": summary(fp32_rates)["median"]}
    if bf16_rates:
        rate["bf16"] = summary(bf16_rates)["median"]
    pinfo = next((r for r in raw.values() if r.get("ok") and r["tool"] == "preftune"), None)
    runs = {k: derive(v, rate[k.split("/")[1]], pinfo) for k, v in raw.items() if v.get("ok")}
    failed = {
        k: {"error": v["error"], "log_tail": v["log_tail"]}
        for k, v in raw.items()
        if not v.get("ok")
    }

    rows, comparisons = [], {}
    for key, d in runs.items():
        name, prec, rep = key.split("/")
        peer_key = f"{peer_of(name)}/{prec}/{rep}"
        peer = runs.get(peer_key)
        agree = None
        if peer is not None and key != peer_key:
            agree = max_rel_diff(d["losses"], peer["losses"], first=8)
            comparisons[key] = compare(d, peer, peer_key)
            comparisons[key].update(
                {
                    "loss_max_rel_diff_first8": agree,
                    "loss_max_rel_diff_all": max_rel_diff(d["losses"], peer["losses"]),
                    "logps_chosen_max_rel_diff_first8": max_rel_diff(
                        d["logps_chosen"], peer["logps_chosen"], first=8
                    ),
                }
            )
            # the other TRL settings with the same update rule (e.g. TRL's leanest), speed and
            # memory only
            for other in runs if VARIANTS[name]["tool"] != "trl" else []:
                o_name, o_prec, o_rep = other.split("/")
                if (
                    other != peer_key
                    and VARIANTS[o_name]["tool"] == "trl"
                    and (o_prec, o_rep) == (prec, rep)
                    and clips(o_name) == clips(name)
                ):
                    comparisons[f"{key} vs {other}"] = compare(d, runs[other], other)
        rows.append(
            [
                name,
                prec,
                d["steps"],
                d["counted_tokens"],
                f"{d['tokens_per_s']:.1f}",
                "-" if d["tokens_per_cpu_s"] is None else f"{d['tokens_per_cpu_s']:.1f}",
                fmt_range(d["step_time"], digits=2),
                "-" if d["first_step_s"] is None else f"{d['first_step_s']:.2f}",
                f"{d['precompute_s']:.1f}",
                f"{d['peak_rss'] / GB:.2f}",
                f"{100 * d['mfu']:.1f}" if d.get("mfu") is not None else "-",
                "-" if agree is None else f"{agree:.1e}",
            ]
        )
    print(
        f"\n{workload.upper()}: {title}, batch 8 pairs, max length 512, DPO sigmoid β 0.1, "
        f"AdamW lr 5e-7, {args.threads} threads; 2048³ fp32 matmul "
        f"{fmt_range(summary(fp32_rates))} GFLOP/s"
        + (f", bf16 {fmt_range(summary(bf16_rates))} GFLOP/s" if bf16_rates else "")
    )
    print_table(
        [
            "variant",
            "prec",
            "steps",
            "tokens",
            "tokens/s (end to end)",
            "tokens/CPU-s",
            "s/step median (min–max)",
            "first step s",
            "precompute s",
            "peak RSS GB",
            "MFU %",
            "loss rel diff vs peer (first 8)",
        ],
        rows,
    )
    for key, c in comparisons.items():
        print(
            f"{key.split(' vs ')[0]} vs {c['peer']}: tokens/s x{c['tokens_per_s_ratio']:.2f}, median step x{c['step_time_ratio']:.2f}, "
            f"tokens/CPU-s x{c['tokens_per_cpu_s_ratio'] or float('nan'):.2f}, "
            f"peak RSS x{c['peak_rss_ratio']:.2f}"
        )
    rec.update(
        {
            "workload": workload,
            "steps": args.steps,
            "matmul_fp32_gflops": summary(fp32_rates),
            "matmul_bf16_gflops": summary(bf16_rates) if bf16_rates else None,
            "params": pinfo
            and {k: pinfo[k] for k in ("params", "layers", "attn_width", "vocab_size")},
            "runs": runs,
            "comparisons": comparisons,
            "failed": failed,
        }
    )
    append_result(rec)


# ---- micro-benchmarks behind the proposed core changes ------------------------------------------
def micro(args) -> None:
    model = args.model or default_model()
    rec = header(args)
    layouts, optims = {}, {}
    for data in args.micro_data.split(","):
        print(f"[bench] layouts on {data} ...", flush=True)
        r = run_worker(
            {
                "tool": "layouts",
                "threads": args.threads,
                "model": model,
                "data": data,
                "pairs": 8,
                "caps": [128, 256],
            },
            omp_wait_policy=args.omp_wait_policy,
        )
        if not r["ok"]:
            print(r["log_tail"])
            continue
        layouts[data] = r["layouts"]
    for variant in ("default", "foreach", "fused"):
        print(f"[bench] AdamW {variant} ...", flush=True)
        r = run_worker(
            {"tool": "optim", "threads": args.threads, "model": model, "variant": variant},
            omp_wait_policy=args.omp_wait_policy,
        )
        if r["ok"]:
            optims[variant] = {"step_s": r["step_s"], "rss_added": r["peak_rss"] - r["rss_before"]}
    rows = []
    for data, lay in layouts.items():
        for name, d in lay.items():
            rows.append(
                [
                    data,
                    name,
                    "x".join(map(str, d["rows_x_width"]))
                    + (f" + prefix {d['prefix']}" if d.get("prefix") else ""),
                    d["real_tokens"],
                    fmt_range({**d["fwd_bwd_s"], "n": 3}, digits=2),
                    f"{d['max_abs_logp_diff_vs_padded']:.1e}",
                ]
            )
    print(
        "\nLayouts: one batch of 8 pairs, forward + backward of preftune.logps.sequence_logps, SmolLM2-135M fp32"
    )
    print_table(
        [
            "data",
            "layout",
            "rows x width",
            "tokens run",
            "s median (min–max)",
            "max |Δ logp| vs padded",
        ],
        rows,
    )
    print("\nAdamW step over 135M parameters:")
    print_table(
        ["implementation", "s median (min–max)", "RSS added by the step GB"],
        [
            [k, fmt_range({**v["step_s"], "n": 3}, digits=2), f"{v['rss_added'] / GB:.2f}"]
            for k, v in optims.items()
        ],
    )
    rec.update({"workload": "micro", "layouts": layouts, "optimizer": optims})
    append_result(rec)


def matmul_cmd(args) -> None:
    r = matmul(args, bf16=True)
    print(
        f"2048³ matmul, {args.threads} threads: fp32 {fmt_range(summary(r['fp32']))} GFLOP/s, bf16 {fmt_range(summary(r['bf16']))} GFLOP/s"
    )
    append_result(
        {
            **header(args),
            "workload": "matmul",
            "fp32": summary(r["fp32"]),
            "bf16": summary(r["bf16"]),
        }
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("workload", choices=["w1", "w2", "w3", "w4", "w6", "micro", "matmul"])
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per run (W1 default 32 = one pass of 256 pairs)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads per run (BENCHMARK.md: 2)")
    p.add_argument(
        "--glibc-default-allocator",
        action="store_true",
        help="run every tool with glibc's default malloc settings instead of preftune's "
        "keep_freed_memory (which the harness gives TRL too)",
    )
    p.add_argument(
        "--omp-wait-policy",
        default="",
        help="OMP_WAIT_POLICY for every run (default: unset, what users of both tools get; "
        "PASSIVE protects two threads from a busy partner core on a shared host, but costs "
        "every wake-up: docs/benchmarks.md)",
    )
    p.add_argument(
        "--model", default=None, help="W1/W4 model directory (default: the embedded default)"
    )
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "both"])
    p.add_argument("--variants", default="preftune,trl", help=f"W1 variants: {', '.join(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--matmul-reps",
        type=int,
        default=5,
        help="timed 2048³ matmuls per probe (a bf16 one takes ~90 s on a CPU without bf16 units)",
    )
    p.add_argument(
        "--micro-data",
        default="arithmetic_onpolicy",
        help="micro: bundled sets and/or 'spread' (synthetic, wide length spread; its one-row "
        "packed layouts need ~11 GB)",
    )
    p.add_argument("--tools", default="preftune,trl", help="W2/W3 tools")
    p.add_argument("--lengths", default="128,512,1024,2048")
    p.add_argument("--budget", type=int, default=4096, help="W2 completion tokens per batch")
    p.add_argument("--vocabs", default="32000,128000,256000")
    p.add_argument(
        "--chunk-budget",
        type=int,
        default=0,
        help="W3: also run preftune with an explicit chunk_size = budget // vocab (the default already keeps 2^25 logits per chunk)",
    )
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = {"w1": 32, "w2": 2, "w3": 2, "w4": 4, "w6": 16, "micro": 0, "matmul": 0}[
            args.workload
        ]
    {"w1": w1, "w2": w2, "w3": w3, "w4": w4, "w6": w6, "micro": micro, "matmul": matmul_cmd}[
        args.workload
    ](args)


if __name__ == "__main__":
    main()
