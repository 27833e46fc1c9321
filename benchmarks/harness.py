"""What the workloads of run.py and scaling.py share: the W1/W6 variants, a run's spec, the 2048³
matmul probe that MFU is divided by, the figures derived from a worker's result, and running and
comparing variants. Imported by run.py and scaling.py (run.py puts benchmarks/ on sys.path)."""

from __future__ import annotations

import sys
import time

from common import (
    git_commit,
    machine,
    model_flops,
    run_worker,
    summary,
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


def clips(name: str) -> bool:
    return VARIANTS[name].get("max_grad_norm", 1.0) != 0.0


def peer_of(name: str) -> str:
    """The variant whose losses a variant's must match (the same update rule): TRL's, or for a
    preftune variant that changes only how the step runs (compile), plain preftune's."""
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


def compare(d: dict, peer: dict, peer_key: str) -> dict:
    """A run's speed and memory as ratios to its peer's (a TRL run, or plain preftune)."""
    return {
        "peer": peer_key,
        "tokens_per_s_ratio": d["tokens_per_s"] / peer["tokens_per_s"],
        "step_time_ratio": peer["step_time"]["median"] / d["step_time"]["median"],
        "tokens_per_cpu_s_ratio": d["tokens_per_cpu_s"] / peer["tokens_per_cpu_s"]
        if d["tokens_per_cpu_s"] and peer["tokens_per_cpu_s"]
        else None,
        "peak_rss_ratio": d["peak_rss"] / peer["peak_rss"],
    }
