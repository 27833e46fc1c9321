"""RSO data generation: `preftune data rso key=value ...` writes a preference JSONL.

Liu et al., "Statistical Rejection Sampling Improves Preference Optimization", ICLR 2024
(arXiv 2309.06657), METHODS.md §4, recipe steps 1-3: per prompt, sample `rso_num_candidates`
completions from the SFT policy (`model`), keep `rso_num_samples` with the statistical rejection
sampler at `rso_beta` (Algorithm 1), pair the accepted ones first-round-rank — (0,1), (2,3), ...
in acceptance order — and label each pair with the judge. Step 4 is ordinary offline training on
the file: `preftune train data=PAIRS.jsonl loss=dpo beta=0.05` (sigmoid-norm) or `loss=hinge`
(hinge-norm); `beta` there is the paper's loss temperature gamma, not the sampling beta.

The same selection runs inside the online loop (`preftune online method=rso`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from preftune.generation import Completion
from preftune.online.rso import conduct_rejection_sampling, rank_into_pairs


def apply_eos_penalty(
    scores: torch.Tensor, comps: list[Completion], penalty: float | None
) -> torch.Tensor:
    """Scores minus `penalty` for completions cut off before EOS (TRL `missing_eos_penalty`)."""
    if penalty is None:
        return scores
    has_eos = torch.tensor([c.has_eos for c in comps])
    return torch.where(has_eos, scores, scores - penalty)


@dataclass
class RSOSelection:
    """Pairs chosen from every prompt's candidates, with their (penalised) judge scores."""

    pairs: list[tuple[Completion, Completion]] = field(default_factory=list)
    chosen_scores: list[float] = field(default_factory=list)
    rejected_scores: list[float] = field(default_factory=list)
    num_ties: int = 0
    accepted: list[list[int]] = field(default_factory=list)  # per prompt, candidate indices


def select_rso_pairs(
    candidates: list[Completion],
    scores: torch.Tensor,
    num_candidates: int,
    num_samples: int,
    beta: float,
    generator: torch.Generator | None,
    keep_ties: bool = False,
) -> RSOSelection:
    """Rejection-sample `num_samples` of each prompt's `num_candidates` candidates (prompt-major,
    as `generate` returns them) and rank the accepted ones into pairs (RSO Algorithm 1 and
    first-round-rank). Tied pairs are dropped and counted unless `keep_ties`."""
    if len(candidates) % num_candidates:
        raise ValueError(f"{len(candidates)} candidates are not {num_candidates} per prompt")
    out = RSOSelection()
    values = scores.tolist()
    for s in range(0, len(candidates), num_candidates):
        group, rewards = candidates[s : s + num_candidates], values[s : s + num_candidates]
        accepted = conduct_rejection_sampling(rewards, num_samples, beta, generator=generator)
        ranked = rank_into_pairs(
            [group[j] for j in accepted], [rewards[j] for j in accepted], keep_ties=keep_ties
        )
        out.accepted.append(accepted)
        out.pairs += ranked.pairs
        out.chosen_scores += ranked.chosen_rewards
        out.rejected_scores += ranked.rejected_rewards
        out.num_ties += ranked.num_ties
    return out


def _as_record(prompt, chosen: str, rejected: str, sc: float, sr: float) -> dict:
    if isinstance(prompt, str):
        c, r = chosen, rejected
    else:
        c = [{"role": "assistant", "content": chosen}]
        r = [{"role": "assistant", "content": rejected}]
    return {"prompt": prompt, "chosen": c, "rejected": r, "chosen_score": sc, "rejected_score": sr}


