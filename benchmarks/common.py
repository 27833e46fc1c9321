"""Shared pieces of the benchmark harness: the matmul roofline, running one tool in its own
process while sampling its memory, the FLOP model, statistics and the results file.

Everything here runs in the parent process (`run.py`); the tools themselves run in `worker.py`
subprocesses so that each one's peak resident set is its own.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.jsonl"


# ---- the roofline ------------------------------------------------------------------------------
def matmul_rate(n: int = 2048, dtype: torch.dtype = torch.float32, reps: int = 5) -> list[float]:
    """GFLOP/s of an n x n x n matmul (2 n^3 FLOPs), one figure per repetition, after a warm-up."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
    return rates


# ---- one tool in its own process ---------------------------------------------------------------
class TreeSampler:
    """Peak resident set of a process and its children, sampled every `interval` seconds.

    Sampling misses spikes shorter than the interval; the worker also reports its own
    ru_maxrss (the kernel's exact high-water mark), and the larger of the two is used.
    """

    def __init__(self, pid: int, interval: float = 0.25):
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak_total = 0  # sum over the tree at one instant (what a multi-process run holds)
        self.peak_single = 0  # the largest single process
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
                if rss:
                    self.peak_total = max(self.peak_total, sum(rss))
                    self.peak_single = max(self.peak_single, max(rss))
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def run_worker(
    spec: dict,
    launcher: list[str] | None = None,
    timeout: float = 7200,
    omp_wait_policy: str | None = None,
    extra_env: dict | None = None,
    script: str = "worker.py",
) -> dict:
    """Run `script` (`worker.py`, or W5's `online_worker.py`) on `spec` in a fresh process
    (optionally under `launcher`, e.g. accelerate launch) and return its result, with the
    sampled peak RSS of the process tree added."""
    work = Path(tempfile.mkdtemp(prefix="preftune-bench-"))
    spec = {**spec, "workdir": str(work)}
    spec_path, out_path = work / "spec.json", work / "result.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [*(launcher or [sys.executable]), str(HERE / script), str(spec_path), str(out_path)]
    env = {
        **os.environ,
        # a fresh cache per run: no reference log-probs reused from an earlier run, either tool
        "PREFTUNE_CACHE": str(work / "cache"),
        "HF_DATASETS_CACHE": str(work / "hf_datasets"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
    }
    if omp_wait_policy:
        # PASSIVE: OpenMP threads sleep at barriers instead of spinning (safer on a busy shared
        # host, slower per parallel region; benchmarks/README.md "Threads")
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    env.update(extra_env or {})
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    with TreeSampler(proc.pid) as sampler:
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out_path.exists():
        tail = "\n".join(log.splitlines()[-40:])
        return {
            "ok": False,
            "error": f"exit code {proc.returncode}",
            "log_tail": tail,
            "spec": spec,
        }
    result = json.loads(out_path.read_text())
    result.update(
        {
            "ok": True,
            "process_wall_s": wall,
            "sampled_peak_rss_tree": sampler.peak_total,
            "sampled_peak_rss_single": sampler.peak_single,
        }
    )
    result["peak_rss"] = max(result.get("ru_maxrss", 0), sampler.peak_single)
    _cleanup(work)
    return result


def _cleanup(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ---- the FLOP model ------------------------------------------------------------------------------
def model_flops(
    params: int,
    layers: int,
    attn_width: int,
    counted_tokens: int,
    seq_lengths: list[int],
    reference_passes: int = 1,
) -> float:
    """Model FLOPs of one pass over the data (BENCHMARK.md): 6·P per counted token for the policy's
    forward + backward, 2·P per counted token for each reference forward, plus attention.

    `params` counts every matmul weight once (a tied embedding counts once, as the LM head).
    Attention (PaLM convention, no causal discount): a sequence of n tokens costs 4·L·d·n²
    in a forward (QKᵀ and AV), three times that in forward + backward; `seq_lengths` lists every
    sequence actually fed to the model (the prompt appears in both the chosen and rejected one).
    Counted tokens are the real tokens of prompt + chosen + rejected (the prompt counted once).
    """
    dense = (6 + 2 * reference_passes) * params * counted_tokens
    attn = (12 + 4 * reference_passes) * layers * attn_width * sum(n * n for n in seq_lengths)
    return float(dense + attn)


# ---- statistics and output ---------------------------------------------------------------------------
def summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def fmt_range(s: dict, scale: float = 1.0, digits: int = 1) -> str:
    if s.get("median") is None:
        return "-"
    m, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    if s["n"] == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def machine() -> dict:
    import psutil
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(
            (ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")),
            "",
        )
        isa = sorted({f for f in flags.split() if f.startswith(("avx", "amx"))})
    except OSError:
        isa = []
    info = {
        "cpu": cpu,
        "isa": isa,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    return info


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def append_result(record: dict, path: Path = RESULTS) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
