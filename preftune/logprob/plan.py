"""The layout planner: every decision about how a batch is laid out and run, in one place.

- Per run (`layout_settings`): whether prompts may be shared between a pair's completions
  (`share_prompt`: true, false, or auto — off for hybrid models, whose recurrent or convolution
  layers would see the other branch), packing, the shared prefix, the shared completion prefix.
- Per micro-batch (`shared_prompt_pays`): under share_prompt=auto, whether laying each prompt out
  once costs less than laying it out twice (`sharing_pays`, a FLOP model).
- Per forward (`plan_forward`): how the decoder runs a built batch — its shared prefix folded in
  as row 0, run first as a KV cache, or laid out in every row; and whether a sliding window must
  be applied to the mask here.

The builders (preftune/layouts.py, preftune/train/batches.py) lay out what the first two decide;
preftune/logps.py executes the third.
"""

from __future__ import annotations

from dataclasses import dataclass

from preftune.layouts import TokenBatch, laid_out, shared_group_length, shared_prefix_length
from preftune.logprob.arch import (
    ATTENTION_LAYERS,
    attention_only,
    checkpointing,
    compiled_layers,
    sliding_window,
    token_mixers,
)


@dataclass(frozen=True)
class LayoutSettings:
    """How a run lays out its pair batches (`pair_batch`'s keyword arguments)."""

    packed: bool
    share_prompt: bool | str  # True, False or "auto" (decided per micro-batch)
    hidden_size: int  # the model width the cost model uses
    share_prefix: bool
    share_completion_prefix: bool
    varlen: bool = False  # shared-prompt batches as one unpadded row (preftune/varlen_layout.py)


def layout_settings(train_cfg, model_config, checkpointing: bool = False) -> LayoutSettings:
    """A run's layout from its config keys (packed, share_prompt, share_prefix,
    share_completion_prefix), its model and whether its layers recompute in backward (the
    varlen layout's per-path attention cannot run there, see `varlen_runs`)."""
    share = {"true": True, "false": False}.get(train_cfg.share_prompt, "auto")
    if share == "auto" and not attention_only(model_config):
        share = False
    return LayoutSettings(
        train_cfg.packed,
        share,
        getattr(model_config, "hidden_size", 1024),
        train_cfg.share_prefix,
        train_cfg.share_completion_prefix,
        varlen=bool(share) and varlen_capable(model_config) and not checkpointing,
    )


def varlen_capable(cfg) -> bool:
    """Whether a model's config allows the varlen layout: attention only, SDPA, no sliding
    window (a path longer than the window would need it applied per path). The layout then
    replaces every shared-prompt layout: it lays out each prompt once as they do, and nothing
    else (no padding, no masked attention blocks), so no cost model is needed."""
    return (
        attention_only(cfg)
        and getattr(cfg, "_attn_implementation", None) == "sdpa"
        and sliding_window(cfg)[0] is None
    )


# tokens (prompt + chosen + rejected) of a micro-batch's longest pair from which the varlen
# layout and fitted rows are used: W6's chat pairs (~200-500) are where they were measured
# (docs/benchmarks.md); below it, short pairs (W1's edit pairs, ~40) keep the padded layouts
# they were measured with, where per-path attention calls would cost more than the padding.
LONG_PAIR = 256


def long_pairs(exs: list[dict]) -> bool:
    """Whether a micro-batch gets the varlen layout (where the run allows it) or fitted rows."""
    return (
        max(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in exs)
        >= LONG_PAIR
    )


def shared_prompt_pays(
    exs: list[dict], packed: bool, hidden_size: int, share_prefix: bool, share_completions: bool
) -> bool:
    """share_prompt=auto for one micro-batch of pairs (`sharing_pays` with the prefix the
    separate layout would share: only when padded, see `layouts.build_token_batch`)."""
    prompts = [e["prompt_ids"] for e in exs]
    prefix = shared_prefix_length(prompts) if share_prefix and not packed else 0
    return sharing_pays(exs, packed, hidden_size, prefix, share_completions)


def sharing_pays(
    exs: list[dict],
    packed: bool,
    hidden_size: int,
    prefix: int = 0,
    share_completions: bool = True,
) -> bool:
    """Whether laying each prompt out once costs less than prompt + chosen, prompt + rejected.

    Per layer, dense work is ~24 d^2 FLOPs per laid-out token and attention ~4 d W^2 per row of
    width W: a row with a custom mask is computed in full (the CPU SDPA kernels cannot skip its
    masked blocks). Sharing saves the second prompt copy but puts both completions in one row,
    so it pays for short completions after long prompts (chat data, the bundled set) and loses
    for long completions after short prompts (W2 in docs/benchmarks.md). A shared `prefix`
    (run once, see logps.py) leaves the rows and adds `prefix` key columns to their attention.
    """
    prompts = [e["prompt_ids"] for e in exs]
    pairs = [[e["chosen_ids"], e["rejected_ids"]] for e in exs]
    return group_sharing_pays(prompts, pairs, packed, hidden_size, prefix, share_completions)


def group_sharing_pays(
    prompts: list[list[int]],
    groups: list[list[list[int]]],
    packed: bool,
    hidden_size: int,
    prefix: int = 0,
    share_completions: bool = True,
) -> bool:
    """`sharing_pays` for any number of completions per prompt (`groups[i]` follow
    `prompts[i]`): a pair's two, or the k samples of an online group (train/remax.py)."""
    # the tokens each layout lays out (layouts.py decides: last tokens are targets only, and
    # with `share_completions` the completions' common leading tokens are laid out once)
    own = [p[prefix:] for p in prompts]
    shared = [shared_group_length(p, cs, share_completions) for p, cs in zip(own, groups)]
    separate = [len(laid_out(p + c, len(p))) for p, cs in zip(own, groups) for c in cs]

    def cost(lengths: list[int]) -> int:
        rows, width = (1, sum(lengths)) if packed else (len(lengths), max(lengths))
        return rows * (6 * hidden_size * width + width * (width + prefix))

    return cost(shared) <= cost(separate)


