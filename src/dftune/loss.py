"""The fused LM-head + objective loss: ``token_loss``.

The full logits of a batch (tokens x vocabulary) dominate memory when fine-tuning:
8 x 2048 tokens at V=151,936 is ~10 GB per fp32 copy. ``token_loss`` takes the final
hidden states and the LM head instead, and walks over the tokens in chunks, so at most
``chunk_size x V`` logits exist at a time. Because every objective's gradient w.r.t. the
logits is known in closed form once its per-token weight is known,

    d loss / d z_t = g_t * (onehot(y_t) - softmax(z_t))  [+ lam * (softmax - ref) for ASFT]

with g_t = d loss / d log p_t, the chunked backend produces the gradients for hidden,
weight and bias in the forward pass itself (three matmuls per chunk, like Liger) and the
backward pass only scales them. Objectives whose per-token weight depends on other tokens
(TALR's batch median, iw-SFT's sequence means) take a first pass that only computes the
target log-probs, then a second pass for the gradients (four matmuls). Only the gradients
that are needed are built: none under ``torch.no_grad()`` (analysis), no weight gradient
for a frozen head (LoRA).

Precision. Log-softmax, p, the objective and every accumulated gradient are fp32, whatever
the input dtypes. The matmuls run in one compute dtype: under ``torch.autocast`` the
autocast dtype (bf16-mixed training: hidden states in bf16, the fp32 master head cast to
bf16 once per call, exactly the copy autocast itself would make); otherwise the promoted
dtype of hidden and weight (a bf16 hidden with an fp32 head is computed in fp32). The
weight gradient is accumulated in an fp32 (V, H) buffer without per-chunk (V, H)
temporaries (on CUDA a bf16 GEMM with fp32 output; on CPU an fp32 GEMM) and returned in
the head's own dtype (no copy for an fp32 master weight).

Extras computed only when the objective asks: the entropy of the top-K distribution
(EAFT; ``torch.topk`` over each chunk's fp32 log-softmax, O(chunk x K) more memory) and
the class of each target token (``protect=``; looked up in the (V,) ``token_class`` table).

Per-token weights. Every objective's gradient is w_t times the NLL gradient of token t,
w_t = -num_items * g_t (NLL: 1, DFT: p). ``LossResult.weight`` / ``weight_sum`` report it;
for ``norm=weight`` the training loop sums it over the step (all micro-batches and
processes) and calls ``normalize_gradients_`` after backward, which turns
sum_t f_t / N into the gradient of sum_t w_t * NLL_t / sum_t w_t exactly, with no extra
forward pass.

Backends: ``chunked`` (default, pure PyTorch, CPU and GPU; ``loss_chunked.py``), ``naive`` (materialises the
logits and uses autograd: the reference), ``cce`` (Apple's Cut Cross-Entropy) and
``liger`` (Liger's fused linear cross-entropy), the last two on CUDA only, exact by
default, their approximations as options (``cce:accum=bf16``, ``liger:compute=bf16``;
``loss_gpu.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dftune.loss_chunked import (
    ChunkedLoss,
    cast_to,
    compute_dtype,
    head_logits,
    objective_grad,
    token_context,
    topk_entropy,
)
from dftune.objective_spec import get_objective
from dftune.objectives import Objective

IGNORE_INDEX = -100
BACKENDS = ("chunked", "naive", "cce", "liger")
# Logits per chunk by default (tokens = this / V): 2^25 fp32 logits = 128 MiB per buffer,
# ~220 tokens at V=151,936. Measured on CPU (2 cores, H=896): 110-token chunks were 1.5x
# slower, 512-token chunks only 5% faster; a chunk holds about three such buffers at its peak.
DEFAULT_CHUNK_LOGITS = 1 << 25


@dataclass
class LossResult:
    """What ``token_loss`` returns.

    ``loss`` is the differentiable scalar sum(per-token objective) / num_items. The
    per-token tensors are detached fp32, shape (N,), zero where the label is ignored
    (NaN where the backend cannot compute the statistic).
    """

    loss: Tensor  # () scalar
    num_tokens: int  # valid tokens in this call
    mask: Tensor  # (N,) bool, valid tokens
    logp: Tensor  # (N,) log-prob of the target: NLL = -logp, p = exp(logp)
    entropy: Tensor  # (N,) entropy of the model's next-token distribution
    objective_sum: Tensor  # () detached sum of per-token objective values (KL term included)
    weight: Tensor  # (N,) per-token gradient weight w_t = -num_items * d loss / d logp_t (NLL: 1, DFT: p)
    weight_sum: Tensor  # () detached fp32 sum of ``weight`` over valid tokens (NaN if unknown)
    kl: Tensor | None = None  # (N,) KL(pi_ref || pi_theta) where a reference was given

    def sums(self) -> dict[str, float]:
        """Summed statistics over valid tokens, for logging (divide by ``num_tokens``)."""
        m = self.mask
        out = {
            "tokens": float(self.num_tokens),
            "objective": float(self.objective_sum),
            "nll": float(-self.logp[m].sum()),
            "prob": float(self.logp[m].exp().sum()),
            "entropy": float(self.entropy[m].sum()),
            "weight": float(self.weight_sum),
        }
        if self.kl is not None:
            out["kl_ref"] = float(self.kl[m].sum())
        return out


# FSDP2 and DDP find the tensors in a module's output by walking pytrees: a registered
# dataclass lets them see the loss inside LossResult (FSDP2's pre-backward hooks hang on it).
torch.utils._pytree.register_dataclass(LossResult)


def next_token_targets(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair each position with the token it predicts: ``x[:, i]`` with ``labels[:, i + 1]``.

    x (B, T, ...) -> (B*(T-1), ...); labels (B, T) -> (B*(T-1),). The one place the shift is
    written: the training loss, the HF/TRL loss function and the token analysis all use it,
    so they score the same tokens.
    """
    return x[:, :-1].reshape(-1, *x.shape[2:]), labels[:, 1:].reshape(-1)


