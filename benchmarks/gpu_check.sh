#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one script (issue 16). NOT YET RUN: no GPU machine was
# available when it was written; it is correct by reading only. Under 10 minutes on one GPU.
#   bash benchmarks/gpu_check.sh            # results in benchmarks/gpu_results/
# 1. the fast paths and layouts on CUDA: training on the GPU (accelerate places the model there)
#    must give the CPU's per-step losses, fp32 and bf16 autocast, each layout on and off;
# 2. W1 against TRL (benchmarks/run.py w1 appends its JSON line to benchmarks/results.jsonl).
#    Both tools run on the GPU (the TRL worker sets use_cpu only where CUDA is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/gpu_results
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__)"

# 1. same losses on CUDA as on CPU (tiny model, float32; bf16 within its own tolerance)
timeout 300 python - <<'PY' | tee "$out/layouts.txt"
import json, os, pathlib, tempfile
import torch
from preftune.models import save_tiny_model_dir
from preftune import train

tmp = pathlib.Path(tempfile.mkdtemp())
tiny = save_tiny_model_dir(tmp / "model", seed=0)
base = dict(model=str(tiny), data="arithmetic_edit", output_dir=str(tmp), num_train=32,
            num_eval=4, batch_size=8, max_steps=3, num_task_eval=0, eval_before=False,
            quiet=True, report_to="none", lr=1e-3)
def losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "grad_norm" in r]
layouts = {"default": {}, "no_sharing": dict(share_prompt="false", share_prefix=False,
           share_completion_prefix=False), "packed": dict(packed=True)}
failed = []
for name, extra in layouts.items():
    for bf16, tol in ((False, 1e-4), (True, 3e-2)):
        cuda = losses(train({**base, **extra, "bf16": bf16, "run_name": f"{name}-{bf16}-cuda"}).run_dir)
        os.environ["ACCELERATE_USE_CPU"] = "true"
        cpu = losses(train({**base, **extra, "bf16": bf16, "run_name": f"{name}-{bf16}-cpu"}).run_dir)
        del os.environ["ACCELERATE_USE_CPU"]
        worst = max(abs(a - b) / abs(b) for a, b in zip(cuda, cpu))
        ok = worst <= tol
        print(f"{name:12s} bf16={bf16!s:5s} cuda {cuda} cpu {cpu} rel {worst:.2e} tol {tol} {'ok' if ok else 'FAIL'}")
        failed += [] if ok else [f"{name} bf16={bf16}"]
assert not failed, failed
PY

# 2. W1 against TRL on the GPU (both tools in one invocation, as BENCHMARK.md asks)
timeout 420 python benchmarks/run.py w1 --steps 8 | tee "$out/w1.txt"
echo "gpu_check: done; quote $out/*.txt and the last line of benchmarks/results.jsonl"
