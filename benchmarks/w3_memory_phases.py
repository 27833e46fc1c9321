"""Resident memory through W3's phases, to see where a vocabulary's peak comes from.

    python benchmarks/w3_memory_phases.py [--vocabs 32000,256000]

For each vocabulary: W3's random 2-layer model (built in a child process, so its construction
leaves nothing in this one's heap), 16 synthetic pairs, preftune's Trainer with W3's settings,
then two training steps. A thread samples the resident set (/proc/self/statm) every 2 ms and
keeps the largest value seen in each phase: model load + precompute, each step's forward and
backward, each optimizer step. The numbers are this process's, one run each; a phase's figure
minus the one before is what that phase added (model state: V x H x 4 bytes per copy).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import (  # noqa: E402
    default_model,
    dpo_config,
    random_model_dir,
    synthetic_pairs,
    write_jsonl,
)


def _resident_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e9


class PhaseSampler:
    def __init__(self):
        self.phase, self.peaks = "start", {}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            r = _resident_gb()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), r)
            time.sleep(0.002)

    def enter(self, phase: str):
        time.sleep(0.01)  # let the sampler see the end of the previous phase
        self.phase = phase


def probe(vocab: int, work: Path) -> dict[str, float]:
    import torch

    from preftune.models import load_tokenizer
    from preftune.train.trainer import Trainer

    torch.set_num_threads(2)
    sampler = PhaseSampler()
    mdir = work / f"model-{vocab}"
    subprocess.run(
        [sys.executable, __file__, "--build", str(mdir), str(vocab)], check=True
    )  # a child process: the construction's memory is not this process's
    tok = load_tokenizer(default_model())
    data = write_jsonl(
        synthetic_pairs(tok, 16, 32, 128, max_id=min(vocab, 32000)), work / "d.jsonl"
    )
    cfg = dpo_config(
        str(mdir), str(data), 16, 2, work / "runs", "probe", max_length=168, max_prompt_length=40
    )
    sampler.enter("imports and data")
    sampler.enter("load + precompute")
    trainer = Trainer(cfg)
    step = trainer.optimizer.step

    def timed_step(*args, **kwargs):
        sampler.enter(f"step {trainer.step}: optimizer")
        return step(*args, **kwargs)

    trainer.optimizer.step = timed_step
    for i, batch in enumerate([list(range(8)), list(range(8, 16))]):
        sampler.enter(f"step {i}: forward + backward")
        trainer.train_step(batch)
        trainer.step += 1
    sampler.enter("end")
    return {k: v for k, v in sampler.peaks.items() if k not in ("start", "end")}


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--build":
        random_model_dir(Path(sys.argv[2]), int(sys.argv[3]), 128, 256, 2, 2, 2)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocabs", default="32000,256000")
    args = ap.parse_args(argv)
    for vocab in (int(v) for v in args.vocabs.split(",")):
        # one process per vocabulary, as in W3: each starts from an empty heap
        if len(args.vocabs.split(",")) > 1:
            subprocess.run([sys.executable, __file__, "--vocabs", str(vocab)], check=True)
            continue
        with tempfile.TemporaryDirectory() as work:
            peaks = probe(vocab, Path(work))
        state = vocab * 128 * 4 / 1e9  # one V x H fp32 copy (the layers add ~0.6 MB)
        print(f"vocab {vocab}: one V x H copy = {state:.3f} GB")
        prev = 0.0
        for phase, gb in peaks.items():
            print(f"  {phase:28s} peak {gb:.3f} GB  (+{gb - prev:.3f})")
            prev = gb


if __name__ == "__main__":
    main()
