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
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    append_result,
    fmt_range,
    git_commit,
    machine,
    model_flops,
    print_table,
    run_worker,
    summary,
)
from workloads import (  # noqa: E402
    W1_DATA,
    W2_MODEL,
    W3_MODEL,
    conversational_pairs,
    default_model,
    random_model_dir,
    synthetic_pairs,
    write_jsonl,
)

GB = 1e9

# W1 variants. The headline pair is `preftune` (its defaults: reference=auto, which precomputes
# for DPO, shared prompt and prefix, one pair per row, glibc keeping freed memory) against `trl`
# (DPOTrainer at its fastest honest setting on this machine: precompute_ref_log_probs, no
# gradient checkpointing, the same allocator setting). The others explain the numbers.
VARIANTS = {
    "preftune": {"tool": "preftune"},
    "preftune-packed": {"tool": "preftune", "packed": True},  # all pairs in one masked row
    "preftune-unshared": {"tool": "preftune", "share_prompt": False},  # prompt run twice, as TRL
    "preftune-noprefix": {"tool": "preftune", "share_prefix": False},  # chat head run per row
    # chosen and rejected laid out from the prompt on, their common leading tokens twice
    "preftune-nocompletionprefix": {"tool": "preftune", "share_completion_prefix": False},
    "preftune-malloc": {"tool": "preftune", "keep_freed_memory": False},  # glibc's default
    "preftune-gc": {"tool": "preftune", "gradient_checkpointing": True},
    # matmul outputs kept, the cheap ops recomputed (preftune/activations.py)
    "preftune-sac": {"tool": "preftune", "gradient_checkpointing": "selective"},
    # long pairs as before the varlen row and fitted rows: one padded row per prompt group
    "preftune-padded": {"tool": "preftune", "padded_layouts": True},
    # decoder layers compiled by torch.compile (preftune/compiling.py); compilation is in the
    # precompute (no-grad graphs) and the first step (training graphs); its losses are compared
    # with plain preftune's (the same computation, fused)
    "preftune-compile": {"tool": "preftune", "compile": True, "peer": "preftune"},
    # the memory-lean setting: activations recomputed, each parameter updated and its gradient
    # freed inside backward, so no clipping; compared with TRL without clipping (same updates)
    "preftune-lean": {
        "tool": "preftune",
        "gradient_checkpointing": True,
        "optimizer_in_backward": True,
        "max_grad_norm": 0.0,
        "peer": "trl-noclip",
    },
    "trl": {"tool": "trl", "trl_precompute": True, "gradient_checkpointing": False},
    "trl-malloc": {"tool": "trl", "trl_precompute": True, "keep_freed_memory": False},
    "trl-gc": {"tool": "trl", "trl_precompute": True, "gradient_checkpointing": True},
    "trl-live": {"tool": "trl", "trl_precompute": False, "gradient_checkpointing": False},
    "trl-noclip": {"tool": "trl", "trl_precompute": True, "max_grad_norm": 0.0},
    # TRL's leanest unclipped setting, for the memory side of preftune-lean
    "trl-gc-noclip": {
        "tool": "trl",
        "trl_precompute": True,
        "gradient_checkpointing": True,
        "max_grad_norm": 0.0,
    },
}


def _clips(name: str) -> bool:
    return VARIANTS[name].get("max_grad_norm", 1.0) != 0.0


def _peer(name: str) -> str:
    """The TRL variant whose losses a variant's must match (the same update rule)."""
    return VARIANTS[name].get("peer", "trl")


def base_spec(args) -> dict:
    return {
        "threads": args.threads,
        "seed": 0,
        "lr": 5e-7,
        "beta": 0.1,
        "max_length": 512,
        "max_prompt_length": 256,
        # both tools; a W1 variant's own setting (preftune-malloc, trl-malloc) wins
        "keep_freed_memory": not args.glibc_default_allocator,
    }


def matmul(args, bf16: bool = False) -> dict:
    r = run_worker(
        {"tool": "matmul", "threads": args.threads, "bf16": bf16, "reps": args.matmul_reps},
        omp_wait_policy=args.omp_wait_policy,
    )
    if not r["ok"]:
        raise SystemExit(f"matmul probe failed:\n{r['log_tail']}")
    return r


def command_line() -> str:
    return "python benchmarks/run.py " + " ".join(sys.argv[1:])


def header(args) -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command_line(),
        "commit": git_commit(),
        "machine": machine(),
        "threads": args.threads,
        "omp_wait_policy": args.omp_wait_policy,
        "keep_freed_memory": not args.glibc_default_allocator,
    }


