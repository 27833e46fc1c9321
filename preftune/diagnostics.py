"""What a preference step did to each pair, as pure functions of per-pair (or per-token) tensors.

The logged means (`rewards/chosen`, `rewards/margins`) hide what the papers argue about: DPO on
near-identical pairs can lower log pi(y_w) below the reference on many pairs while the mean
chosen reward stays positive (Pal et al. 2024, DPOP), and IPO's margin should settle at
1/(2 tau) (Azar et al. 2023) where DPO's grows without bound. These functions give the per-pair
quantities; the trainer averages them over every pair of a step (train) or of the held-out set
(eval), so each logged value is a fraction or a mean over pairs, not a mean of batch means.

Pair metrics (train and eval; a few element-wise ops on (B,) tensors, no extra forward):

    pairs/chosen_below_ref     fraction with log pi(y_w) < log pi_ref(y_w)
    pairs/rejected_below_ref   fraction with log pi(y_l) < log pi_ref(y_l)
    pairs/same_direction       fraction whose chosen and rejected log-ratios have the same
                               sign (both up or both down; 0 at step 1 where both are 0)
    pairs/both_down            fraction with both below the reference
    logratio/margin            h = (logp_w - ref_w) - (logp_l - ref_l), in nats (rewards/margins
                               is beta * h for the DPO family)
    logratio/margin_per_token  h with each log-ratio divided by its completion length (the
                               quantity length-normalised IPO drives to 1/(2 tau))

Segment metrics (at each evaluation, see `segment_sums`; eval/ over the held-out pairs, train/
over the training probe, evaluate.train_probe): where chosen and rejected share d >= 1 leading
completion tokens, the change (policy - reference, nats) of the shared prefix, of the first
differing token of each, and of each suffix after it.
"""

from __future__ import annotations

import torch
from torch import Tensor

SEGMENTS = ("prefix", "edit", "suffix")


def pair_diagnostics(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> dict[str, Tensor]:
    """Per-pair diagnostics, each (B,) float, detached, from (B,) summed log-probs and (B,)
    completion lengths. Keys are the metric names of the module docstring; the trainer logs
    their mean over all pairs."""
    dc = (policy_chosen_logps - ref_chosen_logps).detach().float()
    dr = (policy_rejected_logps - ref_rejected_logps).detach().float()
    return {
        "pairs/chosen_below_ref": (dc < 0).float(),
        "pairs/rejected_below_ref": (dr < 0).float(),
        "pairs/same_direction": ((dc > 0) & (dr > 0) | (dc < 0) & (dr < 0)).float(),
        "pairs/both_down": ((dc < 0) & (dr < 0)).float(),
        "logratio/margin": dc - dr,
        "logratio/margin_per_token": dc / chosen_lengths.clamp(min=1).to(dc)
        - dr / rejected_lengths.clamp(min=1).to(dr),
    }


def shared_lengths(chosen_ids: list[list[int]], rejected_ids: list[list[int]]) -> Tensor:
    """(B,) long: how many leading completion tokens chosen_i and rejected_i have in common."""
    out = []
    for c, r in zip(chosen_ids, rejected_ids):
        d = 0
        while d < min(len(c), len(r)) and c[d] == r[d]:
            d += 1
        out.append(d)
    return torch.tensor(out, dtype=torch.long)


def token_ordinals(seq_index: Tensor, num_seqs: int) -> Tensor:
    """(N,) long: the k of each scored token, counting per sequence in the order the layout lists
    them (every layout of preftune/layouts.py lists a sequence's completion tokens in order)."""
    order = torch.sort(seq_index, stable=True).indices
    counts = torch.bincount(seq_index, minlength=num_seqs)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.arange(seq_index.numel(), device=seq_index.device)
    out = torch.empty_like(seq_index)
    out[order] = ranks - starts[seq_index[order]]
    return out


def segment_sums(token_logps: Tensor, seq_index: Tensor, num_seqs: int, split: Tensor) -> Tensor:
    """(S, 3) sums of per-token log-probs over each sequence's tokens before position split[s],
    at it, and after it (prefix, edit, suffix). token_logps, seq_index: (N,) as returned by
    `preftune.logps.token_logps` and `TokenBatch.seq_index`; split: (S,) long. A segment with
    no tokens sums to 0."""
    k = token_ordinals(seq_index, num_seqs)
    d = split.to(seq_index.device)[seq_index]
    segment = (k > d).long() + (k >= d).long()  # 0 before, 1 at, 2 after
    out = torch.zeros(num_seqs * 3, dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, seq_index * 3 + segment, token_logps.detach()).view(num_seqs, 3)


def segment_changes(policy: Tensor, reference: Tensor, shared: Tensor) -> dict[str, Tensor]:
    """Per-pair changes (policy - reference, nats) by segment.

    policy, reference: (2B, 3) `segment_sums` of [chosen; rejected], both split at `shared` (B,)
    (the pair's shared leading completion tokens). Returns (B,) tensors: segments/prefix (the
    same tokens in the same context for chosen and rejected: the chosen copy is used),
    segments/{chosen,rejected}_{edit,suffix}, `has_shared` (shared >= 1) and `chosen_below_ref`
    (the whole chosen completion ended below the reference). Fixed shapes, so processes can
    gather them; `summarise_segments` keeps the pairs with a shared prefix."""
    B = shared.numel()
    delta = (policy - reference).float()
    c, r = delta[:B], delta[B:]
    return {
        "segments/prefix": c[:, 0],
        "segments/chosen_edit": c[:, 1],
        "segments/rejected_edit": r[:, 1],
        "segments/chosen_suffix": c[:, 2],
        "segments/rejected_suffix": r[:, 2],
        "has_shared": (shared.to(delta.device) >= 1).float(),
        "chosen_below_ref": (c.sum(1) < 0).float(),
    }


DROPPED = ("segments/prefix", "segments/chosen_edit", "segments/chosen_suffix")


def summarise_segments(changes: dict[str, Tensor]) -> dict[str, float]:
    """From `segment_changes` concatenated over batches: each segment's mean over the pairs with
    a shared prefix, the chosen-side means over those of them whose chosen fell below the
    reference (`..._dropped`), and `segments/shared_fraction`. Empty groups are left out."""
    shared = changes["has_shared"] > 0
    below = shared & (changes["chosen_below_ref"] > 0)
    out = {"segments/shared_fraction": float(shared.float().mean())}
    if not shared.any():
        return out
    for key, values in changes.items():
        if key.startswith("segments/"):
            out[key] = float(values[shared].mean())
            if key in DROPPED and below.any():
                out[key + "_dropped"] = float(values[below].mean())
    return out