def generate_rso_dataset(cfg, out_path: Path) -> dict:
    """Run steps 1-3 of the RSO recipe over the training prompts of `cfg.data`; write the pairs
    to `out_path` (atomically) and return counts. Reads `model`, the data keys, `seed`,
    `judge`, the sampling keys, `rso_*`, `missing_eos_penalty`, `skip_ties`."""
    from tqdm.auto import tqdm

    from preftune.judges import load_judge
    from preftune.models import load_causal_lm, load_tokenizer
    from preftune.online.prompts import load_prompts

    o, m = cfg.online, cfg.model
    judge = load_judge(o.judge, batch_size=max(1, cfg.eval.eval_batch_size))
    torch.manual_seed(cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(m.model, trust_remote_code=m.trust_remote_code)
    model = load_causal_lm(m.model, getattr(torch, m.dtype), m.trust_remote_code).eval()
    prompts = load_prompts(cfg, tokenizer)
    for note in prompts.notes:
        print(f"[preftune] note: {note}", flush=True)
    step = o.generation_batch_size or 8
    counts = {"prompts": len(prompts.prompts), "pairs": 0, "ties": 0, "empty": 0}
    scores, records = [], []
    for s in tqdm(
        range(0, len(prompts.prompts), step), desc="rso", disable=cfg.train.quiet, leave=False
    ):
        batch = prompts.prompts[s : s + step]
        sel, raw = _select_for_batch(model, tokenizer, judge, batch, o, gen)
        scores += raw.tolist()
        counts["ties"] += sel.num_ties
        for (c, r), sc, sr in zip(sel.pairs, sel.chosen_scores, sel.rejected_scores):
            if not c.text.strip() or not r.text.strip():
                counts["empty"] += 1  # an empty text is not a valid record
                continue
            records.append(_as_record(batch[c.prompt_index]["prompt"], c.text, r.text, sc, sr))
    counts["pairs"] = len(records)
    counts["reward_mean"] = sum(scores) / max(len(scores), 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.rename(out_path)
    return counts


def _select_for_batch(model, tokenizer, judge, batch, o, gen) -> tuple[RSOSelection, torch.Tensor]:
    """Candidates of the SFT model for a batch of prompts, judged, rejection-sampled, paired."""
    from preftune.generation import SamplingConfig, generate

    sampling = SamplingConfig(
        temperature=o.temperature,
        top_p=o.top_p,
        top_k=o.top_k,
        max_new_tokens=o.max_new_tokens,
        num_return_sequences=o.rso_num_candidates,
    )
    cands = generate(model, tokenizer, [p["text"] for p in batch], sampling)
    raw = torch.tensor(
        judge.score([batch[c.prompt_index]["text"] for c in cands], [c.text for c in cands]),
        dtype=torch.float64,
    )
    sel = select_rso_pairs(
        cands,
        apply_eos_penalty(raw, cands, o.missing_eos_penalty),
        o.rso_num_candidates,
        o.rso_num_samples,
        o.rso_beta,
        gen,
        keep_ties=not o.skip_ties,
    )
    return sel, raw


def main(overrides: list[str]) -> int:
    """`preftune data rso [config.yaml] key=value ...`; `out=PATH` (or `rso_output=`) names the
    JSONL, by default OUTPUT_DIR/rso-TIME.jsonl."""
    from preftune.config import build_config
    from preftune.online.base import split_argv

    config, rest = split_argv(overrides)
    rest = [f"rso_output={a.split('=', 1)[1]}" if a.startswith("out=") else a for a in rest]
    cfg = build_config(config, rest)
    from preftune.train.online import validate_online

    validate_online(cfg, method="rso")
    out = Path(
        cfg.online.rso_output
        or Path(cfg.train.output_dir) / f"rso-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    )
    counts = generate_rso_dataset(cfg, out)
    print(
        f"[preftune] rso: {counts['pairs']} pairs from {counts['prompts']} prompts "
        f"({cfg.online.rso_num_candidates} candidates, {cfg.online.rso_num_samples} accepted "
        f"each; {counts['ties']} tied pairs dropped, {counts['empty']} empty; mean judge score "
        f"{counts['reward_mean']:.3f}) -> {out}\n"
        f"[preftune] train on it: preftune train data={out} loss=dpo beta=0.05 "
        f"(sigmoid-norm) or loss=hinge (hinge-norm)",
        flush=True,
    )
    return 0
