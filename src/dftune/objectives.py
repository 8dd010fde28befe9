"""Per-token training objectives: one contract for all of them.

Every objective is a function ``fn(logp, ctx) -> losses`` where ``logp`` (M,) is the
fp32 log-probability of each *valid* target token (masked tokens are already removed)
and ``ctx`` carries detached extras aligned with it (sequence ids, entropy, top-K
entropy, the reference model's log-prob, the target's token class). It returns the
per-token losses (M,). The caller sums them and divides by the global number of valid
tokens; gradients flow only through ``logp`` (and, for ``asft``, through the
full-vocabulary KL term that ``token_loss`` adds).

Names used in configs and on the command line: ``dft``, ``dft:floor=0.1``,
``dft:protect=special``, ``nll``, ``prob_power:alpha=2``, ``thresholded:q=0.2``,
``thresholded:pct=20,keep=bottom,loss=p``, ``dft_clip:tau=0.7``, ``talr``,
``focal:gamma=2``, ``eaft:k=20,alpha=1``, ``chord_phi``, ``psft:eps=0.2``, ``iw_sft``,
``iw_sft:level=token``, ``asft:lam=0.05``, ``auto``. Two parameters are accepted by every objective
(``objective_spec.GENERIC_PARAMS``): ``norm=weight`` (divide by the global sum of the
per-token weights instead of the token count) and ``protect=special`` (NLL on the named
token classes). The registry is the plain dict ``OBJECTIVES`` (name -> factory taking the
parameters as keyword arguments); ``objective_spec.get_objective`` turns a spec into an
``Objective`` and ``describe_objectives()`` lists them for ``--show``.

The per-token *weight* of an objective is w_t = -num_items * d loss / d log p_t: the
factor its gradient puts on the NLL gradient of token t (NLL: 1, DFT: p, prob_power:
p^alpha). ``token_loss`` reports it (``LossResult.weight``) for logging and for
``norm=weight``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dftune.errors import UserError


class ObjectiveError(UserError, ValueError):
    """A bad objective spec or parameter."""

@dataclass
class TokenContext:
    """Detached per-token extras, each (M,) and aligned with ``logp``."""

    seq_ids: Tensor  # (M,) int64: which sequence each token belongs to
    entropy: Tensor | None = None  # (M,) entropy of the model's distribution
    ref_logp: Tensor | None = None  # (M,) log-prob of the target under the reference
    # (M,) entropy of the model's top-K distribution (renormalised), divided by ln K: in [0, 1]
    # (K = Objective.topk, capped at the vocabulary size)
    topk_entropy: Tensor | None = None
    token_class: Tensor | None = None  # (M,) int64 class of the target token (dftune.vocab)




@dataclass(frozen=True)
class Objective:
    """A resolved objective: the per-token function and what it needs.

    batch_level: the loss of one token depends on other tokens (sequence means, batch
        medians, percentiles), so the fused loss must see every token before producing
        gradients.
    needs_ref: a reference model (the initial weights, or for psft a recent snapshot)
        must be supplied.
    kl_coef: weight of KL(pi_ref || pi_theta) over the full vocabulary, added per token
        by ``token_loss`` (ASFT).
    topk: > 0 when ``ctx.topk_entropy`` over the model's top-``topk`` tokens is needed
        (EAFT); ``token_loss`` computes it chunk by chunk only then.
    needs_classes: ``ctx.token_class`` is needed (``protect=``); pass ``token_class``
        (``dftune.vocab.token_classes``) to ``token_loss``.
    normalize: "tokens" (sum / global token count, the default) or "weights" (the
        training loop rescales the step's gradient by tokens / sum of weights:
        ``dftune.loss.normalize_gradients_``).
    protected: the token classes (``dftune.vocab`` ids) trained with NLL's weight whatever
        the objective does elsewhere (``protect=``, auto's special tokens): the training
        loop logs their share of the tokens and of the weight.
    follows: the statistic of the data under the current model that the objective follows
        (auto: "geo_p" or "mean_p", ``data_stats``); the training loop computes it every step.
    with_data_prob: for such objectives, given that statistic (global, detached), the
        objective for this step (``objective_spec.get_objective`` sets it).
    """

    name: str
    fn: Callable[[Tensor, TokenContext], Tensor]
    batch_level: bool = False
    needs_ref: bool = False
    kl_coef: float = 0.0
    topk: int = 0
    needs_classes: bool = False
    normalize: str = "tokens"
    protected: tuple[int, ...] = ()
    follows: str = ""
    with_data_prob: Callable[[float], Objective] | None = None

    def __call__(self, logp: Tensor, ctx: TokenContext) -> Tensor:
        return self.fn(logp, ctx)


def need(value, what: str, name: str):
    if value is None:
        raise ObjectiveError(f"objective {name!r} needs {what}; token_loss computes it when the objective asks "
                         "(other callers must fill that TokenContext field)")
    return value


def nll() -> Objective:
    """SFT: -log p(y*_t). The standard negative log-likelihood."""
    return Objective("nll", lambda logp, ctx: -logp)


def dft(floor: float = 0.0) -> Objective:
    """DFT (Wu et al. 2025, arXiv 2508.05629, eq. 9): -sg(p_t) log p_t.

    The stop-gradient multiplier cancels SFT's implicit 1/p importance weight; the
    gradient is p_t times the NLL gradient (equal to that of 1 - p_t).

    floor: weight max(sg(p_t), floor) instead: every token keeps at least ``floor`` of its
    NLL gradient. The DFT authors' suggested remedy when format or special tokens (which
    start at low probability) are never learned, e.g. ``dft:floor=0.1``.
    """
    f = float(floor)
    if not 0.0 <= f <= 1.0:
        raise ObjectiveError(f"dft: floor must be in [0, 1], got {floor}")
    if f == 0:
        return Objective("dft", lambda logp, ctx: -logp.detach().exp() * logp)
    return Objective(f"dft:floor={f:g}", lambda logp, ctx: -logp.detach().exp().clamp_min(f) * logp)


def prob_power(alpha: float = 1.0) -> Objective:
    """The probability-power family of "Beyond Log Likelihood" (arXiv 2510.00526).

    f_alpha(p) = (1 - p^alpha) / alpha, gradient weight p^alpha w.r.t. the NLL gradient.
    alpha -> 0 recovers NLL; alpha = 1 has DFT's gradient (loss value 1 - p).
    """
    a = float(alpha)
    if a < 0:
        raise ObjectiveError(f"prob_power: alpha must be >= 0, got {alpha}")
    if a == 0:
        return Objective("prob_power:alpha=0", lambda logp, ctx: -logp)
    return Objective(f"prob_power:alpha={a:g}", lambda logp, ctx: (1 - torch.exp(a * logp)) / a)


def _low_rank_mask(lp: Tensor, pct: float) -> Tensor:
    """True for the floor(pct/100 * M) tokens of lowest probability (ties broken by index)."""
    n_low = math.floor(pct / 100.0 * lp.numel() + 1e-9)
    low = torch.zeros_like(lp, dtype=torch.bool)
    if n_low:
        low[torch.sort(lp, stable=True).indices[:n_low]] = True
    return low


def thresholded(q: float | None = None, pct: float | None = None, keep: str = "top", loss: str = "nll",
                normalize: str = "all") -> Objective:
    """Thresholded objectives of "Beyond Log Likelihood" (arXiv 2510.00526, sec. 4 and fig. 5).

    keep="top": only tokens with p >= q train (the prior-leaning variant); keep="bottom":
    only tokens with p <= q. loss="nll": -log p on the kept tokens; loss="p": 1 - p on
    them (the paper's "-p" variant: gradient weight p). q defaults to 0.2.

    pct: the threshold as a percentile instead of a probability: the floor(pct% of M)
    lowest-probability tokens of the call are the "bottom", the rest the "top" (ranks, so
    a token exactly at the threshold cannot flip with rounding). It is computed over the
    tokens of one ``token_loss`` call (one micro-batch in training). The paper's scripts
    instead turn a percentile of the *base* model's token probabilities on the training
    data into a fixed q once: ``dftune probe`` reports those percentiles
    (``stats.p_percentiles``), to pass as ``q=``.

    normalize="all" divides by every valid token (dropped ones count as zero loss);
    normalize="kept" rescales so the sum is divided by the kept tokens of this call
    (a per-call statistic, so under gradient accumulation it is per micro-batch).
    """
    if normalize not in ("all", "kept"):
        raise ObjectiveError(f"thresholded: normalize must be 'all' or 'kept', got {normalize!r}")
    if keep not in ("top", "bottom"):
        raise ObjectiveError(f"thresholded: keep must be 'top' or 'bottom', got {keep!r}")
    if loss not in ("nll", "p"):
        raise ObjectiveError(f"thresholded: loss must be 'nll' or 'p', got {loss!r}")
    if q is not None and pct is not None:
        raise ObjectiveError("thresholded: give q (a probability) or pct (a percentile), not both")
    if pct is not None and not 0 <= pct <= 100:
        raise ObjectiveError(f"thresholded: pct must be in [0, 100], got {pct}")
    q = 0.2 if q is None and pct is None else q
    if q is not None and not 0 <= q <= 1:
        raise ObjectiveError(f"thresholded: q must be in [0, 1], got {q}")
    logq = None if q is None else (math.log(q) if q > 0 else float("-inf"))

    def fn(logp: Tensor, ctx: TokenContext) -> Tensor:
        lp = logp.detach()
        if pct is not None:
            low = _low_rank_mask(lp, pct)
            kept = ~low if keep == "top" else low
        else:
            kept = lp >= logq if keep == "top" else lp <= logq
        kept = kept.to(logp.dtype)
        vals = (-logp if loss == "nll" else 1 - logp.exp()) * kept
        if normalize == "kept":
            vals = vals * (logp.numel() / kept.sum().clamp_min(1.0))
        return vals

    where = f"q={q:g}" if pct is None else f"pct={pct:g}"
    name = f"thresholded:{where},keep={keep},loss={loss},normalize={normalize}"
    return Objective(name, fn, batch_level=normalize == "kept" or pct is not None)


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


def eaft(k: int = 20, alpha: float = 1.0) -> Objective:
    """EAFT, Entropy-Adaptive Fine-Tuning (Diao et al. 2026, arXiv 2601.02151):
    weight sg((H_topK / ln K)^alpha) on -log p.

    H_topK is the entropy of the model's next-token distribution restricted to its K most
    probable tokens and renormalised; dividing by ln K (its maximum) puts the weight in
    [0, 1]. Confident predictions (low entropy) are damped whether or not they agree with
    the target: the paper's "confident conflicts" (low p, low entropy) stop dominating the
    update, which is what protects general capabilities. K = 20 and alpha = 1 as in the
    paper. (LLaMA-Factory divides by the constant 3.0 ~ ln 20; we use ln K exactly, so the
    weight stays in [0, 1] for any K; K is capped at the vocabulary size.)
    """
    k, a = int(k), float(alpha)
    if k < 2:
        raise ObjectiveError(f"eaft: k must be >= 2 (the entropy of one token is 0), got {k}")
    if a < 0:
        raise ObjectiveError(f"eaft: alpha must be >= 0, got {alpha}")

    def fn(logp: Tensor, ctx: TokenContext) -> Tensor:
        h = need(ctx.topk_entropy, "the normalised top-K entropy (ctx.topk_entropy)", "eaft")
        w = h.detach().clamp(0.0, 1.0) ** a
        return -w * logp

    return Objective(f"eaft:k={k},alpha={a:g}", fn, topk=k)


def chord_phi() -> Objective:
    """CHORD's token weight (Zhang et al. 2025, arXiv 2508.11408): sg(p (1 - p)) on -log p.

    CHORD mixes this SFT term with GRPO under a decaying coefficient; here it is the SFT
    term alone. The weight vanishes at p -> 0 (like DFT: no chasing of tokens the model
    finds implausible) and at p -> 1 (unlike DFT: no sharpening of what is already known),
    peaking at p = 1/2.
    """

    def fn(logp: Tensor, ctx: TokenContext) -> Tensor:
        p = logp.detach().exp()
        return -(p * (1 - p)) * logp

    return Objective("chord_phi", fn)


def psft(eps: float = 0.2) -> Objective:
    """Proximal SFT (Zhu et al. 2025, arXiv 2508.17784): PPO's clipped surrogate with a
    constant advantage of 1 on the SFT data.

    loss_t = -min(r_t, clip(r_t, 1 - eps, 1 + eps)), r_t = pi_theta(y_t) / pi_old(y_t).
    With a positive advantage only the upper clip binds: the gradient is r_t times the NLL
    gradient while r_t <= 1 + eps, and zero once a token's probability has risen more than
    eps above pi_old's. pi_old comes from the reference (``ctx.ref_logp``): the paper
    refreshes it every batch and takes several updates per batch; with one update per
    batch and pi_old = the current weights, r = 1 and PSFT equals NLL. With a frozen
    initial reference it is a trust region around the base model (see docs/design.md).
    """
    e = float(eps)
    if not 0 < e:
        raise ObjectiveError(f"psft: eps must be > 0, got {eps}")

    def fn(logp: Tensor, ctx: TokenContext) -> Tensor:
        ref = need(ctx.ref_logp, "the old policy's log-probs (ref_hidden/ref_weight)", "psft")
        r = torch.exp(logp - ref)
        return -torch.minimum(r, r.clamp(1 - e, 1 + e))

    return Objective(f"psft:eps={e:g}", fn, needs_ref=True)


def iw_sft(level: str = "sequence", clip: float = 16.0, low: float = 0.2, high: float = 1.8) -> Objective:
    """Importance-weighted SFT (Qin & Springenberg 2025, arXiv 2507.12856).

    level="sequence": w = clamp(exp(mean_t[log pi - log pi_ref]), 0, clip) per sequence,
    detached, times the NLL. level="token": per-token ratio clipped to [low, high].
    The reference is the frozen initial model.
    """
    if level not in ("sequence", "token"):
        raise ObjectiveError(f"iw_sft: level must be 'sequence' or 'token', got {level!r}")

    def fn(logp: Tensor, ctx: TokenContext) -> Tensor:
        ref = need(ctx.ref_logp, "the reference model's log-probs (ref_hidden/ref_weight)", "iw_sft")
        diff = logp.detach() - ref
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


# "Beyond Log Likelihood" (arXiv 2510.00526, PAPER.md): a mean target probability under the
# model above ~0.5 favours prior-leaning objectives (DFT), below ~0.1 favours NLL. The
# literature's constants, not fitted to any dataset; the probe uses the same ones.
AUTO_LOW, AUTO_HIGH = 0.1, 0.5
# auto's statistic of the data, by its ``mean`` parameter: the key the training loop fills
# (``train.StepStats.data_stats``), over the tokens the exponent acts on (not the protected ones)
AUTO_MEANS = {"geometric": "geo_p", "arithmetic": "mean_p"}


def auto_exponent(data_prob: float) -> float:
    """auto's exponent a = clip((pbar - AUTO_LOW) / (AUTO_HIGH - AUTO_LOW), 0, 1): 0 (NLL)
    while the data's mean target probability pbar is at or below 0.1, 1 (DFT) from 0.5."""
    return min(max((float(data_prob) - AUTO_LOW) / (AUTO_HIGH - AUTO_LOW), 0.0), 1.0)


def data_stats(logp: Tensor) -> dict[str, float]:
    """The statistics auto can follow, of the target log-probs ``logp`` (M,): the arithmetic
    mean of p (``mean_p``) and the geometric one (``geo_p`` = exp(mean log p) = exp(-NLL))."""
    lp = logp.detach().double()
    if not lp.numel():
        return {"mean_p": 0.0, "geo_p": 0.0}
    return {"mean_p": float(lp.exp().mean()), "geo_p": float(lp.mean().exp())}


def auto(pbar: float | None = None, mean: str = "geometric", floor: float = 0.1) -> Objective:
    """auto: weight sg(max(p^a, 0.1)) on -log p, a = clip((pbar - 0.1) / 0.4, 0, 1) following the data's
    mean target p under the current model (NLL while it is low, DFT once it is high); NLL on special tokens.

    Weight sg(max(p_t^a, floor)) on -log p_t (the probability-power family of "Beyond Log
    Likelihood", arXiv 2510.00526: a = 0 is NLL, a = 1 DFT) with one exponent for all tokens, following
    the data: a = clip((pbar - 0.1) / 0.4, 0, 1), pbar the mean target probability of the
    training data under the *current* model (that paper's thresholds: below ~0.1 NLL wins,
    above ~0.5 prior-leaning objectives do). A weak prior starts as NLL and moves towards DFT
    as it learns the data; a strong prior is DFT from the first step. End-of-turn, EOS and
    template tokens (class ``special``) always get NLL's weight 1, so the model learns to
    stop whatever a is (the DFT authors' remedy for unlearned special tokens), and pbar is
    taken over the other tokens, those a acts on.

    mean: "geometric" (default): pbar = exp(mean log p) = exp(-NLL), the data's per-token
    likelihood (TALR, arXiv 2509.20758, also sets its exponent from the NLL): a share of
    tokens the model has never seen (p ~ 1e-6: a new layout, new words) pulls it down
    however well the rest is known. "arithmetic": the mean of p, the statistic that paper
    measured; a base that knows most tokens perfectly and a third not at all has a high
    arithmetic mean (docs/testbed.md: 0.60 on the weak base) and gets DFT's weighting.

    floor: weight max(p^a, floor) on the unprotected tokens, 0.1 by default (the DFT authors'
    floor, ``dft:floor=0.1``): every token keeps a tenth of its NLL gradient however far a has
    moved towards DFT, so tokens that stay unlikely once the rest is known are still learned
    slowly (docs/testbed.md: without it auto fell 2.8 points behind NLL at the weak prior on
    clean demonstrations). ``floor=0``: the pure probability-power weight.

    pbar: the training loop supplies it every step: the previous step's global statistic
    (all micro-batches and processes; before the first step, that step's own batch under the
    initial weights); the checkpoint keeps it. Left out (a direct ``token_loss`` call), it
    is computed from the call's own tokens, which makes the objective batch-level.
    """
    from dftune.vocab import SPECIAL

    if mean not in AUTO_MEANS:
        raise ObjectiveError(f"auto: mean must be one of {', '.join(AUTO_MEANS)}, got {mean!r}")
    if pbar is not None and not 0.0 <= float(pbar) <= 1.0:
        raise ObjectiveError(f"auto: pbar must be in [0, 1], got {pbar}")
    f = float(floor)
    if not 0.0 <= f <= 1.0:
        raise ObjectiveError(f"auto: floor must be in [0, 1], got {floor}")
    fixed = None if pbar is None else auto_exponent(pbar)

    def fn(logp: Tensor, ctx: TokenContext) -> Tensor:
        cls = need(ctx.token_class, "token classes (token_loss(..., token_class=dftune.vocab.token_classes(tok, V)))",
                   "auto")
        lp = logp.detach()
        special = cls == SPECIAL
        a = fixed if fixed is not None else auto_exponent(data_stats(lp[~special])[AUTO_MEANS[mean]])
        w = torch.where(special, torch.ones_like(lp), (a * lp).exp().clamp_min(f))  # p^a; special tokens: 1
        return -w * logp

    params = ([f"mean={mean}"] if mean != "geometric" else []) + ([f"floor={f:g}"] if f != 0.1 else [])
    name = "auto" + (":" + ",".join(params) if params else "")
    if pbar is not None:
        name += ("," if ":" in name else ":") + f"pbar={float(pbar)!r}"
    return Objective(name, fn, batch_level=pbar is None, needs_classes=True, protected=(SPECIAL,),
                     follows=AUTO_MEANS[mean])


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "nll": nll,
    "sft": nll,
    "dft": dft,
    "prob_power": prob_power,
    "thresholded": thresholded,
    "dft_clip": dft_clip,
    "talr": talr,
    "focal": focal,
    "eaft": eaft,
    "chord_phi": chord_phi,
    "psft": psft,
    "iw_sft": iw_sft,
    "asft": asft,
    "auto": auto,
}
