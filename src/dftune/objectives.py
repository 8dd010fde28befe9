"""Per-token training objectives: one contract for all of them.

Every objective is a function ``fn(logp, ctx) -> losses`` where ``logp`` (M,) is the
fp32 log-probability of each *valid* target token (masked tokens are already removed)
and ``ctx`` carries detached extras aligned with it (sequence ids, entropy, the
reference model's log-prob). It returns the per-token losses (M,). The caller sums them
and divides by the global number of valid tokens; gradients flow only through ``logp``
(and, for ``asft``, through the full-vocabulary KL term that ``token_loss`` adds).

Names used in configs and on the command line: ``dft``, ``nll``, ``prob_power:alpha=2``,
``thresholded:q=0.2,normalize=kept``, ``dft_clip:tau=0.7``, ``talr``, ``focal:gamma=2``,
``iw_sft``, ``iw_sft:level=token``, ``asft:lam=0.05``. The registry is the plain dict
``OBJECTIVES`` (name -> factory taking the parameters as keyword arguments).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class TokenContext:
    """Detached per-token extras, each (M,) and aligned with ``logp``."""

    seq_ids: Tensor  # (M,) int64: which sequence each token belongs to
    entropy: Tensor | None = None  # (M,) entropy of the model's distribution
    ref_logp: Tensor | None = None  # (M,) log-prob of the target under the reference


@dataclass(frozen=True)
class Objective:
    """A resolved objective: the per-token function and what it needs.

    batch_level: the loss of one token depends on other tokens (sequence means, batch
        medians), so the fused loss must see every token before producing gradients.
    needs_ref: a reference model (the initial weights) must be supplied.
    kl_coef: weight of KL(pi_ref || pi_theta) over the full vocabulary, added per token
        by ``token_loss`` (ASFT).
    """

    name: str
    fn: Callable[[Tensor, TokenContext], Tensor]
    batch_level: bool = False
    needs_ref: bool = False
    kl_coef: float = 0.0

    def __call__(self, logp: Tensor, ctx: TokenContext) -> Tensor:
        return self.fn(logp, ctx)


def nll() -> Objective:
    """SFT: -log p(y*_t). The standard negative log-likelihood."""
    return Objective("nll", lambda logp, ctx: -logp)


def dft() -> Objective:
    """DFT (Wu et al. 2025, arXiv 2508.05629, eq. 9): -sg(p_t) log p_t.

    The stop-gradient multiplier cancels SFT's implicit 1/p importance weight; the
    gradient is p_t times the NLL gradient (equal to that of 1 - p_t).
    """
    return Objective("dft", lambda logp, ctx: -logp.detach().exp() * logp)


def prob_power(alpha: float = 1.0) -> Objective:
    """The probability-power family of "Beyond Log Likelihood" (arXiv 2510.00526).

    f_alpha(p) = (1 - p^alpha) / alpha, gradient weight p^alpha w.r.t. the NLL gradient.
    alpha -> 0 recovers NLL; alpha = 1 has DFT's gradient (loss value 1 - p).
    """
    a = float(alpha)
    if a < 0:
        raise ValueError(f"prob_power: alpha must be >= 0, got {alpha}")
    if a == 0:
        return Objective("prob_power:alpha=0", lambda logp, ctx: -logp)
    return Objective(f"prob_power:alpha={a:g}", lambda logp, ctx: (1 - torch.exp(a * logp)) / a)


def thresholded(q: float = 0.2, normalize: str = "all") -> Objective:
    """Thresholded NLL ("Beyond Log Likelihood", arXiv 2510.00526): -log p * 1[p >= q].

    normalize="all" divides by every valid token (dropped ones count as zero loss);
    normalize="kept" rescales so the sum is divided by the kept tokens of this call
    (a per-call statistic, so under gradient accumulation it is per micro-batch).
    """
    if normalize not in ("all", "kept"):
        raise ValueError(f"thresholded: normalize must be 'all' or 'kept', got {normalize!r}")
    logq = torch.log(torch.tensor(float(q))).item() if q > 0 else float("-inf")

    def fn(logp: Tensor, ctx: TokenContext) -> Tensor:
        keep = (logp.detach() >= logq).to(logp.dtype)
        loss = -logp * keep
        if normalize == "kept":
            loss = loss * (logp.numel() / keep.sum().clamp_min(1.0))
        return loss

    return Objective(f"thresholded:q={q:g},normalize={normalize}", fn, batch_level=normalize == "kept")


def dft_clip(tau: float = 0.7) -> Objective:
    """DFT weight only below a threshold (GFT's "DCR"): weight sg(p) if p < tau, else 1."""
    logtau = float(torch.log(torch.tensor(float(tau))))

    def fn(logp: Tensor, ctx: TokenContext) -> Tensor:
        lp = logp.detach()
        w = torch.where(lp < logtau, lp.exp(), torch.ones_like(lp))
        return -w * logp

    return Objective(f"dft_clip:tau={tau:g}", fn)


def _per_sequence_mean(values: Tensor, seq_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` per sequence id: (means per present sequence, index per token)."""
    uniq, inv = torch.unique(seq_ids, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=values.dtype, device=values.device).index_add_(0, inv, values)
    counts = torch.zeros(len(uniq), dtype=values.dtype, device=values.device).index_add_(
        0, inv, torch.ones_like(values)
    )
    return sums / counts, inv


def talr(floor: float = 0.01) -> Objective:
    """TALR (arXiv 2509.20758): weight sg(max(p^(1/tau), floor)) on the NLL.

    tau is the batch median of per-sequence mean NLL (detached), so the sharper the
    model already is on this batch, the more low-probability tokens are damped.
    """

    def fn(logp: Tensor, ctx: TokenContext) -> Tensor:
        lp = logp.detach()
        seq_nll, _ = _per_sequence_mean(-lp, ctx.seq_ids)
        tau = seq_nll.median().clamp_min(1e-6)
        w = torch.exp(lp / tau).clamp_min(floor)
        return -w * logp

    return Objective(f"talr:floor={floor:g}", fn, batch_level=True)


def focal(gamma: float = 2.0) -> Objective:
    """Focal loss (Lin et al. 2017): -(1-p)^gamma log p, for contrast with DFT.

    It up-weights hard tokens (DFT does the opposite); its weight is NOT detached.
    """
    g = float(gamma)
    return Objective(f"focal:gamma={g:g}", lambda logp, ctx: -((1 - logp.exp()) ** g) * logp)


def iw_sft(level: str = "sequence", clip: float = 16.0, low: float = 0.2, high: float = 1.8) -> Objective:
    """Importance-weighted SFT (Qin & Springenberg 2025, arXiv 2507.12856).

    level="sequence": w = clamp(exp(mean_t[log pi - log pi_ref]), 0, clip) per sequence,
    detached, times the NLL. level="token": per-token ratio clipped to [low, high].
    The reference is the frozen initial model.
    """
    if level not in ("sequence", "token"):
        raise ValueError(f"iw_sft: level must be 'sequence' or 'token', got {level!r}")

    def fn(logp: Tensor, ctx: TokenContext) -> Tensor:
        if ctx.ref_logp is None:
            raise ValueError("iw_sft needs the reference model's log-probs (ref_hidden/ref_weight)")
        diff = logp.detach() - ctx.ref_logp
        if level == "sequence":
            seq_mean, inv = _per_sequence_mean(diff, ctx.seq_ids)
            w = seq_mean.exp().clamp(0.0, clip)[inv]
        else:
            w = diff.exp().clamp(low, high)
        return -w * logp

    name = f"iw_sft:level={level}"
    return Objective(name, fn, batch_level=level == "sequence", needs_ref=True)


def asft(lam: float = 0.05) -> Objective:
    """ASFT (arXiv 2509.23753): DFT + lam * KL(pi_ref || pi_theta) per token.

    The per-token function here is DFT's; ``token_loss`` adds the full-vocabulary KL
    term (value and gradient) chunk by chunk, so no full logits are ever held.
    """
    return Objective(f"asft:lam={lam:g}", dft().fn, needs_ref=True, kl_coef=float(lam))


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "nll": nll,
    "sft": nll,
    "dft": dft,
    "prob_power": prob_power,
    "thresholded": thresholded,
    "dft_clip": dft_clip,
    "talr": talr,
    "focal": focal,
    "iw_sft": iw_sft,
    "asft": asft,
}


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def get_objective(spec: str | Objective) -> Objective:
    """Resolve ``"name"`` or ``"name:key=value,key=value"`` to an Objective.

    >>> get_objective("prob_power:alpha=2").name
    'prob_power:alpha=2'
    """
    if isinstance(spec, Objective):
        return spec
    name, _, params = str(spec).partition(":")
    name = name.strip()
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    factory = OBJECTIVES[name]
    kwargs = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"objective {spec!r}: parameter {item!r} is not key=value")
        kwargs[key.strip()] = _parse_value(value.strip())
    allowed = inspect.signature(factory).parameters
    unknown = set(kwargs) - set(allowed)
    if unknown:
        raise ValueError(
            f"objective {name!r} has no parameter(s) {sorted(unknown)}; it takes {list(allowed) or 'none'}"
        )
    return factory(**kwargs)
