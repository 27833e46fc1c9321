"""W2 (completion length at a fixed token budget), W3 (vocabulary size) and W4 (one process
against two, under each engine): the workloads that scale one thing. Run through run.py
(`python benchmarks/run.py w2|w3|w4`), which puts benchmarks/ on sys.path."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

from common import HERE as BENCH
from common import (
    append_result,
    fmt_range,
    print_table,
    run_worker,
    summary,
)
from harness import (
    GB,
    base_spec,
    derive,
    header,
    matmul,
    max_rel_diff,
    run_many,
)
from workloads import (
    W1_DATA,
    W2_MODEL,
    W3_MODEL,
    default_model,
    random_model_dir,
    synthetic_pairs,
    write_jsonl,
)

# ---- W2 / W3: synthetic lengths and vocabularies --------------------------------------------------
# the columns of W2's and W3's tables after the one that names the case
SYNTHETIC_COLUMNS = (
    "tool",
    "tokens/step",
    "tokens/s (end to end)",
    "tokens/s (steps)",
    "s/step median (min–max)",
    "peak RSS GB",
    "peak − after-load GB",
)


def _synthetic_runs(args, cases: list[dict], tools: list[str], workload: str) -> dict:
    """cases: dicts with name, vocab, model (shape), pairs, prompt_len, completion_len, extra."""
    from preftune.models import load_tokenizer

    tok = load_tokenizer(default_model())
    tmp = Path(tempfile.mkdtemp(prefix=f"preftune-{workload}-"))
    specs = []
    try:
        for case in cases:
            mdir = tmp / f"model-{case['vocab']}"
            if not mdir.exists():
                random_model_dir(mdir, case["vocab"], **case["model"])
            n = case["pairs"] * args.steps
            recs = synthetic_pairs(
                tok, n, case["prompt_len"], case["completion_len"], max_id=min(case["vocab"], 32000)
            )
            data = write_jsonl(recs, tmp / f"{case['name']}.jsonl")
            for tool in tools:
                spec = {
                    **base_spec(args),
                    "tool": tool,
                    "model": str(mdir),
                    "data": str(data),
                    "num_train": n,
                    "batch_size": case["pairs"],
                    "steps": args.steps,
                    "bf16": False,
                    "max_length": case["prompt_len"] + case["completion_len"] + 8,
                    "max_prompt_length": case["prompt_len"] + 8,
                    **case.get("extra", {}),
                    **(
                        {"gradient_checkpointing": False, "trl_precompute": True}
                        if tool == "trl"
                        else {}
                    ),
                }
                label = case.get("label", tool)
                specs.append((f"{case['name']}/{label}", spec))
        raw = run_many(specs, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return raw


def _synthetic_table(raw: dict, rate: float) -> tuple[list, dict]:
    rows, runs = [], {}
    for key, r in raw.items():
        if not r.get("ok"):
            rows.append([*key.split("/"), "FAILED", "", "", "", "", ""])
            continue
        d = derive(r, rate, r if r["tool"] == "preftune" else None)
        # model state that any AdamW full fine-tune holds: weights + grads + 2 moments, fp32
        state = 16 * r.get("params", 0) if r["tool"] == "preftune" else None
        d["model_state_bytes"] = state
        runs[key] = d
        case, label = key.split("/")
        rows.append(
            [
                case,
                label,
                d["counted_tokens"] // d["steps"],
                f"{d['tokens_per_s']:.0f}",
                f"{d['step_tokens_per_s']:.0f}",
                fmt_range(d["step_time"], digits=2),
                f"{d['peak_rss'] / GB:.2f}",
                f"{(d['peak_rss'] - d['rss_after_init']) / GB:.2f}",
            ]
        )
    return rows, runs


def w2(args) -> None:
    lengths = [int(x) for x in args.lengths.split(",")]
    cases = []
    for L in lengths:
        pairs = max(1, args.budget // (2 * L))
        cases.append(
            {
                "name": f"L{L}",
                "vocab": 49152,
                "model": W2_MODEL,
                "pairs": pairs,
                "prompt_len": 64,
                "completion_len": L,
            }
        )
    rec = header(args)
    rates = [matmul(args)]
    raw = _synthetic_runs(args, cases, args.tools.split(","), "w2")
    rates.append(matmul(args))
    fp32 = [x for r in rates for x in r["fp32"]]
    rate = summary(fp32)["median"]
    rows, runs = _synthetic_table(raw, rate)
    print(
        f"\nW2: random Llama {W2_MODEL}, vocab 49152, prompt 64 tokens, {args.budget} completion tokens "
        f"per batch, {args.steps} steps, fp32, {args.threads} threads; matmul {fmt_range(summary(fp32))} GFLOP/s"
    )
    print_table(["length", *SYNTHETIC_COLUMNS], rows)
    ratios = {}
    for tool in args.tools.split(","):
        base = runs.get(f"L{lengths[0]}/{tool}")
        for L in lengths:
            d = runs.get(f"L{L}/{tool}")
            if base and d:
                ratios[f"{tool}/L{L}"] = d["tokens_per_s"] / base["tokens_per_s"]
    for L in lengths:
        p, t = runs.get(f"L{L}/preftune"), runs.get(f"L{L}/trl")
        if p and t:
            ratios[f"preftune_vs_trl/L{L}"] = p["tokens_per_s"] / t["tokens_per_s"]
    print("tokens/s relative to the shortest length, and preftune / TRL:")
    for k, v in ratios.items():
        print(f"  {k}: x{v:.2f}")
    rec.update(
        {
            "workload": "w2",
            "steps": args.steps,
            "budget_completion_tokens": args.budget,
            "model": W2_MODEL,
            "matmul_fp32_gflops": summary(fp32),
            "runs": runs,
            "ratios": ratios,
        }
    )
    append_result(rec)


def w3(args) -> None:
    vocabs = [int(x) for x in args.vocabs.split(",")]
    cases = []
    for V in vocabs:
        base = {
            "name": f"V{V // 1000}k",
            "vocab": V,
            "model": W3_MODEL,
            "pairs": 8,
            "prompt_len": 32,
            "completion_len": 128,
        }
        cases.append(base)
        if args.chunk_budget:
            # the proposed core change, emulated by configuration: a fixed logit budget per chunk
            chunk = max(16, args.chunk_budget // V)
            cases.append(
                {**base, "label": f"preftune-chunk{chunk}", "extra": {"chunk_size": chunk}}
            )
    rec = header(args)
    rates = [matmul(args)]
    tools = args.tools.split(",")
    plain = [c for c in cases if "label" not in c]
    chunked = [c for c in cases if "label" in c]
    raw = _synthetic_runs(args, plain, tools, "w3")
    if chunked and "preftune" in tools:
        raw.update(_synthetic_runs(args, chunked, ["preftune"], "w3"))
    rates.append(matmul(args))
    fp32 = [x for r in rates for x in r["fp32"]]
    rows, runs = _synthetic_table(raw, summary(fp32)["median"])
    print(
        f"\nW3: random Llama {W3_MODEL}, 8 pairs x (prompt 32 + 2 x 128) tokens per batch, "
        f"{args.steps} steps, fp32, {args.threads} threads"
    )
    print_table(["vocab", *SYNTHETIC_COLUMNS], rows)
    growth = {}
    labels = sorted({k.split("/")[1] for k in runs})
    for label in labels:
        series = [(k, v) for k, v in runs.items() if k.endswith("/" + label)]
        if len(series) >= 2:
            (k0, first), (k1, last) = series[0], series[-1]
            # None when the smaller run peaked while loading (nothing above after-load)
            base = first["peak_rss"] - first["rss_after_init"]
            growth[label] = {
                "peak_rss_ratio": last["peak_rss"] / first["peak_rss"],
                "working_ratio": (last["peak_rss"] - last["rss_after_init"]) / base
                if base > 0
                else None,
                "from": k0,
                "to": k1,
            }
    for label, g in growth.items():
        working = (
            f"x{g['working_ratio']:.2f}" if g["working_ratio"] is not None else "n/a (peak at load)"
        )
        print(
            f"  {label}: peak RSS x{g['peak_rss_ratio']:.2f}, peak above after-load {working} "
            f"({g['from']} -> {g['to']})"
        )
    rec.update(
        {
            "workload": "w3",
            "steps": args.steps,
            "model": W3_MODEL,
            "matmul_fp32_gflops": summary(fp32),
            "runs": runs,
            "growth": growth,
        }
    )
    append_result(rec)


# ---- W4: one process vs two gloo processes -------------------------------------------------------
# `accelerate launch --cpu --num_processes 2` starts ONE process on CPU (its simple launcher
# ignores num_processes without an MPI hostfile), and torchrun alone gives two processes that each
# believe they are alone. torchrun + ACCELERATE_USE_CPU=true makes accelerate build a MULTI_CPU
# state over gloo: the layout DESIGN.md names. Each env is what `accelerate launch --config_file
# examples/accelerate/<name>_cpu.yaml` sets (DeepSpeed: without use_cpu, which drops it).
W4_LAUNCHES = {
    "2 processes": {"ACCELERATE_USE_CPU": "true"},
    "2 processes, FSDP2": {
        "ACCELERATE_USE_CPU": "true",
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
    },
    "2 processes, ZeRO-2": {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
    },
    "2 processes, ZeRO-3": {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
    },
}


def _w4_runs(args, spec: dict) -> dict:
    """{layout: worker result}: one process, then each 2-process launch of W4_LAUNCHES (the
    DeepSpeed ones only where deepspeed is installed)."""
    print("[bench] w4: 1 process ...", flush=True)
    results = {
        "1 process": run_worker(
            {**spec, "threads": args.threads}, omp_wait_policy=args.omp_wait_policy
        )
    }
    per_proc = max(1, args.threads // 2)
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    for name, env in W4_LAUNCHES.items():
        deepspeed = env.get("ACCELERATE_USE_DEEPSPEED") == "true"
        if deepspeed and importlib.util.find_spec("deepspeed") is None:
            print(f"[bench] w4: {name} skipped: deepspeed is not installed", flush=True)
            continue
        print(f"[bench] w4: {name} x {per_proc} thread(s) ...", flush=True)
        results[name] = run_worker(
            {**spec, "threads": per_proc, "num_processes": 2},
            launcher=launcher,
            omp_wait_policy=args.omp_wait_policy,
            extra_env=env,
        )
    return results


def w4(args) -> None:
    steps = args.steps
    spec = {
        **base_spec(args),
        "tool": "preftune",
        "model": args.model or default_model(),
        "data": W1_DATA,
        "num_train": steps * 8,
        "batch_size": 8,
        "steps": steps,
        "bf16": False,
    }
    rec = header(args)
    runs, errors, rows = {}, {}, []
    for name, r in _w4_runs(args, spec).items():
        if not r.get("ok"):
            errors[name] = {"error": r["error"], "log_tail": r["log_tail"]}
            print(f"[bench] {name} FAILED ({r['error']}):\n{r['log_tail']}")
            continue
        d = derive(r, 1.0, None)
        d["num_processes"] = r.get("num_processes")
        d["peak_rss_tree"] = r.get("sampled_peak_rss_tree")
        d["peak_rss_single"] = r.get("sampled_peak_rss_single")
        runs[name] = d
        rows.append(
            [
                name,
                d["num_processes"],
                fmt_range(d["step_time"], digits=2),
                f"{d['step_tokens_per_s']:.1f}",
                f"{d['precompute_s']:.1f}",
                f"{d['peak_rss_single'] / GB:.2f}",
                f"{d['peak_rss_tree'] / GB:.2f}",
                " ".join(f"{x:.6f}" for x in d["losses"]),
            ]
        )
    agree = {
        name: max_rel_diff(runs[name]["losses"], runs["1 process"]["losses"])
        for name in runs
        if name != "1 process" and "1 process" in runs
    }
    print(
        f"\nW4: preftune, SmolLM2-135M, global batch 8 pairs, {steps} steps, fp32, {args.threads} cores in all"
    )
    headers = ["layout", "procs", "s/step median (min–max)", "tokens/s (steps)", "precompute s"]
    headers += ["peak RSS GB (largest proc)", "peak RSS GB (all procs)", "losses"]
    print_table(headers, rows)
    for name, diff in agree.items():
        print(f"max relative loss difference, {name} vs 1: {diff:.1e}")
    rec.update(
        {
            "workload": "w4",
            "steps": steps,
            "bench_dir": str(BENCH),
            "runs": runs,
            "loss_max_rel_diff": agree,
            "failed": errors,
        }
    )
    append_result(rec)
