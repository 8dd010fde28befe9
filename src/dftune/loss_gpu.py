"""Optional CUDA backends for ``token_loss``: Cut Cross-Entropy and Liger.

Imported only when ``backend="cce"`` or ``"liger"`` is asked for, so that neither package
is needed otherwise (``pip install "dftune[gpu]"``).

What each supports (the rest raise a clear error):
- ``cce``: every objective whose per-token function needs only the target log-prob
  (nll, dft, prob_power, thresholded, dft_clip, talr, focal, chord_phi, psft, iw_sft,
  and ``protect=`` / ``norm=weight`` on any of them). CCE returns the per-token
  cross-entropy (reduction="none") with its own fused backward, and the objective is
  applied on top with autograd. No entropy (reported as NaN), no top-K entropy (so not
  eaft) and no full-vocabulary KL (so not asft).
- ``liger``: plain ``nll`` and ``dft`` only (Liger's ``use_token_scaling`` multiplies each
  token's CE by its detached probability, computed in the input dtype, bf16 in
  practice). It returns a summed loss only: per-token statistics are NaN, and so are the
  per-token weights of dft (so not with norm=weight).
"""

from __future__ import annotations

import torch

from dftune.objectives import Objective


def _need_cuda(backend: str, hidden: torch.Tensor) -> None:
    if not hidden.is_cuda:
        raise RuntimeError(f"backend {backend!r} runs on CUDA only; use backend='chunked' on {hidden.device}")


def run(backend, sel, weight, bias, ref_weight, ref_bias, obj: Objective, num_items: float):
    hidden, tgt = sel["hidden"], sel["labels"]
    _need_cuda(backend, hidden)
    nan = torch.full(tgt.shape, float("nan"), device=hidden.device)
    if backend == "cce":
        if obj.kl_coef:
            raise ValueError(f"backend 'cce' cannot compute {obj.name}'s full-vocabulary KL; use 'chunked'")
        if obj.topk:
            raise ValueError(f"backend 'cce' cannot compute {obj.name}'s top-K entropy; use 'chunked'")
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as e:
            raise ImportError("backend 'cce' needs cut-cross-entropy: pip install 'dftune[gpu]'") from e
        logp = -linear_cross_entropy(hidden, weight, tgt, bias=bias, reduction="none").float()  # (M,)
        ref_lp = None
        if ref_weight is not None:
            with torch.no_grad():
                ref_lp = -linear_cross_entropy(sel["ref_hidden"], ref_weight, tgt, bias=ref_bias, reduction="none").float()
        from dftune.loss_chunked import objective_grad, token_context

        ctx = token_context(sel, 0, None, None, ref_lp, None)
        vals = obj(logp, ctx)
        _, g = objective_grad(obj, logp, ctx, num_items)
        return vals.sum() / num_items, logp.detach(), nan, None, vals.sum().detach(), -g * num_items
    if backend == "liger":
        base = obj.name
        if base not in ("nll", "dft"):
            raise ValueError(f"backend 'liger' supports nll and dft only, not {base!r}; use 'chunked' or 'cce'")
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as e:
            raise ImportError("backend 'liger' needs liger-kernel: pip install 'dftune[gpu]'") from e
        fn = LigerFusedLinearCrossEntropyLoss(reduction="sum", use_token_scaling=base == "dft")
        total = fn(weight, hidden, tgt, bias)
        w = torch.ones_like(nan) if base == "nll" else nan  # dft's p is inside the kernel
        return total / num_items, nan, nan, None, total.detach(), w
    raise ValueError(f"unknown GPU backend {backend!r}")
