"""What one optimizer step measured: sums over its valid target tokens (every micro-batch,
every process), where its gradient went, and the statistic of the data that ``auto``
follows (``dftune.objectives.auto``).

Where the gradient goes: each token's weight w_t (NLL 1, DFT p) is the share of its NLL
gradient it gets. The step sums the weights of the tokens below p = 0.1 (``LOW_P``: NLL
gives them full weight, DFT almost none) and of the protected ones
(``Objective.protected``: special tokens under ``protect=`` and ``auto``), so the log
shows, per step, what share of the tokens and of the summed weight each took.

The data statistic: the arithmetic (``mean_p``) and geometric (``geo_p`` = exp(-NLL))
mean target probability over the step's tokens other than the protected ones, from the
all-reduced sums (so every process sees the same numbers). The loop feeds the previous
step's to ``auto``, measures the first step's own batch before its update
(``first_data_stats``), and keeps the last one in the checkpoint (``state.json``), so a
resumed run continues with the same exponent.
"""

from __future__ import annotations

import math

import torch

from dftune import dist
from dftune.loss import next_token_targets


class StepStats:
    """Sums over one optimizer step's valid tokens (every micro-batch, every process), kept
    on the device so that a step syncs with the host once."""

    FIELDS = ("objective", "nll", "prob", "entropy", "kl_ref", "weight", "tokens", "input_tokens", "low_p_tokens",
              "low_p_weight", "protected_tokens", "protected_weight", "protected_nll", "protected_prob")
    LOW_P = 0.1

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)

    def add(self, res, attention_mask: torch.Tensor, protected: torch.Tensor | None = None) -> None:
        """res: ``token_loss``'s LossResult; protected: (N,) bool, the targets of protected
        classes (``protected_targets``; None: no such tokens)."""
        m = res.mask
        kl = res.kl[m].sum() if res.kl is not None else torch.zeros((), device=m.device)
        low = m & (res.logp < math.log(self.LOW_P))
        prot = m & protected if protected is not None else torch.zeros_like(m)
        lp, w = res.logp.double(), res.weight.double()
        self.sums += torch.stack([res.objective_sum.double(), -lp[m].sum(), lp[m].exp().sum(),
                                  res.entropy[m].double().sum(), kl.double(), res.weight_sum.double(), m.sum().double(),
                                  attention_mask.sum().double(), low.sum().double(), w[low].sum(), prot.sum().double(),
                                  w[prot].sum(), -lp[prot].sum(), lp[prot].exp().sum()])

    def reduce(self, rt: dist.Runtime) -> dict[str, float]:
        return dict(zip(self.FIELDS, rt.all_sum(self.sums).tolist()))


def data_stats(sums: dict[str, float]) -> dict[str, float] | None:
    """What auto follows (``objectives.data_stats``), from a step's reduced sums, over the
    tokens that are not protected: the mean of p and exp(-NLL). None without such tokens."""
    n = sums["tokens"] - sums["protected_tokens"]
    if n <= 0:
        return None
    return {"mean_p": (sums["prob"] - sums["protected_prob"]) / n,
            "geo_p": math.exp(-(sums["nll"] - sums["protected_nll"]) / n)}


def gradient_record(sums: dict[str, float], protected: bool) -> dict[str, float]:
    """The log's shares: of the tokens and of the summed weight below p = 0.1, and (for an
    objective with protected classes) of the protected tokens."""
    n = max(sums["tokens"], 1.0)
    w = sums["weight"] if sums["weight"] > 0 else float("nan")
    rec = {"low_p_tokens": sums["low_p_tokens"] / n, "low_p_weight": sums["low_p_weight"] / w}
    if protected:
        rec.update(protected_tokens=sums["protected_tokens"] / n, protected_weight=sums["protected_weight"] / w)
    return rec


def protected_targets(objective, classes: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor | None:
    """(N,) bool over ``token_loss``'s targets: those of the objective's protected classes."""
    if not objective.protected or classes is None:
        return None
    _, targets = next_token_targets(labels, labels)  # (N,) the shifted targets, as the loss sees them
    table = classes.to(labels.device)
    return torch.isin(table[targets.clamp_min(0)], torch.tensor(objective.protected, device=labels.device))


@torch.no_grad()
def first_data_stats(rt: dist.Runtime, module, micro: list, autocast, objective,
                     classes: torch.Tensor | None) -> dict[str, float] | None:
    """``data_stats`` of one step's batch under the current weights (every micro-batch and
    process; a forward pass with NLL, no update): what auto follows at its first step."""
    from dftune.objective_spec import get_objective

    inner = dist.unwrap(module)
    kept, inner.objective, inner.entropy = (inner.objective, inner.entropy), get_objective("nll"), False
    stats = StepStats(rt.device)
    try:
        for batch in micro:
            batch = {k: v.to(rt.device) for k, v in batch.items()}
            with autocast():
                res = module(**batch)
            stats.add(res, batch["attention_mask"], protected_targets(objective, classes, batch["labels"]))
    finally:
        inner.objective, inner.entropy = kept
    return data_stats(stats.reduce(rt))
