"""`compile=true` in-process A/B (docs/benchmarks.md, W6): forward + backward of `sequence_logps`
on W6's first batch (the varlen row), SmolLM2-135M fp32, 2 threads; plain layers first, then the
same weights with their decoder layers compiled (the first compiled repetition compiles).

    PYTHONPATH=. python benchmarks/compile_ab.py
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from micro import w6_batches
    from workloads import (
        batch_order,
        conversational_pairs,
        default_model,
        load_examples,
        write_jsonl,
    )

    from preftune.compiling import compile_decoder_layers
    from preftune.logps import sequence_logps
    from preftune.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(2)
    data = Path(tempfile.mkdtemp()) / "w6.jsonl"
    write_jsonl(conversational_pairs(load_tokenizer(default_model()), 32), data)
    examples, tok = load_examples(str(data), default_model(), 32, 512, 256)
    first = [examples[i] for i in batch_order(len(examples), 8, 0, 1)[0]]
    model = load_causal_lm(default_model()).train()
    batch = w6_batches(model, first, tok.pad_token_id)["varlen"]
    print("row", tuple(batch.input_ids.shape), flush=True)

    def run(tag: str, n: int):
        times = []
        for i in range(n):
            t = time.perf_counter()
            lp = sequence_logps(model, batch)
            lp.sum().backward()
            times.append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
            print(tag, i, round(times[-1], 2), flush=True)
        return times, lp.detach()

    plain, lp0 = run("plain", 3)
    print(compile_decoder_layers(model), flush=True)
    fast, lp1 = run("compiled", 4)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"plain {plain} compiled {fast} max|dlogp| {(lp0 - lp1).abs().max().item():.1e}")
    print(f"peak RSS of the process (both runs) {rss:.2f} GiB")


if __name__ == "__main__":
    main()