def _check_inputs(hidden, weight, labels, bias, ref_hidden, ref_weight, seq_ids, token_class=None):
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be (N, H) and weight (V, H); got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be ({hidden.shape[0]},) to match hidden; got {tuple(labels.shape)}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"hidden and weight must be floating point; got {hidden.dtype} and {weight.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32); got {labels.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},); got {tuple(bias.shape)}")
    valid = labels != IGNORE_INDEX
    if valid.any():
        lo, hi = int(labels[valid].min()), int(labels[valid].max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"labels must be in [0, {weight.shape[0]}) or {IGNORE_INDEX}; found {lo}..{hi}")
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden and ref_weight go together")
    if ref_hidden is not None:
        if ref_hidden.shape[0] != hidden.shape[0] or ref_weight.shape[0] != weight.shape[0]:
            raise ValueError("the reference must cover the same tokens (N) and vocabulary (V)")
    if seq_ids is not None and seq_ids.shape != labels.shape:
        raise ValueError(f"seq_ids must be {tuple(labels.shape)}; got {tuple(seq_ids.shape)}")
    if token_class is not None and (token_class.shape != (weight.shape[0],) or token_class.is_floating_point()):
        raise ValueError(f"token_class must be an integer table of shape ({weight.shape[0]},) (one class per vocabulary "
                         f"id: dftune.vocab.token_classes(tokenizer, vocab_size={weight.shape[0]})); "
                         f"got {tuple(token_class.shape)} {token_class.dtype}")


def token_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    objective: str | Objective = "dft",
    *,
    bias: Tensor | None = None,
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "chunked",
    seq_ids: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    token_class: Tensor | None = None,
    entropy: bool = True,
) -> LossResult:
    """Per-token objective over an LM head without materialising the logits.

    hidden (N, H) final hidden states; weight (V, H) the LM head (bias (V,) optional);
    labels (N,) the already-shifted targets, -100 = ignored: hidden[i] predicts labels[i].
    num_items: the divisor (default: valid tokens here); the training loop passes the
    global count over accumulation micro-batches and data-parallel ranks.
    seq_ids (N,): sequence index of each token, for per-sequence statistics (TALR,
    iw-SFT); default: one sequence. ref_hidden/ref_weight/ref_bias: the frozen reference
    model's final hidden states and head, for iw_sft, asft, psft and KL logging.
    token_class (V,): integer class of every vocabulary id (``dftune.vocab.token_classes``),
    needed by objectives with ``protect=``.
    chunk_size: tokens per chunk (default: ``DEFAULT_CHUNK_LOGITS // V``).
    entropy: compute the per-token entropy (a statistic no objective needs; chunked backend).
    False reports it as NaN and saves a pass over each (c, V) chunk: measured at 8-12% of the
    loss's time in bf16-mixed on CPU (docs/benchmarks.md), so training computes it on logging
    steps only.
    """
    obj = get_objective(objective)
    name = backend.partition(":")[0]
    if name not in BACKENDS or (backend != name and name not in ("cce", "liger")):
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS} (cce and liger take options: "
                         "dftune.loss_gpu)")
    _check_inputs(hidden, weight, labels, bias, ref_hidden, ref_weight, seq_ids, token_class)
    if obj.needs_ref and ref_hidden is None:
        raise ValueError(f"objective {obj.name!r} needs a reference model (ref_hidden and ref_weight)")
    if obj.needs_classes and token_class is None:
        raise ValueError(f"objective {obj.name!r} needs token classes: pass token_class="
                         f"dftune.vocab.token_classes(tokenizer, vocab_size={weight.shape[0]})")
    n, vocab = hidden.shape[0], weight.shape[0]
    mask = labels != IGNORE_INDEX
    idx = mask.nonzero().squeeze(1)  # (M,)
    m = int(idx.numel())
    if num_items is None:
        num_items = m
    num_items = float(num_items.item() if isinstance(num_items, Tensor) else num_items)
    if num_items <= 0:
        num_items = 1.0  # nothing valid anywhere: loss 0, zero gradients
    if seq_ids is None:
        seq_ids = torch.zeros(n, dtype=torch.long, device=hidden.device)
    chunk = chunk_size or DEFAULT_CHUNK_LOGITS // vocab or 1
    cdtype = compute_dtype(hidden, weight)

    sel = dict(
        hidden=hidden[idx], labels=labels[idx], seq_ids=seq_ids[idx],
        ref_hidden=None if ref_hidden is None else ref_hidden[idx],
        token_class=None if token_class is None else token_class.to(labels.device)[labels[idx]].long(),
        topk=min(obj.topk, vocab),  # 0: no top-K entropy
        entropy=entropy,
    )
    if backend == "naive":
        with torch.autocast(hidden.device.type, enabled=False):  # the casts are explicit, in head_logits
            out = _naive(sel, weight, bias, ref_weight, ref_bias, obj, num_items, cdtype)
    elif backend == "chunked":
        out = ChunkedLoss.apply(sel["hidden"], weight, bias, sel, ref_weight, ref_bias, obj, num_items, chunk, cdtype,
                             torch.is_grad_enabled())
    else:
        from dftune import loss_gpu  # lazy: imports cut-cross-entropy / liger only here

        out = loss_gpu.run(backend, sel, weight, bias, ref_weight, ref_bias, obj, num_items, cdtype)
    loss, logp_v, ent_v, kl_v, obj_sum, w_v = out

    def scatter(v):
        full = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        return full.index_copy_(0, idx, v.detach().float())

    if m == 0:  # keep the graph connected so backward gives zero gradients, not None
        loss = loss + 0.0 * hidden.sum() + 0.0 * weight.sum()
    w = scatter(w_v)
    return LossResult(
        loss=loss, num_tokens=m, mask=mask, logp=scatter(logp_v), entropy=scatter(ent_v),
        objective_sum=obj_sum.detach(), weight=w, weight_sum=w_v.detach().float().sum(),
        kl=None if kl_v is None else scatter(kl_v),
    )


