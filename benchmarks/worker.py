"""One tool, one configuration, one process: `python worker.py SPEC.json OUT.json`.

The parent (`run.py`) starts a fresh interpreter per run so that peak resident set, thread
settings and caches belong to that run alone. The timed region is what BENCHMARK.md asks for:
after model load, every reference log-prob computation (the precompute pass) plus the training
steps. Both tools train on the same token ids in the same batch order:

- preftune: its own Trainer, driven step by step exactly as `preftune.train.loop.run` does
  (minus logging to disk, evaluation and saving the final model, which are not training).
- TRL: `DPOTrainer.train()`, given preftune's token ids (a subclass skips TRL's own tokenization
  map) and a sequential sampler over the rows laid out in preftune's batch order.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def run_preftune(spec: dict) -> dict:
    from workloads import batch_order, sequence_lengths

    from preftune.config import build_config
    from preftune.train.trainer import Trainer

    work = Path(spec["workdir"])
    steps, bs = spec["steps"], spec["batch_size"]
    if spec.get("padded_layouts"):  # the layouts before the varlen row and fitted rows
        from preftune.logprob import plan

        plan.LONG_PAIR = float("inf")
    cfg = build_config(
        {
            "model": spec["model"],
            "data": spec["data"],
            "num_train": spec["num_train"],
            "num_eval": 0,
            "num_task_eval": 0,
            "eval_before": False,
            "max_length": spec["max_length"],
            "max_prompt_length": spec["max_prompt_length"],
            "batch_size": bs,
            "grad_accum": spec.get("grad_accum", 1),
            "max_steps": steps,
            "lr": spec["lr"],
            "beta": spec["beta"],
            "optimizer": "adamw",
            "scheduler": "constant",
            "warmup_ratio": 0.0,
            "max_grad_norm": spec.get("max_grad_norm", 1.0),
            "optimizer_in_backward": spec.get("optimizer_in_backward", False),
            "weight_decay": 0.0,
            "loss": "dpo",
            "reference": spec.get("reference", "auto"),
            "packed": spec.get("packed", False),
            "share_prompt": spec.get("share_prompt", "auto"),  # the library default
            "share_prefix": spec.get("share_prefix", True),  # the library default
            "share_completion_prefix": spec.get("share_completion_prefix", True),  # the default
            "bf16": spec["bf16"],
            "chunk_size": spec.get("chunk_size"),  # None: the vocab-aware default
            "gradient_checkpointing": spec.get("gradient_checkpointing", False),
            "compile": spec.get("compile", False),
            "keep_freed_memory": spec.get("keep_freed_memory", True),
            "seed": spec["seed"],
            "quiet": True,
            "report_to": "none",
            "output_dir": str(work / "runs"),
            "run_name": "bench",
        }
    )
    rss_after_import = _maxrss()  # the interpreter with torch, transformers and the tool
    timings = {"precompute_s": 0.0}
    original = Trainer._precompute

    def timed_precompute(self):
        t, c = time.perf_counter(), time.process_time()
        out = original(self)
        timings["precompute_s"] += time.perf_counter() - t
        timings["precompute_cpu_s"] = timings.get("precompute_cpu_s", 0.0) + time.process_time() - c
        return out

    Trainer._precompute = timed_precompute
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    init_s = time.perf_counter() - t0
    rss_after_init = _maxrss()
    batches = batch_order(len(trainer.data.train), bs, spec["seed"], steps)
    records = []
    t1, c1 = time.perf_counter(), time.process_time()
    for batch in batches:  # loop.run's step, without its logging / eval / checkpoint branches
        m = trainer.train_step(batch)
        trainer.step += 1
        records.append(
            {
                "loss": m["loss"],
                "logps_chosen": m.get("logps/chosen"),
                "logps_rejected": m.get("logps/rejected"),
                "grad_norm": m.get("grad_norm"),
                "step_time": m["step_time"],
            }
        )
    train_s = time.perf_counter() - t1
    train_cpu_s = time.process_time() - c1
    counted, seqs = sequence_lengths(trainer.data.train, batches)
    model = trainer.acc.unwrap_model(trainer.policy)
    mc = model.config
    return {
        "tool": "preftune",
        "params": sum(p.numel() for p in model.parameters()),  # a tied embedding counts once
        "layers": mc.num_hidden_layers,
        "attn_width": mc.num_attention_heads
        * (getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads),
        "vocab_size": mc.vocab_size,
        "reference_mode": trainer.reference_mode,
        "num_processes": trainer.acc.num_processes,
        "init_s": init_s,
        "load_s": init_s - timings["precompute_s"],
        "precompute_s": timings["precompute_s"],
        "train_s": train_s,
        "timed_s": timings["precompute_s"] + train_s,
        "timed_cpu_s": timings.get("precompute_cpu_s", 0.0) + train_cpu_s,
        "steps": records,
        "counted_tokens": counted,
        "seq_lengths": seqs,
        "rss_after_init": rss_after_init,
        "rss_after_import": rss_after_import,
    }


def run_trl(spec: dict) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from workloads import batch_order, load_examples, sequence_lengths

    from preftune.allocator import keep_freed_memory

    rss_after_import = _maxrss()  # the interpreter with torch, transformers and the tool
    # the same allocator setting preftune applies to itself (`keep_freed_memory`, on by default)
    # is part of TRL's best honest settings: a TRL user can set it from the environment
    allocator = keep_freed_memory() if spec.get("keep_freed_memory", True) else None
    work = Path(spec["workdir"])
    steps, bs = spec["steps"], spec["batch_size"]
    examples, tok = load_examples(
        spec["data"],
        spec["model"],
        spec["num_train"],
        spec["max_length"],
        spec["max_prompt_length"],
    )
    batches = batch_order(len(examples), bs, spec["seed"], steps)
    rows = [
        {k: examples[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        for batch in batches
        for i in batch
    ]
    timings = {"precompute_s": 0.0}

    class PreTokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer fed preftune's token ids: its tokenization map is skipped, nothing else changes."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t, c = time.perf_counter(), time.process_time()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            timings["precompute_s"] += time.perf_counter() - t
            timings["precompute_cpu_s"] = (
                timings.get("precompute_cpu_s", 0.0) + time.process_time() - c
            )
            return out

    class Recorder(TrainerCallback):
        def __init__(self):
            self.step_times, self.logs = [], []

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_times.append(time.perf_counter() - self._t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

    precompute = spec.get("trl_precompute", True)
    args = DPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=bs // spec.get("num_processes", 1),
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=spec.get("max_grad_norm", 1.0),  # 0.0: no clipping (HF Trainer's rule)
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=spec["seed"],
        bf16=spec["bf16"],
        use_cpu=not torch.cuda.is_available(),  # the GPU where there is one, as preftune
        gradient_checkpointing=spec.get("gradient_checkpointing", False),
        max_length=spec["max_length"],
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=bs,
        beta=spec["beta"],
        loss_type=["sigmoid"],
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        model_init_kwargs={"dtype": torch.float32},
    )
    recorder = Recorder()
    t0 = time.perf_counter()
    trainer = PreTokenizedDPOTrainer(
        model=spec["model"],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[recorder],
    )
    init_s = time.perf_counter() - t0
    rss_after_init = _maxrss()
    t1, c1 = time.perf_counter(), time.process_time()
    trainer.train()
    train_s = time.perf_counter() - t1
    train_cpu_s = time.process_time() - c1
    counted, seqs = sequence_lengths(examples, batches)
    records = [
        {
            "loss": log["loss"],
            "logps_chosen": log.get("logps/chosen"),
            "logps_rejected": log.get("logps/rejected"),
            "grad_norm": log.get("grad_norm"),
            "step_time": t,
        }
        for log, t in zip(recorder.logs, recorder.step_times)
    ]
    return {
        "tool": "trl",
        "reference_mode": "precompute" if precompute else "live ref model",
        "init_s": init_s,
        "load_s": init_s - timings["precompute_s"],
        "precompute_s": timings["precompute_s"],
        "train_s": train_s,
        "timed_s": timings["precompute_s"] + train_s,
        "timed_cpu_s": timings.get("precompute_cpu_s", 0.0) + train_cpu_s,
        "steps": records,
        "counted_tokens": counted,
        "seq_lengths": seqs,
        "rss_after_init": rss_after_init,
        "rss_after_import": rss_after_import,
        "optim": str(args.optim),
        "allocator": allocator,
    }


def run_matmul(spec: dict) -> dict:
    from common import matmul_rate

    out = {"tool": "matmul", "fp32": matmul_rate(2048, torch.float32, spec.get("reps", 5))}
    if spec.get("bf16"):
        out["bf16"] = matmul_rate(2048, torch.bfloat16, spec.get("reps", 5))
    return out


def run_micro(spec: dict) -> dict:
    from micro import layouts, optimizer_step
    from workloads import load_examples, synthetic_pairs, write_jsonl

    from preftune.models import load_causal_lm

    model = load_causal_lm(spec["model"])
    if spec["tool"] == "optim":
        before = _maxrss()
        out = optimizer_step(model, spec["variant"])
        return {"tool": "optim", "variant": spec["variant"], "step_s": out, "rss_before": before}
    data = spec["data"]
    if data == "spread":  # a wide length spread: what packing is for
        import random

        from preftune.models import load_tokenizer

        rng = random.Random(0)
        tok = load_tokenizer(spec["model"])
        recs = []
        for _ in range(spec["pairs"]):
            recs += synthetic_pairs(
                tok, 1, rng.randint(16, 96), rng.randint(8, 256), 32000, rng.randint(0, 9999)
            )
        data = str(write_jsonl(recs, Path(spec["workdir"]) / "spread.jsonl"))
    examples, tok = load_examples(data, spec["model"], spec["pairs"], 2048, 512)
    return {
        "tool": "layouts",
        "data": spec["data"],
        "layouts": layouts(model, examples, tok.pad_token_id, spec["caps"]),
    }


def main() -> None:
    spec_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec.get("seed", 0))
    run = {
        "preftune": run_preftune,
        "trl": run_trl,
        "matmul": run_matmul,
        "layouts": run_micro,
        "optim": run_micro,
    }[spec["tool"]]
    result = run(spec)
    result.update(
        {
            "ru_maxrss": _maxrss(),
            "threads": torch.get_num_threads(),
            "rank": _rank(),
        }
    )
    target = out_path if _rank() == 0 else out_path.with_suffix(f".rank{_rank()}.json")
    target.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
