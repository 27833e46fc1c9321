"""A step's or an evaluation's metrics from the per-example values every process recorded
(gathered first, so N processes average as one): losses, rewards, log-probs, the per-pair
diagnostics and each loss's own metrics."""

from __future__ import annotations

import torch

from preftune.diagnostics import pair_diagnostics
from preftune.losses import PreferenceLogps


def _mean(values: list) -> float:
    return (
        float(torch.cat([v.reshape(-1).float() for v in values]).mean()) if values else float("nan")
    )


def summarise(rec: dict[str, list], extra: dict[str, list], prefix: str = "") -> dict:
    """Means of the recorded values; margins and accuracies where chosen and rejected pair up."""
    m = {
        "loss": _mean(rec["loss"]),
        "rewards/chosen": _mean(rec["chosen"]),
        "rewards/rejected": _mean(rec["rejected"]),
    }
    if (
        rec["chosen"]
        and rec["rejected"]
        and len(torch.cat(rec["chosen"])) == len(torch.cat(rec["rejected"]))
    ):
        c, r = torch.cat(rec["chosen"]), torch.cat(rec["rejected"])
        m["rewards/margins"] = float((c - r).mean())
        m["rewards/accuracies"] = float((c > r).float().mean())
    if rec["lp_c"]:
        m["logps/chosen"], m["logps/rejected"] = _mean(rec["lp_c"]), _mean(rec["lp_r"])
    for k, v in rec.items():
        if "/" in k:  # diagnostics.pair_diagnostics: already per pair, named as logged
            m[k] = _mean(v)
    for k, v in extra.items():
        m[k] = _mean(v)
    return {prefix + k: v for k, v in m.items()}


def record(rec: dict[str, list], extra: dict[str, list], out, logps) -> None:
    """This process's per-example values of a micro-batch; `BaseTrainer._gather_rec` collects them
    from every process once per step (their sizes may differ: KTO's chosen / rejected)."""
    rec["loss"].append(out.losses.detach())
    rec["chosen"].append(out.chosen_rewards.detach())
    rec["rejected"].append(out.rejected_rewards.detach())
    if isinstance(logps, PreferenceLogps):
        rec["lp_c"].append(logps.policy_chosen_logps.detach())
        rec["lp_r"].append(logps.policy_rejected_logps.detach())
        if logps.ref_chosen_logps is not None:  # per pair, averaged over all pairs of the step
            for k, v in pair_diagnostics(
                logps.policy_chosen_logps, logps.policy_rejected_logps,
                logps.ref_chosen_logps, logps.ref_rejected_logps,
                logps.chosen_lengths, logps.rejected_lengths,
            ).items():  # fmt: skip
                rec.setdefault(k, []).append(v.detach())
    for k, v in out.metrics.items():
        extra.setdefault(k, []).append(torch.as_tensor(v, dtype=torch.float32).detach().reshape(-1))