@dataclass(frozen=True)
class ForwardPlan:
    """How the decoder runs one built batch."""

    prefix: str  # "none" (no shared prefix), "rows", "fold" or "cache" (see `prefix_path`)
    window: int | None  # the sliding window, None if every layer sees the whole sequence
    mixed: bool  # sliding and full-attention layers both
    windowed: bool  # the window must be applied to the mask here (`prefix.windowed_mask`)
    varlen: bool = False  # a varlen batch runs its per-path attention (else: under a 4-D mask)


def plan_forward(decoder, batch: TokenBatch) -> ForwardPlan:
    """The plan for `batch` on `decoder`. A hybrid model (convolution, recurrent or state-space
    layers beside attention, which read whole rows) takes only the padded layout; a
    sliding-window model whose prefix + row width exceeds its window gets the window applied to
    a 4-D mask (transformers' windowed KV cache keeps only the last keys of the prefix, and it
    does not window a 4-D mask it is given). A shared prefix is laid out in the rows for hybrid
    and windowed models and under gradient checkpointing (which drops any cache and would re-run
    the folded attention under another implementation)."""
    hybrid = not attention_only(decoder.config)
    if hybrid and (batch.attention_mask is None or batch.attention_mask.dim() == 4):
        kinds = sorted(token_mixers(decoder.config) - ATTENTION_LAYERS)
        raise ValueError(
            f"{type(decoder).__name__} has {', '.join(kinds)} layers, which read every token "
            "of a row in order whatever the attention mask says: the packed and shared-prompt "
            "layouts would let one sequence see another. Set packed=false and "
            "share_prompt=false (share_prompt=auto does this by itself)."
        )
    if batch.paths is not None:
        if not varlen_runs(decoder):
            raise ValueError(
                f"{type(decoder).__name__} cannot run the varlen layout's per-path attention "
                "here: run `varlen_layout.masked(batch)`"
            )
        return ForwardPlan("none", None, False, False, varlen=True)
    window, mixed = (None, False) if hybrid else sliding_window(decoder.config)
    L0 = 0 if batch.prefix_ids is None else batch.prefix_ids.numel()
    windowed = window is not None and L0 + batch.input_ids.shape[1] > window
    prefix = "none"
    if batch.prefix_ids is not None:
        lay_out = hybrid or windowed or checkpointing(decoder)
        prefix = prefix_path(decoder, batch, lay_out, compiled_layers(decoder))
    return ForwardPlan(prefix, window, mixed, windowed)


def varlen_runs(decoder) -> bool:
    """Whether `decoder` can run a varlen batch's per-path attention (logprob/varlen.py): its
    config allows it, its layers look their attention function up at call time, and they do
    not recompute in backward (the recomputation would run under the model's own attention,
    outside the forward that names the per-path one). Otherwise the batch runs under the
    equivalent 4-D mask, slower but the same log-probs."""
    return (
        varlen_capable(decoder.config)
        and getattr(type(decoder), "_supports_attention_backend", False)
        and not checkpointing(decoder)
    )


def prefix_path(decoder, batch: TokenBatch, lay_out: bool, no_cache: bool = False) -> str:
    """How a batch's shared prefix runs: "rows" (laid out in every row), "fold" (row 0 of the
    same forward) or "cache" (its own forward, keys and values repeated over the rows).

    - "rows" when the caller says so (`lay_out`: hybrid and windowed models, gradient
      checkpointing).
    - "fold" where that runs fewer token slots than laying it out: row 0 and the rows are
      padded to one width W = max(T, L0), so (R + 1)·W <= R·(L0 + T), i.e. T <= R·L0 when the
      rows are the wider (W2: a 63-token prefix in front of two 2,112-token rows would add a
      third row of work) and L0 <= R·T when the prefix is (W1 with the completions' shared
      tokens in the trunk: a 27-token prefix, rows of ~26). It needs SDPA, which the folded
      attention wraps, in layers that look their attention function up at call time (Falcon
      picks a class at init and would take its eager branch with the wider mask).
    - "rows" again when the rows carry no padding under SDPA: laid-out rows need no mask and
      SDPA runs its causal kernel, which skips the upper triangle, while rows after a cache
      need an explicit mask and the full square (W2's model, 2 x 2,112 tokens, 63-token prefix:
      laid out was the faster of the two in docs/benchmarks.md).
    - "cache" otherwise (eager attention, padded rows, a prefix longer than all rows together),
      except under `no_cache` (compiled layers, `arch.compiled_layers`): "rows" then.
    """
    if lay_out:
        return "rows"
    L0, (R, T) = batch.prefix_ids.numel(), batch.input_ids.shape
    sdpa = getattr(decoder.config, "_attn_implementation", None) == "sdpa"
    fewer_slots = (R + 1) * max(T, L0) <= R * (L0 + T)
    if sdpa and getattr(type(decoder), "_supports_attention_backend", False) and fewer_slots:
        return "fold"
    mask = batch.attention_mask
    if no_cache or (sdpa and mask is not None and mask.dim() == 2 and bool(mask.all())):
        return "rows"
    return "cache"
