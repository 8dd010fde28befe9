"""The chunked backend of ``token_loss`` and the per-chunk pieces every backend shares.

``ChunkedLoss`` walks over the valid tokens ``chunk`` at a time: per chunk it builds the
(c, V) fp32 logits, the log-softmax and the softmax, asks the objective for each token's
value and its derivative g_t = d loss / d log p_t (a tiny autograd over (c,) log-probs),
and writes the gradients for hidden, weight and bias in the forward pass itself (the
closed form in ``dftune.loss``'s docstring, which also covers precision). Backward only
scales those buffers. ``dftune.loss`` holds the entry point (``token_loss``), the
reference backend and the checks; this module holds what runs per chunk.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dftune.objectives import Objective, TokenContext


def token_context(sel, s, e, ent, ref_lp, topk_ent) -> TokenContext:
    """The TokenContext of tokens s:e of ``sel`` (the valid tokens)."""
    cls = sel["token_class"]
    return TokenContext(seq_ids=sel["seq_ids"][s:e], entropy=ent, ref_logp=ref_lp, topk_entropy=topk_ent,
                        token_class=None if cls is None else cls[s:e])


def topk_entropy(logsm: Tensor, k: int) -> Tensor:
    """Entropy of the renormalised top-k distribution of each row of a (c, V) fp32
    log-softmax, divided by ln k: (c,) in [0, 1]. EAFT's H_topK / ln K."""
    top = torch.topk(logsm, k, dim=-1, sorted=False).values  # (c, k)
    top = top - torch.logsumexp(top, dim=-1, keepdim=True)
    return -(top.exp() * top).sum(-1) / math.log(k)


def compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: autocast's if it is on, else the promoted one."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def cast_to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def head_logits(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """(c, V) logits in fp32; the matmul in the dtype h and w already have (the compute dtype)."""
    z = h @ w.T if b is None else torch.addmm(b.to(h.dtype), h, w.T)
    return z.float()


def _accumulate_wgrad(gw: Tensor, gz32: Tensor, gz: Tensor, h: Tensor) -> None:
    """gw (V, H) fp32 += gz.T (V, c) @ h (c, H), with no (V, H) temporary.

    fp32 inputs: one fp32 GEMM into gw. Low-precision inputs on CUDA: the bf16/fp16 GEMM
    writes fp32 straight into gw (``out_dtype``, cuBLAS beta=1). Elsewhere (CPU has no such
    GEMM): the (c, V) fp32 chunk gradient and an fp32 copy of the (c, H) chunk.
    """
    if gz.dtype == torch.float32:
        gw.addmm_(gz.T, h)
    elif gw.is_cuda:
        torch.addmm(gw, gz.T, h, out_dtype=torch.float32, out=gw)
    else:
        gw.addmm_(gz32.T, h.float())


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """(c,) = sum_v a[i, v] * b[i, v] for (c, V) a, b: one batched kernel, no (c, V) product.
    (One BLAS dot per row was 4x faster on one idle CPU core, but 40x slower with two threads
    on a loaded machine: 1,500 small parallel regions per call. One kernel is predictable.)"""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _log_softmax_(z: Tensor) -> Tensor:
    """(c, V) fp32 logits -> log-softmax, in place (no second (c, V) buffer)."""
    return z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))


def _chunk_forward(h, w, b, tgt, ref_h, ref_w, ref_b, topk: int = 0, entropy: bool = True):
    """Statistics of one chunk. Returns (logp_t, entropy, ref_logp_t, kl, probs, ref_probs, topk_entropy).

    probs (c, V) is the softmax, kept for the gradient; ref_probs likewise. topk_entropy
    (c,) only when topk > 0; entropy NaN when not asked for.
    """
    z = _log_softmax_(head_logits(h, w, b))  # (c, V) fp32
    logp = z.gather(1, tgt[:, None]).squeeze(1)  # (c,)
    p = z.exp()  # (c, V)
    # entropy = -sum p log p, as row dot products: no (c, V) temporary
    ent = -_rowdot(p, z) if entropy else torch.full_like(logp, float("nan"))
    topk_ent = topk_entropy(z, topk) if topk else None
    ref_lp = kl = rp = None
    if ref_w is not None:
        # the same arithmetic as the model's: equal inputs (step 1) give equal bits, KL exactly 0
        rz = _log_softmax_(head_logits(ref_h, ref_w, ref_b))  # (c, V)
        ref_lp = rz.gather(1, tgt[:, None]).squeeze(1)
        rp = rz.exp()
        # KL(ref || p) = sum rp * (log rp - log p)
        kl = _rowdot(rp, rz) - _rowdot(rp, z)
    return logp, ent, ref_lp, kl, p, rp, topk_ent


def objective_grad(obj: Objective, logp: Tensor, ctx: TokenContext, num_items: float):
    """Per-token values and g = d(sum(values) / num_items) / d logp, via a tiny autograd."""
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(True)
        vals = obj(lp, ctx)
        (g,) = torch.autograd.grad(vals.sum() / num_items, lp, allow_unused=True)
    return vals.detach(), (torch.zeros_like(lp) if g is None else g)


