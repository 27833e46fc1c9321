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
from pathlib import Path

import torch
from tqdm.auto import tqdm

from preftune.config import build_config
from preftune.data.prompts import load_prompts
from preftune.generation import SamplingConfig, generate
from preftune.judges import load_judge
from preftune.models import load_causal_lm, load_tokenizer
from preftune.online.rso_data import RSOSelection, apply_eos_penalty, as_record, select_rso_pairs
from preftune.prepacked import prepacked_linears
from preftune.validation import validate_online


def split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """`[config.yaml] key=value ...` -> (config path or None, overrides)."""
    argv = list(argv)
    if argv and "=" not in argv[0]:
        return argv[0], argv[1:]
    return None, argv


def generate_rso_dataset(cfg, out_path: Path) -> dict:
    """Run steps 1-3 of the RSO recipe over the training prompts of `cfg.data`; write the pairs
    to `out_path` (atomically) and return counts. Reads `model`, the data keys, `seed`,
    `judge`, the sampling keys, `rso_*`, `missing_eos_penalty`, `skip_ties`."""
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
    batches = tqdm(
        range(0, len(prompts.prompts), step), desc="rso", disable=cfg.train.quiet, leave=False
    )
    with prepacked_linears([model], step * o.rso_num_candidates):  # packed once, not per batch
        for s in batches:
            batch = prompts.prompts[s : s + step]
            sel, raw = _select_for_batch(model, tokenizer, judge, batch, o, gen)
            scores += raw.tolist()
            counts["ties"] += sel.num_ties
            for (c, r), sc, sr in zip(sel.pairs, sel.chosen_scores, sel.rejected_scores):
                if not c.text.strip() or not r.text.strip():
                    counts["empty"] += 1  # an empty text is not a valid record
                    continue
                records.append(as_record(batch[c.prompt_index]["prompt"], c.text, r.text, sc, sr))
    counts["pairs"] = len(records)
    counts["reward_mean"] = sum(scores) / max(len(scores), 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.rename(out_path)
    return counts


def _select_for_batch(model, tokenizer, judge, batch, o, gen) -> tuple[RSOSelection, torch.Tensor]:
    """Candidates of the SFT model for a batch of prompts, judged, rejection-sampled, paired."""
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
    config, rest = split_argv(overrides)
    rest = [f"rso_output={a.split('=', 1)[1]}" if a.startswith("out=") else a for a in rest]
    cfg = build_config(config, rest)
    validate_online(cfg, method="rso", rso_data=True)
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