def _naive(sel, weight, bias, ref_weight, ref_bias, obj: Objective, num_items: float, cdtype: torch.dtype):
    """Reference backend: full logits + autograd. Memory O(N x V)."""
    logsm = head_logits(cast_to(sel["hidden"], cdtype), cast_to(weight, cdtype), bias).log_softmax(-1)  # (M, V)
    tgt = sel["labels"]
    logp = logsm.gather(1, tgt[:, None]).squeeze(1)  # (M,)
    ent = -(logsm.detach().exp() * logsm.detach()).sum(-1)
    topk_ent = topk_entropy(logsm.detach(), sel["topk"]) if sel["topk"] else None
    ref_lp, kl = None, None
    if ref_weight is not None:
        with torch.no_grad():
            ref_h, ref_w = cast_to(sel["ref_hidden"], cdtype), cast_to(ref_weight, cdtype)
            ref_logsm = head_logits(ref_h, ref_w, ref_bias).log_softmax(-1)
        ref_lp = ref_logsm.gather(1, tgt[:, None]).squeeze(1)
        kl = (ref_logsm.exp() * (ref_logsm - logsm)).sum(-1)  # (M,) differentiable
    ctx = token_context(sel, 0, None, ent, ref_lp, topk_ent)
    vals = obj(logp, ctx)
    total = vals.sum()
    if obj.kl_coef:
        total = total + obj.kl_coef * kl.sum()
    _, g = objective_grad(obj, logp, ctx, num_items)  # the per-token weights, by a tiny autograd
    return total / num_items, logp, ent, kl, total.detach(), -g * num_items


# ---- norm=weight: the step's gradient divided by the sum of weights, not the token count ------


def weight_normalizer(num_tokens: float, weight_sum: float) -> float:
    """The factor N / W that turns the gradient of sum_t f_t / N (what ``token_loss`` with the
    global ``num_items`` = N produces) into the gradient of sum_t w_t * NLL_t / W, W = sum_t w_t.

    Both are global over the optimizer step (every micro-batch, every process): N the
    valid target tokens (not divided by the world size), W the sum of
    ``LossResult.weight_sum``. W = 0 (every weight zero: no gradient from the objective)
    gives 1. A NaN W (a backend that cannot report weights) is an error.
    """
    num_tokens, weight_sum = float(num_tokens), float(weight_sum)
    if math.isnan(weight_sum):
        raise ValueError("the per-token weights are unknown (backend 'liger' with dft); use backend 'chunked' "
                         "for norm=weight")
    return num_tokens / weight_sum if weight_sum > 0 else 1.0


@torch.no_grad()
def normalize_gradients_(params, num_tokens: float, weight_sum: float) -> float:
    """Multiply every ``p.grad`` by ``weight_normalizer(num_tokens, weight_sum)`` in place;
    return the factor. Call it after the step's last backward and before clipping, for
    objectives with ``normalize == "weights"`` (``norm=weight``)."""
    factor = weight_normalizer(num_tokens, weight_sum)
    if factor != 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)
    return factor