def derive(run: dict, rate_gflops: float, params_info: dict | None) -> dict:
    """Per-run figures: tokens/s end to end (precompute included), per-step times, peak RSS, MFU."""
    steps = run["steps"]
    out = {
        "tool": run["tool"],
        "reference": run.get("reference_mode"),
        "steps": len(steps),
        "counted_tokens": run["counted_tokens"],
        "timed_s": run["timed_s"],
        "precompute_s": run["precompute_s"],
        "train_s": run["train_s"],
        "load_s": run.get("load_s"),
        "tokens_per_s": run["counted_tokens"] / run["timed_s"],
        # CPU seconds of the process (all threads) over the timed region: less sensitive than wall
        # time to other jobs taking the cores, though not immune (caches, memory bandwidth)
        "timed_cpu_s": run.get("timed_cpu_s"),
        "tokens_per_cpu_s": run["counted_tokens"] / run["timed_cpu_s"]
        if run.get("timed_cpu_s")
        else None,
        "step_time": summary([s["step_time"] for s in steps]),
        # the first step pays what runs once: torch.compile's training graphs (preftune-compile)
        "first_step_s": steps[0]["step_time"] if steps else None,
        "step_tokens_per_s": run["counted_tokens"] / run["train_s"],
        "peak_rss": run["peak_rss"],
        "rss_after_init": run.get("rss_after_init"),
        "rss_after_import": run.get("rss_after_import"),
        "losses": [s["loss"] for s in steps],
        "logps_chosen": [s["logps_chosen"] for s in steps],
        "threads_seen": run.get("threads"),
        "optim": run.get("optim"),
    }
    if params_info:
        flops = model_flops(
            params_info["params"],
            params_info["layers"],
            params_info["attn_width"],
            run["counted_tokens"],
            run["seq_lengths"],
            reference_passes=1,
        )
        out["model_flops"] = flops
        out["mfu"] = flops / run["timed_s"] / (rate_gflops * 1e9)
    return out


def max_rel_diff(a: list[float], b: list[float], first: int | None = None) -> float | None:
    pairs = list(zip(a, b))[:first]
    if not pairs or any(x is None or y is None for x, y in pairs):
        return None
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in pairs)


def run_many(specs: list[tuple[str, dict]], args) -> dict[str, dict]:
    results = {}
    for name, spec in specs:
        print(f"[bench] {name} ...", flush=True)
        t = time.perf_counter()
        r = run_worker(spec, omp_wait_policy=args.omp_wait_policy)
        if not r["ok"]:
            print(f"[bench] {name} FAILED ({r['error']}):\n{r['log_tail']}", flush=True)
        else:
            print(
                f"[bench] {name}: {r['counted_tokens'] / r['timed_s']:.1f} tok/s, "
                f"peak RSS {r['peak_rss'] / GB:.2f} GB ({time.perf_counter() - t:.0f}s)",
                flush=True,
            )
        results[name] = r
    return results


# ---- W1 ------------------------------------------------------------------------------------------
def compare(d: dict, peer: dict, peer_key: str) -> dict:
    """A run's speed and memory as ratios to a TRL run's."""
    return {
        "peer": peer_key,
        "tokens_per_s_ratio": d["tokens_per_s"] / peer["tokens_per_s"],
        "step_time_ratio": peer["step_time"]["median"] / d["step_time"]["median"],
        "tokens_per_cpu_s_ratio": d["tokens_per_cpu_s"] / peer["tokens_per_cpu_s"]
        if d["tokens_per_cpu_s"] and peer["tokens_per_cpu_s"]
        else None,
        "peak_rss_ratio": d["peak_rss"] / peer["peak_rss"],
    }


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
        if VARIANTS[n]["tool"] != "trl" and _peer(n) not in names:
            if _peer(n) != "trl" or not any(_peer(m) == n for m in names):
                raise SystemExit(
                    f"variant {n!r} is compared with {_peer(n)!r} (the same update rule); "
                    f"add {_peer(n)} to --variants"
                )
            # an A/B of preftune against itself (preftune,preftune-compile): no TRL run
            print(f"[bench] note: no {_peer(n)} run; {n}'s losses are not compared with TRL's")
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
        peer_key = f"{_peer(name)}/{prec}/{rep}"
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
                    and _clips(o_name) == _clips(name)
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


# ---- W2 / W3: synthetic lengths and vocabularies --------------------------------------------------
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


def _synthetic_table(
    args, raw: dict, rate: float, key_name: str, extra_cols=None
) -> tuple[list, dict]:
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
    rows, runs = _synthetic_table(args, raw, rate, "length")
    print(
        f"\nW2: random Llama {W2_MODEL}, vocab 49152, prompt 64 tokens, {args.budget} completion tokens "
        f"per batch, {args.steps} steps, fp32, {args.threads} threads; matmul {fmt_range(summary(fp32))} GFLOP/s"
    )
    print_table(
        [
            "length",
            "tool",
            "tokens/step",
            "tokens/s (end to end)",
            "tokens/s (steps)",
            "s/step median (min–max)",
            "peak RSS GB",
            "peak − after-load GB",
        ],
        rows,
    )
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
    rows, runs = _synthetic_table(args, raw, summary(fp32)["median"], "vocab")
    print(
        f"\nW3: random Llama {W3_MODEL}, 8 pairs x (prompt 32 + 2 x 128) tokens per batch, "
        f"{args.steps} steps, fp32, {args.threads} threads"
    )
    print_table(
        [
            "vocab",
            "tool",
            "tokens/step",
            "tokens/s (end to end)",
            "tokens/s (steps)",
            "s/step median (min–max)",
            "peak RSS GB",
            "peak − after-load GB",
        ],
        rows,
    )
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
        if "DEEPSPEED" in "".join(env) and importlib.util.find_spec("deepspeed") is None:
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
    from common import HERE as BENCH

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