class ChunkedLoss(torch.autograd.Function):
    """Chunked forward that also produces the gradients; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, sel, ref_weight, ref_bias, obj: Objective, num_items, chunk, cdtype,
                grad_mode: bool):
        with torch.autocast(hidden.device.type, enabled=False):  # every cast below is explicit
            return ChunkedLoss._forward(ctx, hidden, weight, bias, sel, ref_weight, ref_bias, obj, num_items, chunk,
                                        cdtype, grad_mode)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, sel, ref_weight, ref_bias, obj, num_items, chunk, cdtype, grad_mode):
        m = hidden.shape[0]
        # only what will be asked for: nothing under no_grad, no weight gradient for a frozen head
        want_h, want_w, want_b = (grad_mode and bool(x) for x in ctx.needs_input_grad[:3])
        want_b = want_b and bias is not None
        want_grad = want_h or want_w or want_b
        tgt, ref_h = sel["labels"], sel["ref_hidden"]
        has_ref = ref_weight is not None
        w_c, b_c = cast_to(weight, cdtype), cast_to(bias, cdtype)  # one (V, H) copy at most, as autocast makes
        rw_c = cast_to(ref_weight, cdtype) if has_ref else None
        logp = hidden.new_zeros(m, dtype=torch.float32)
        ent, ref_lp = torch.zeros_like(logp), torch.zeros_like(logp) if has_ref else None
        kl = torch.zeros_like(logp) if has_ref else None
        vals = torch.zeros_like(logp)
        w_all = torch.zeros_like(logp)  # per-token weights -g * num_items
        topk_ent = torch.zeros_like(logp) if sel["topk"] else None
        g_all = None
        gh = torch.empty_like(hidden) if want_h else None  # (M, H) in hidden's dtype
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None  # (V, H) fp32
        gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None  # (V,)
        kl_scale = obj.kl_coef / num_items
        spans = [(s, min(s + chunk, m)) for s in range(0, m, chunk)]

        def fwd(s, e):
            rh = None if ref_h is None else cast_to(ref_h[s:e], cdtype)
            return _chunk_forward(cast_to(hidden[s:e], cdtype), w_c, b_c, tgt[s:e], rh, rw_c, ref_bias, sel["topk"],
                                  sel["entropy"])

        if obj.batch_level:  # pass 1: statistics of every token, then the per-token weights
            for s, e in spans:
                out = fwd(s, e)
                logp[s:e], ent[s:e] = out[0], out[1]
                if has_ref:
                    ref_lp[s:e], kl[s:e] = out[2], out[3]
                if topk_ent is not None:
                    topk_ent[s:e] = out[6]
                del out
            vals, g_all = objective_grad(obj, logp, token_context(sel, 0, m, ent, ref_lp, topk_ent), num_items)
            w_all = -g_all * num_items
            if not want_grad:
                spans = []
        for s, e in spans:  # the (only or second) pass: gradients chunk by chunk
            lp_c, ent_c, rlp_c, kl_c, p, rp, tk_c = fwd(s, e)
            if g_all is None:
                logp[s:e], ent[s:e] = lp_c, ent_c
                if has_ref:
                    ref_lp[s:e], kl[s:e] = rlp_c, kl_c
                v, g = objective_grad(obj, lp_c, token_context(sel, s, e, ent_c, rlp_c, tk_c), num_items)
                vals[s:e] = v
                w_all[s:e] = -g * num_items
            else:
                g = g_all[s:e]
            if not want_grad:
                continue
            # grad_z = g * (onehot - p) + kl_scale * (p - rp), built in place in p: (c, V) fp32
            p.mul_((kl_scale - g)[:, None])
            if rp is not None and kl_scale:
                p.sub_(rp, alpha=kl_scale)
            p.scatter_add_(1, tgt[s:e, None], g[:, None])
            gz = p.to(cdtype)  # (c, V) in the compute dtype (no copy in fp32)
            if want_h:
                gh[s:e] = gz @ w_c
            if want_w:
                _accumulate_wgrad(gw, p, gz, cast_to(hidden[s:e], cdtype))
            if want_b:
                gb += p.sum(0)
            del p, rp, gz
        total = vals.sum() + (obj.kl_coef * kl.sum() if (has_ref and obj.kl_coef) else 0.0)
        ctx.save_for_backward(gh, gw, gb)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        loss = (total / num_items).to(torch.float32)
        ctx.mark_non_differentiable(logp, ent, total, w_all)
        if kl is not None:
            ctx.mark_non_differentiable(kl)
        return loss, logp, ent, kl, total, w_all

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        gh, gw, gb = ctx.saved_tensors
        wdt, bdt = ctx.dtypes
        # The buffers are scaled in place (no copy, no device sync to test grad_loss == 1:
        # with several processes grad_loss is the world size) and handed over; an fp32 head
        # receives its fp32 buffer itself. Backward through this graph runs once.
        grads = [None] * 11
        if gh is not None and ctx.needs_input_grad[0]:
            grads[0] = gh.mul_(grad_loss.to(gh.dtype))
        if gw is not None and ctx.needs_input_grad[1]:
            grads[1] = gw.mul_(grad_loss).to(wdt)
        if gb is not None and ctx.needs_input_grad[2]:
            grads[2] = gb.mul_(grad_loss).to(bdt)
        return tuple(grads)
