"""One W5 run (BENCHMARK.md): one tool, one online method, in its own process.

    python benchmarks/online_worker.py SPEC.json OUT.json

preftune is driven step by step through its online trainer (what `loop.run` does, without its
metrics file, evaluation or final save); TRL through `GRPOTrainer.train()` or the experimental
`OnlineDPOTrainer.train()`. Both get the same prompts (preftune's bundled arithmetic training
prompts, in order), the same number of samples per prompt, the same new-token budget and
sampling settings, and the same judge (the last-integer verifier as a reward function). Timed
region: every training step (generation, judging, reference and policy forwards, backward,
optimizer), after the models are loaded.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prompts(spec: dict) -> list[dict]:
    """preftune's prompt records (`prompt` messages, chat-templated `text`) of the bundled set."""
    from preftune.config import build_config
    from preftune.data.prompts import load_prompts
    from preftune.models import load_tokenizer

    cfg = build_config({"model": spec["model"], "data": "arithmetic", "num_train": None})
    tok = load_tokenizer(spec["model"])
    return load_prompts(cfg, tok).prompts[: spec["steps"] * spec["prompts_per_step"]]


# W5's settings (benchmarks/online.py's defaults): prompts per step, samples, tokens, optimizer
W5 = dict(steps=8, prompts_per_step=8, k=4, new_tokens=16, lr=1e-6, kl_coef=0.04, beta=0.1,
          temperature=0.9, threads=2, seed=0, bf16=False)  # fmt: skip


def w5_spec(model: str, method: str, **changes) -> dict:
    """A W5 spec for `method` on `model` (W5's settings, then `changes`)."""
    return {**W5, "model": model, "method": method, **changes}


def preftune_trainer(spec: dict, overrides: Sequence[str] = ()):
    """preftune's online trainer for `spec`, built as `preftune online` builds it (`overrides`:
    more `key=value` settings, for the profiling scripts)."""
    from preftune.config import build_config
    from preftune.train.entry import ONLINE_METHODS

    k = spec["k"]
    cfg = build_config(
        {
            "model": spec["model"],
            "data": "arithmetic",
            "num_train": spec["steps"] * spec["prompts_per_step"],
            "num_eval": 0,
            "num_task_eval": 0,
            "eval_before": False,
            "method": spec["method"],
            "judge": "verifier",
            "batch_size": spec["prompts_per_step"],
            "max_steps": spec["steps"],
            "lr": spec["lr"],
            "scheduler": "constant",
            "warmup_ratio": 0.0,
            "max_grad_norm": 1.0,
            "bf16": spec.get("bf16", False),  # as the TRL side: the same precision, never auto
            "temperature": spec["temperature"],
            "top_p": 1.0,
            "max_new_tokens": spec["new_tokens"],
            "num_generations": k,
            "kl_coef": spec["kl_coef"],
            "beta": spec["beta"],
            "skip_ties": False,  # TRL trains on every pair, ties included
            "seed": spec["seed"],
            "quiet": True,
            "report_to": "none",
            "output_dir": str(Path(spec["workdir"]) / "runs"),
            "run_name": "bench",
        },
        list(overrides),
    )
    return ONLINE_METHODS[spec["method"]](cfg)


def run_preftune(spec: dict) -> dict:
    k = spec["k"]
    t0 = time.perf_counter()
    trainer = preftune_trainer(spec, spec.get("overrides", ()))
    init_s = time.perf_counter() - t0
    B = spec["prompts_per_step"]
    per_prompt = k if spec["method"] in ("grpo", "rloo") else 2
    steps, gen_tokens = [], 0
    t1 = time.perf_counter()
    for s in range(spec["steps"]):
        m = trainer.train_step(list(range(s * B, (s + 1) * B)))
        trainer.step += 1
        gen_tokens += m["completion_length"] * B * per_prompt
        steps.append(
            {k_: m.get(k_) for k_ in ("loss", "reward/mean", "step_time", "generation_time")}
        )
    train_s = time.perf_counter() - t1
    return {"tool": "preftune", "init_s": init_s, "train_s": train_s, "gen_tokens": gen_tokens,
            "steps": steps}  # fmt: skip


def _reward(prompts, completions, **_) -> list[float]:
    from preftune.data.arithmetic import verify

    text = lambda c: c if isinstance(c, str) else c[-1]["content"]  # noqa: E731
    return [float(verify(p, text(c))) for p, c in zip(prompts, completions)]


class _Counter:
    """Counts the completion tokens TRL generates, via the reward function's arguments."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens = tokenizer, 0
        self.stop_ids: set[int] = set()  # TRL's: the tokenizer's and the generation config's
        self.__name__ = "verifier"

    def __call__(self, prompts, completions, completion_ids=None, **kw):
        if completion_ids is not None:  # rows padded after the first stop id: count up to it
            for ids in completion_ids:
                ids = [int(t) for t in ids]
                stops = [i for i, t in enumerate(ids) if t in self.stop_ids]
                self.tokens += stops[0] + 1 if stops else len(ids)
        else:
            texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
            self.tokens += sum(len(self.tokenizer(t)["input_ids"]) + 1 for t in texts)
        return _reward(prompts, completions)


def run_trl(spec: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.generation import eos_token_ids

    prompts = _prompts(spec)
    data = Dataset.from_list([{"prompt": p["prompt"]} for p in prompts])
    tok = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    counter = _Counter(tok)
    B, k, work = spec["prompts_per_step"], spec["k"], Path(spec["workdir"])
    common = dict(
        output_dir=str(work / "trl"), max_steps=spec["steps"], learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=True, bf16=spec.get("bf16", False), seed=spec["seed"],
        gradient_checkpointing=False, disable_dropout=True, temperature=spec["temperature"],
        top_p=1.0, dataloader_num_workers=0,
    )  # fmt: skip
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    counter.stop_ids = set(eos_token_ids(model, tok))
    if spec["method"] == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(
            **common, per_device_train_batch_size=B * k, num_generations=k,
            max_completion_length=spec["new_tokens"], beta=spec["kl_coef"], loss_type="grpo",
            scale_rewards="group", epsilon=0.2, shuffle_dataset=False,
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=model, reward_funcs=counter, args=args, train_dataset=data, processing_class=tok
        )
    else:
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        args = OnlineDPOConfig(
            **common, per_device_train_batch_size=B, max_new_tokens=spec["new_tokens"],
            beta=[spec["beta"]], loss_type="sigmoid",
        )  # fmt: skip
        trainer = OnlineDPOTrainer(
            model=model, reward_funcs=counter, args=args, train_dataset=data, processing_class=tok
        )
    init_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1
    logs = [x for x in trainer.state.log_history if "loss" in x]
    return {"tool": "trl", "init_s": init_s, "train_s": train_s, "gen_tokens": counter.tokens,
            "steps": [{"loss": x.get("loss")} for x in logs]}  # fmt: skip


def main() -> None:
    spec_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    result = {"preftune": run_preftune, "trl": run_trl}[spec["tool"]](spec)
    result.update({"ru_maxrss": _maxrss(), "threads": torch.get_num_threads()})
    out_path.write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
