"""token_loss: chunked vs naive vs a float64 closed-form reference, for every objective."""

import math

import pytest
import torch

from dftune.loss import token_loss
from dftune.objective_spec import get_objective
from dftune.objectives import OBJECTIVES


# Each spec, with the closed form of its per-token loss in float64. `r.lp` are the valid
# tokens' target log-probs (with grad), `r.seq` their sequence ids, `r.ref` the reference's
# log-probs, `r.tk` the top-K entropy / ln K of the objective's K, `r.cls` the target's class.
def _seq_mean(x, seq):
    out = torch.zeros_like(x)
    for s in seq.unique():
        out[seq == s] = x[seq == s].mean()
    return out


def _p(r):
    return r.lp.detach().exp()


def _low_ranks(lp, pct):
    """The floor(pct% of M) lowest-probability tokens, by a float64 argsort."""
    n_low = math.floor(pct / 100 * lp.numel() + 1e-9)
    low = torch.zeros(lp.numel(), dtype=torch.bool)
    low[torch.argsort(lp.detach(), stable=True)[:n_low]] = True
    return low


def _auto_a(pbar):
    return min(max((float(pbar) - 0.1) / 0.4, 0.0), 1.0)


REFERENCE = {
    "nll": lambda r: -r.lp,
    "dft": lambda r: -_p(r) * r.lp,
    "dft:norm=weight": lambda r: -_p(r) * r.lp,  # the value is DFT's; the loop rescales the gradient
    "dft:floor=0.1": lambda r: -torch.clamp(_p(r), min=0.1) * r.lp,
    "dft:protect=special": lambda r: torch.where(r.cls == 1, -r.lp, -_p(r) * r.lp),
    "dft:floor=0.1,protect=special": lambda r: torch.where(r.cls == 1, -r.lp, -torch.clamp(_p(r), min=0.1) * r.lp),
    "prob_power:alpha=1,protect=special+number": lambda r: torch.where((r.cls == 1) | (r.cls == 2), -r.lp, 1 - r.lp.exp()),
    "prob_power:alpha=2": lambda r: (1 - r.lp.exp() ** 2) / 2,
    "prob_power:alpha=0.5": lambda r: (1 - r.lp.exp() ** 0.5) / 0.5,
    "thresholded:q=0.05": lambda r: -r.lp * (_p(r) >= 0.05),
    "thresholded:q=0.05,normalize=kept": lambda r: -r.lp * (_p(r) >= 0.05) * (r.lp.numel() / (_p(r) >= 0.05).sum().clamp_min(1)),
    "thresholded:q=0.05,keep=bottom": lambda r: -r.lp * (_p(r) <= 0.05),
    "thresholded:q=0.05,loss=p": lambda r: (1 - r.lp.exp()) * (_p(r) >= 0.05),
    "thresholded:pct=30": lambda r: -r.lp * ~_low_ranks(r.lp, 30),
    "thresholded:pct=30,keep=bottom,loss=p,normalize=kept": lambda r: (1 - r.lp.exp()) * _low_ranks(r.lp, 30)
    * (r.lp.numel() / _low_ranks(r.lp, 30).sum().clamp_min(1)),
    "dft_clip:tau=0.1": lambda r: -torch.where(_p(r) < 0.1, _p(r), 1.0) * r.lp,
    "talr": lambda r: -torch.clamp(
        _p(r) ** (1 / torch.stack([(-r.lp.detach()[r.seq == s]).mean() for s in r.seq.unique()]).median()), min=0.01
    ) * r.lp,
    "focal:gamma=2": lambda r: -(1 - r.lp.exp()) ** 2 * r.lp,
    "eaft:k=5": lambda r: -r.tk * r.lp,
    "eaft:k=8,alpha=2": lambda r: -r.tk ** 2 * r.lp,
    "chord_phi": lambda r: -(_p(r) * (1 - _p(r))) * r.lp,
    "psft:eps=0.2": lambda r: -torch.minimum((r.lp - r.ref).exp(), (r.lp - r.ref).exp().clamp(0.8, 1.2)),
    "iw_sft": lambda r: -torch.clamp(_seq_mean(r.lp.detach() - r.ref, r.seq).exp(), 0, 16) * r.lp,
    "iw_sft:level=token": lambda r: -torch.clamp((r.lp.detach() - r.ref).exp(), 0.2, 1.8) * r.lp,
    "asft:lam=0.3": lambda r: -_p(r) * r.lp,  # + KL term, added below
    # auto: weight max(p^a, 0.1), a = clip((pbar - 0.1) / 0.4, 0, 1); special tokens (class 1) NLL
    "auto:pbar=0.3": lambda r: torch.where(r.cls == 1, -r.lp, -torch.clamp(_p(r) ** 0.5, min=0.1) * r.lp),
    "auto:pbar=0.05": lambda r: -r.lp,
    "auto:pbar=0.95": lambda r: torch.where(r.cls == 1, -r.lp, -torch.clamp(_p(r), min=0.1) * r.lp),
    "auto:floor=0,pbar=0.95": lambda r: torch.where(r.cls == 1, -r.lp, -_p(r) * r.lp),
    "auto:pbar=0.2,norm=weight": lambda r: torch.where(r.cls == 1, -r.lp, -torch.clamp(_p(r) ** 0.25, min=0.1) * r.lp),
    # no pbar given: from the call's own tokens other than the special ones (batch-level);
    # geometric mean exp(mean log p) by default, arithmetic mean of p with mean=arithmetic
    "auto": lambda r: torch.where(r.cls == 1, -r.lp, -torch.clamp(
        _p(r) ** _auto_a(r.lp.detach()[r.cls != 1].mean().exp()), min=0.1) * r.lp),
    "auto:mean=arithmetic,floor=0": lambda r: torch.where(r.cls == 1, -r.lp,
                                                           -_p(r) ** _auto_a(_p(r)[r.cls != 1].mean()) * r.lp),
    "auto:mean=arithmetic,pbar=0.4": lambda r: torch.where(r.cls == 1, -r.lp, -torch.clamp(_p(r) ** 0.75, min=0.1) * r.lp),
}


def test_every_registered_objective_has_a_reference():
    covered = {spec.split(":")[0] for spec in REFERENCE}
    assert covered >= set(OBJECTIVES) - {"sft"}


def _problem(n, h, v, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 0.7).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.7).to(dtype)
    b = (torch.randn(v, generator=g) * 0.3).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100
    seq = torch.arange(n) // 7
    ref_h = (hidden.double() + 0.3 * torch.randn(n, h, generator=g, dtype=torch.float64)).to(dtype)
    ref_w = (weight.double() + 0.3 * torch.randn(v, h, generator=g, dtype=torch.float64)).to(dtype)
    return hidden, weight, b, labels, seq, ref_h, ref_w


def _classes(v, seed=0):
    """A (V,) class table: ids in 0..3 (content, special, number, punct)."""
    return torch.randint(0, 4, (v,), generator=torch.Generator().manual_seed(seed + 100))


def _topk_entropy64(logsm, k):
    k = min(k, logsm.shape[-1])
    top = logsm.topk(k, dim=-1).values
    top = top - top.logsumexp(-1, keepdim=True)
    return -(top.exp() * top).sum(-1) / math.log(k)


class _Tokens:
    def __init__(self, lp, seq, ref, tk, cls):
        self.lp, self.seq, self.ref, self.tk, self.cls = lp, seq, ref, tk, cls


def _reference(spec, hidden, weight, b, labels, seq, ref_h, ref_w, *, weights=False):
    """float64 loss and gradients, from the full logits and the closed form (and, with
    weights=True, the per-token weights -M * d loss / d logp)."""
    h = hidden.detach().to(torch.float64, copy=True).requires_grad_(True)
    w = weight.detach().to(torch.float64, copy=True).requires_grad_(True)
    bb = None if b is None else b.detach().to(torch.float64, copy=True).requires_grad_(True)
    z = h @ w.T + (0 if bb is None else bb)
    logsm = z.log_softmax(-1)
    m = labels != -100
    lp = logsm[m].gather(1, labels[m][:, None]).squeeze(1)
    if weights:
        lp = lp.detach().requires_grad_(True)
    ref_logsm = (ref_h.double() @ ref_w.double().T + (0 if b is None else b.double())).log_softmax(-1)
    ref_lp = ref_logsm[m].gather(1, labels[m][:, None]).squeeze(1)
    k = get_objective(spec).topk
    tk = _topk_entropy64(logsm[m].detach(), k) if k else None
    vals = REFERENCE[spec](_Tokens(lp, seq[m], ref_lp, tk, _classes(weight.shape[0])[labels[m]]))
    total = vals.sum()
    if spec.startswith("asft"):
        total = total + 0.3 * (ref_logsm[m].exp() * (ref_logsm[m] - logsm[m])).sum()
    loss = total / max(int(m.sum()), 1)
    if weights:
        (g,) = torch.autograd.grad(vals.sum(), lp)
        return -g
    loss.backward()
    return loss.detach(), h.grad, w.grad, None if bb is None else bb.grad


def _ours(spec, backend, hidden, weight, b, labels, seq, ref_h, ref_w, chunk):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    bb = None if b is None else b.clone().requires_grad_(True)
    ref_b = None if b is None else b
    r = token_loss(h, w, labels, spec, bias=bb, backend=backend, chunk_size=chunk, seq_ids=seq,
                   ref_hidden=ref_h, ref_weight=ref_w, ref_bias=ref_b, token_class=_classes(weight.shape[0]))
    r.loss.backward()
    return r, h.grad, w.grad, None if bb is None else bb.grad


@pytest.mark.parametrize("spec", sorted(REFERENCE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 16, 50, 8), (64, 24, 97, 16), (5, 8, 30, 64)])
def test_chunked_and_naive_match_float64(spec, dtype, shape):
    n, hdim, v, chunk = shape
    prob = _problem(n, hdim, v, dtype, bias=(n != 64))
    ref = _reference(spec, *prob)
    # bf16 inputs: the matmuls run in bf16 (as the model's head would), log-softmax in fp32
    tol = dict(rtol=2e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=3e-2)
    for backend in ("chunked", "naive"):
        r, gh, gw, gb = _ours(spec, backend, *prob, chunk)
        assert torch.isfinite(r.loss)
        torch.testing.assert_close(r.loss.double(), ref[0], **tol)
        for ours, want in zip((gh, gw, gb), ref[1:]):
            if ours is None:
                continue
            scale = max(want.abs().max().item(), 1e-6)  # compare gradients relative to their size
            torch.testing.assert_close(ours.double() / scale, want / scale, **tol)


@pytest.mark.parametrize("spec", sorted(REFERENCE))
def test_chunked_equals_naive_closely_in_fp32(spec):
    prob = _problem(53, 16, 71, torch.float32, seed=3)
    a = _ours(spec, "naive", *prob, 10)
    b = _ours(spec, "chunked", *prob, 10)
    torch.testing.assert_close(a[0].loss, b[0].loss, rtol=1e-5, atol=1e-7)
    for x, y in zip(a[1:], b[1:]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(a[0].logp, b[0].logp)
    torch.testing.assert_close(a[0].entropy, b[0].entropy, rtol=1e-5, atol=1e-5)


def test_dft_on_uniform_logits_is_ce_over_v():
    n, h, v = 12, 4, 40
    hidden = torch.zeros(n, h, requires_grad=True)
    weight = torch.randn(v, h)
    labels = torch.randint(0, v, (n,))
    for backend in ("chunked", "naive"):
        dft = token_loss(hidden, weight, labels, "dft", backend=backend).loss
        nll = token_loss(hidden, weight, labels, "nll", backend=backend).loss
        assert math.isclose(nll.item(), math.log(v), rel_tol=1e-6)
        assert math.isclose(dft.item(), math.log(v) / v, rel_tol=1e-6)


def test_dft_gradient_is_p_times_nll_gradient_per_token():
    hidden, weight, b, labels, *_ = _problem(9, 8, 20, torch.float64, seed=5, bias=False)
    labels = labels.clamp_min(0)  # no masking: one token at a time
    for i in range(9):
        lab = torch.full_like(labels, -100)
        lab[i] = labels[i]
        grads = {}
        for spec in ("dft", "nll"):
            h = hidden.clone().requires_grad_(True)
            r = token_loss(h, weight, lab, spec)
            r.loss.backward()
            grads[spec] = h.grad[i]
            p = r.logp[i].exp().double()
        torch.testing.assert_close(grads["dft"], p * grads["nll"])


def test_prob_power_alpha_1_has_dfts_gradient_and_alpha_0_is_nll():
    prob = _problem(30, 8, 25, torch.float64, seed=7)
    g = {s: _ours(s, "chunked", *prob, 7) for s in ("dft", "prob_power:alpha=1", "nll", "prob_power:alpha=0")}
    for x, y in zip(g["dft"][1:], g["prob_power:alpha=1"][1:]):
        torch.testing.assert_close(x, y)
    for x, y in zip(g["nll"][1:], g["prob_power:alpha=0"][1:]):
        torch.testing.assert_close(x, y)
    # the reported value of prob_power(1) is 1 - p, DFT's is -p log p
    p = g["dft"][0].logp[g["dft"][0].mask].exp()
    torch.testing.assert_close(g["prob_power:alpha=1"][0].loss, (1 - p).mean())


def test_focal_matches_its_formula_and_is_not_detached():
    prob = _problem(20, 8, 25, torch.float64, seed=8, bias=False)
    r, gh, *_ = _ours("focal:gamma=2", "chunked", *prob, 6)
    p = r.logp[r.mask].exp()
    torch.testing.assert_close(r.loss, (-(1 - p) ** 2 * p.log()).mean())
    # a detached-weight version would have a different gradient
    _, gh_det, *_ = _ours("dft", "chunked", *prob, 6)
    assert not torch.allclose(gh, gh_det)


def test_gradient_accumulation_with_global_num_items_equals_one_big_batch():
    hidden, weight, b, labels, seq, rh, rw = _problem(60, 8, 33, torch.float64, seed=11)
    total = int((labels != -100).sum())
    for spec in ("dft", "nll", "focal:gamma=2", "asft"):
        w_big = weight.clone().requires_grad_(True)
        h_big = hidden.clone().requires_grad_(True)
        token_loss(h_big, w_big, labels, spec, ref_hidden=rh, ref_weight=rw).loss.backward()
        w_acc = weight.clone().requires_grad_(True)
        h_acc = hidden.clone().requires_grad_(True)
        for s in range(0, 60, 17):  # uneven micro-batches
            r = token_loss(h_acc[s:s + 17], w_acc, labels[s:s + 17], spec, num_items=total,
                           ref_hidden=rh[s:s + 17], ref_weight=rw, chunk_size=5)
            r.loss.backward()
        torch.testing.assert_close(w_acc.grad, w_big.grad)
        torch.testing.assert_close(h_acc.grad, h_big.grad)


@pytest.mark.parametrize("backend", ["chunked", "naive"])
def test_all_masked_gives_zero_loss_and_zero_gradients(backend):
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(10, 4, requires_grad=True)
    r = token_loss(h, w, torch.full((6,), -100), "talr", backend=backend)
    r.loss.backward()
    assert r.loss.item() == 0.0 and r.num_tokens == 0
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
    assert not torch.isnan(r.logp).any()


def test_statistics_match_float64():
    hidden, weight, b, labels, *_ = _problem(25, 8, 19, torch.float32, seed=2)
    r = token_loss(hidden, weight, labels, "dft", bias=b, chunk_size=4)
    z = (hidden.double() @ weight.double().T + b.double()).log_softmax(-1)
    m = labels != -100
    torch.testing.assert_close(r.logp[m].double(), z[m].gather(1, labels[m][:, None]).squeeze(1), rtol=1e-5, atol=1e-5)
    ent = -(z.exp() * z).sum(-1)
    torch.testing.assert_close(r.entropy[m].double(), ent[m], rtol=1e-5, atol=1e-5)
    s = r.sums()
    assert s["tokens"] == int(m.sum())
    assert math.isclose(s["nll"], float(-z[m].gather(1, labels[m][:, None]).sum()), rel_tol=1e-5)
    # entropy=False: the same loss and gradients, only the statistic is skipped (NaN)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    r1 = token_loss(h1, w1, labels, "dft", bias=b, chunk_size=4)
    r2 = token_loss(h2, w2, labels, "dft", bias=b, chunk_size=4, entropy=False)
    r1.loss.backward()
    r2.loss.backward()
    assert torch.equal(r1.loss, r2.loss) and torch.equal(h1.grad, h2.grad) and torch.equal(w1.grad, w2.grad)
    assert torch.isnan(r2.entropy[m]).all() and torch.equal(r1.logp, r2.logp)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(9, 5), labels=torch.zeros(4, dtype=torch.long)), "hidden size"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(9, 3), labels=torch.zeros(5, dtype=torch.long)), "labels must be"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(9, 3), labels=torch.zeros(4)), "int64"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(9, 3), labels=torch.tensor([0, 1, 9, -100])), r"\[0, 9\)"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(9, 3), labels=torch.zeros(4, dtype=torch.long), objective="iw_sft"), "reference"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(9, 3), labels=torch.zeros(4, dtype=torch.long), backend="fast"), "unknown backend"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(9, 3), labels=torch.zeros(4, dtype=torch.long), backend="cce"), "CUDA"),
    ],
)
def test_bad_input_gives_clear_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        token_loss(**kwargs)


@pytest.mark.parametrize(
    "spec, match",
    [("dtf", "unknown objective"), ("prob_power:beta=2", "no parameter"), ("prob_power:2", "key=value"),
     ("thresholded:normalize=some", "normalize"), ("prob_power:alpha=-1", "alpha"),
     ("dft:floor=2", "floor"), ("dft:protect=eos", "token classes are"), ("dft:protect=", "token classes are"),
     ("dft:norm=weights", "norm must be"), ("dft:floor=0.1,floor=0.2", "given twice"),
     ("prob_power:alpha=0->1", "ramp"), ("prob_power:alpha=0-", "ramp"), ("eaft:k=1", "k must be"),
     ("thresholded:q=0.2,pct=10", "not both"), ("thresholded:pct=120", "pct"), ("thresholded:keep=middle", "keep"),
     ("thresholded:loss=logp", "loss"), ("psft:eps=0", "eps"), ("chord_phi:alpha=1", "no parameter")],
)
def test_bad_objective_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        get_objective(spec)


def test_spec_parsing():
    assert get_objective("prob_power:alpha=2").name == "prob_power:alpha=2"
    assert get_objective("thresholded: q=0.2, normalize=kept").batch_level
    assert get_objective("asft").kl_coef == 0.05
    assert get_objective("iw_sft").needs_ref and get_objective("iw_sft").batch_level


# ---- precision: what bf16-mixed training relies on -------------------------------------------


def _exact_bf16_problem(n=24, h=16, v=40, seed=0):
    """hidden in {-1,0,1}/8 and weight in {-1,0,1}/4: every logit is k/32 with |k| <= 16,
    exact in bf16 whatever the GEMM's summation order, so a float64 reference of the same
    logits is exact and only the softmax precision is under test."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randint(-1, 2, (n, h), generator=g) / 8).to(torch.bfloat16)
    weight = (torch.randint(-1, 2, (v, h), generator=g) / 4).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, labels


@pytest.mark.parametrize("backend", ["chunked", "naive"])
def test_bf16_inputs_give_fp32_probabilities(backend):
    hidden, weight, labels = _exact_bf16_problem()
    r = token_loss(hidden, weight, labels, "dft", backend=backend, chunk_size=5)
    z = (hidden.double() @ weight.double().T).log_softmax(-1)
    want = z.gather(1, labels[:, None]).squeeze(1)
    # fp32 log-softmax: ~1e-7 relative; a bf16 softmax (8-bit mantissa) would be off by ~1e-2
    torch.testing.assert_close(r.logp.double(), want, rtol=0, atol=2e-6)
    assert r.logp.dtype == torch.float32
    p = want.exp()
    assert r.loss.item() == pytest.approx(float((-p * want).mean()), rel=1e-5)


def test_bf16_hidden_with_fp32_head_under_autocast_and_outside_it():
    """bf16-mixed: the decoder's bf16 hidden states meet the fp32 master head."""
    hidden, weight, labels = _exact_bf16_problem(seed=1)
    w32 = weight.float().requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = token_loss(h, w32, labels, "dft", chunk_size=7)
    r.loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w32.grad.dtype == torch.float32
    ref = _reference("dft", hidden, weight, None, labels, torch.zeros_like(labels), hidden, weight)
    torch.testing.assert_close(r.loss.double(), ref[0], rtol=1e-5, atol=1e-7)
    # weight gradient accumulated in fp32 from bf16 chunk gradients: bf16 rounding of g only
    torch.testing.assert_close(w32.grad.double(), ref[2], rtol=2e-2, atol=2e-4)
    # outside autocast, mixed dtypes are promoted: an fp32 computation, fp32-accurate
    w32.grad = None
    r2 = token_loss(hidden, w32, labels, "dft", chunk_size=7)
    r2.loss.backward()
    torch.testing.assert_close(w32.grad.double(), ref[2], rtol=1e-4, atol=1e-7)


def _matmul_count(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    # GEMMs over the vocabulary: aten::mm (h @ W.T, gz @ W) and aten::addmm_ (the weight
    # gradient); the entropy's per-row dot products are bmm and not counted
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))


def test_only_the_gradients_asked_for_are_computed():
    hidden, weight, b, labels, *_ = _problem(40, 8, 30, torch.float32, seed=4, bias=False)
    chunks = 4  # 28 valid tokens (of 40) in chunks of 8
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)

    def run(hh, ww):
        return token_loss(hh, ww, labels, "dft", chunk_size=8)

    with torch.no_grad():  # analysis: logits only, one matmul per chunk, nothing saved
        n_nograd = _matmul_count(lambda: run(h, w))
        r = run(h, w)
    assert r.loss.grad_fn is None
    n_both = _matmul_count(lambda: run(h, w))
    n_frozen_head = _matmul_count(lambda: run(h, weight))  # LoRA: the head is frozen
    r = run(h, weight)
    gh, gw, gb = r.loss.grad_fn.saved_tensors
    assert gw is None and gb is None and gh is not None  # no (V, H) buffer for a frozen head
    n_chunks = -(-int((labels != -100).sum()) // 8)
    assert n_chunks == chunks
    assert (n_nograd, n_frozen_head, n_both) == (n_chunks, 2 * n_chunks, 3 * n_chunks)


def test_backward_scales_in_place_for_any_grad_output():
    """With several processes the loss is scaled before backward: the gradient follows."""
    hidden, weight, b, labels, *_ = _problem(20, 8, 30, torch.float32, seed=6)
    grads = []
    for scale in (1.0, 3.0):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        bb = b.clone().requires_grad_(True)
        (token_loss(h, w, labels, "dft", bias=bb).loss * scale).backward()
        grads.append((h.grad, w.grad, bb.grad))
    for one, three in zip(*grads):
        torch.testing.assert_close(three, 3 * one)


# ---- per-token weights and norm=weight ---------------------------------------------------------


@pytest.mark.parametrize("spec", sorted(REFERENCE))
@pytest.mark.parametrize("backend", ["chunked", "naive"])
def test_per_token_weights_match_float64(spec, backend):
    """LossResult.weight is -M * d loss / d logp: the factor on each token's NLL gradient."""
    prob = _problem(41, 8, 37, torch.float32, seed=9)
    r, *_ = _ours(spec, backend, *prob, 6)
    want = _reference(spec, *prob, weights=True)
    m = r.mask
    torch.testing.assert_close(r.weight[m].double(), want, rtol=1e-4, atol=1e-6)
    assert torch.all(r.weight[~m] == 0)
    torch.testing.assert_close(r.weight_sum.double(), want.sum(), rtol=1e-4, atol=1e-5)
    assert r.sums()["weight"] == pytest.approx(float(want.sum()), rel=1e-4)


def test_weights_of_the_simple_objectives_are_their_formulas():
    prob = _problem(30, 8, 25, torch.float64, seed=10)
    r = {s: _ours(s, "chunked", *prob, 7)[0] for s in ("nll", "dft", "prob_power:alpha=2", "chord_phi")}
    m = r["nll"].mask
    p = r["nll"].logp[m].exp()
    torch.testing.assert_close(r["nll"].weight[m], torch.ones_like(p))
    torch.testing.assert_close(r["dft"].weight[m], p)
    torch.testing.assert_close(r["prob_power:alpha=2"].weight[m], p ** 2)
    torch.testing.assert_close(r["chord_phi"].weight[m], p * (1 - p))


NORM_SPECS = ["dft:norm=weight", "prob_power:alpha=2,norm=weight", "chord_phi:norm=weight", "eaft:k=5,norm=weight",
              "dft:floor=0.1,protect=special,norm=weight", "nll:norm=weight"]


@pytest.mark.parametrize("spec", NORM_SPECS)
def test_weight_normalisation_over_uneven_micro_batches_equals_float64(spec):
    """Accumulate token_loss over uneven slices with the global num_items, then rescale by
    N / sum(w): the gradient of sum_t w_t * NLL_t / sum_t w_t over one big batch."""
    from dftune.loss import normalize_gradients_

    obj = get_objective(spec)
    assert obj.normalize == "weights" and obj.name.endswith("norm=weight")
    hidden, weight, b, labels, seq, rh, rw = _problem(60, 8, 33, torch.float64, seed=11)
    classes = _classes(33)
    total = int((labels != -100).sum())
    # float64 reference: detached weights (from the closed form), one batch
    base = spec.replace(":norm=weight", "").replace(",norm=weight", "")
    w_ref = _reference(base, hidden, weight, b, labels, seq, rh, rw, weights=True)
    h64, w64 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    m = labels != -100
    lp = (h64 @ w64.T + b).log_softmax(-1)[m].gather(1, labels[m][:, None]).squeeze(1)
    ((w_ref * -lp).sum() / w_ref.sum()).backward()
    # ours: uneven micro-batches, weights summed over them, one rescale
    h_acc, w_acc = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    wsum = 0.0
    for s in range(0, 60, 17):
        r = token_loss(h_acc[s:s + 17], w_acc, labels[s:s + 17], spec, bias=b, num_items=total, chunk_size=5,
                       token_class=classes)
        r.loss.backward()
        wsum += float(r.weight_sum)
    factor = normalize_gradients_([h_acc, w_acc], total, wsum)
    assert factor == pytest.approx(total / float(w_ref.sum()))
    torch.testing.assert_close(w_acc.grad, w64.grad)
    torch.testing.assert_close(h_acc.grad, h64.grad)


def test_weight_normalizer_edge_cases():
    from dftune.loss import normalize_gradients_, weight_normalizer

    assert weight_normalizer(100, 25.0) == 4.0
    assert weight_normalizer(100, 0.0) == 1.0  # nothing to rescale: the objective gave no gradient
    with pytest.raises(ValueError, match="weights are unknown"):
        weight_normalizer(100, float("nan"))
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(2))  # no grad: left alone
    p.grad = torch.full((3,), 2.0)
    assert normalize_gradients_([p, q], 10, 5) == 2.0
    assert torch.equal(p.grad, torch.full((3,), 4.0)) and q.grad is None


# ---- the newer objectives' defining properties --------------------------------------------------


def test_eaft_topk_entropy_weight_is_one_on_flat_and_zero_on_confident_predictions():
    v, h = 40, 4
    weight = torch.randn(v, h, dtype=torch.float64)
    flat = torch.zeros(3, h, dtype=torch.float64)  # every logit 0: top-K uniform, H = ln K, weight 1
    labels = torch.tensor([0, 1, 2])
    for backend in ("chunked", "naive"):
        r = token_loss(flat, weight, labels, "eaft:k=20", backend=backend)
        torch.testing.assert_close(r.weight, torch.ones(3, dtype=torch.float32))
    # a confident row: one logit far above the rest -> top-K entropy ~ 0 -> weight ~ 0
    w_id = torch.eye(v, h, dtype=torch.float64)
    confident = torch.zeros(2, h, dtype=torch.float64)
    confident[:, 0] = 60.0
    r = token_loss(confident, w_id, torch.tensor([1, 0]), "eaft", backend="chunked")
    assert float(r.weight.max()) < 1e-6  # the conflicting token 1 (p ~ 0) gets no push either
    # K above the vocabulary size is capped at V: uniform still gives weight 1
    r = token_loss(flat, weight, labels, "eaft:k=1000", chunk_size=2)
    torch.testing.assert_close(r.weight, torch.ones(3, dtype=torch.float32))


def test_thresholded_percentile_is_by_rank_within_the_call():
    # logits chosen so that the target probabilities are increasing with the token index
    hidden = torch.linspace(-3, 3, 10, dtype=torch.float64)[:, None]
    weight = torch.tensor([[1.0], [0.0], [0.0], [0.0], [0.0], [0.0]], dtype=torch.float64)
    labels = torch.zeros(10, dtype=torch.long)
    top = token_loss(hidden, weight, labels, "thresholded:pct=30")
    bottom = token_loss(hidden, weight, labels, "thresholded:pct=30,keep=bottom")
    assert torch.all(top.logp[:-1] < top.logp[1:])
    assert top.weight.tolist() == [0.0] * 3 + [1.0] * 7  # the 3 lowest (floor(30% of 10)) dropped
    assert bottom.weight.tolist() == [1.0] * 3 + [0.0] * 7
    # loss=p on the kept tokens: weight p there
    r = token_loss(hidden, weight, labels, "thresholded:pct=30,loss=p")
    torch.testing.assert_close(r.weight[3:], r.logp[3:].exp())
    assert get_objective("thresholded:pct=30").batch_level


def test_psft_is_nll_when_the_old_policy_is_the_current_one_and_stops_above_the_clip():
    hidden, weight, b, labels, *_ = _problem(30, 8, 25, torch.float64, seed=12)
    g = {}
    for spec in ("nll", "psft"):
        h = hidden.clone().requires_grad_(True)
        r = token_loss(h, weight, labels, spec, bias=b, ref_hidden=hidden, ref_weight=weight, ref_bias=b)
        r.loss.backward()
        g[spec] = h.grad
    torch.testing.assert_close(g["psft"], g["nll"])  # r = 1 everywhere: PSFT's gradient is NLL's
    # an old policy that gave the targets less probability: ratios above 1 + eps get no
    # gradient, the others their ratio r
    old_h = hidden - 0.05 * weight[labels.clamp_min(0)]
    r = token_loss(hidden, weight, labels, "psft:eps=0.2", bias=b, ref_hidden=old_h, ref_weight=weight, ref_bias=b)
    m = r.mask
    ratio = (r.logp[m] - token_loss(old_h, weight, labels, "nll", bias=b).logp[m]).exp()
    assert (ratio > 1.2).any() and (ratio <= 1.2).any()
    torch.testing.assert_close(r.weight[m], torch.where(ratio > 1.2, 0.0, ratio))


def test_protect_gives_exactly_nll_gradients_on_protected_tokens():
    hidden, weight, b, labels, *_ = _problem(24, 8, 20, torch.float64, seed=13, bias=False)
    labels = labels.clamp_min(0)
    classes = torch.zeros(20, dtype=torch.long)
    classes[labels[:5]] = 1  # the first five targets' ids are "special"
    r = token_loss(hidden, weight, labels, "dft:protect=special", token_class=classes)
    special = classes[labels] == 1
    assert special.sum() >= 5
    torch.testing.assert_close(r.weight[special], torch.ones(int(special.sum()), dtype=torch.float32))
    torch.testing.assert_close(r.weight[~special], r.logp[~special].exp())
    with pytest.raises(ValueError, match="token classes"):
        token_loss(hidden, weight, labels, "dft:protect=special")
    with pytest.raises(ValueError, match=r"token_class must be an integer table of shape \(20,\)"):
        token_loss(hidden, weight, labels, "dft:protect=special", token_class=classes[labels])


@pytest.mark.parametrize(
    "spec, name",
    [("dft", "dft"), ("dft:floor=0", "dft"), ("dft:floor=0.1", "dft:floor=0.1"),
     ("dft:norm=weight,protect=special", "dft:protect=special,norm=weight"),
     ("dft:protect=number+special", "dft:protect=special+number"),
     ("thresholded:q=0.2", "thresholded:q=0.2,keep=top,loss=nll,normalize=all"),
     ("eaft", "eaft:k=20,alpha=1"), ("chord_phi", "chord_phi"), ("psft", "psft:eps=0.2"),
     ("nll:norm=tokens", "nll")],
)
def test_canonical_names(spec, name):
    assert get_objective(spec).name == name
    assert get_objective(name).name == name  # a name resolves to itself


def test_objective_requirements():
    assert get_objective("eaft:k=7").topk == 7 and not get_objective("dft").topk
    assert get_objective("dft:protect=special").needs_classes
    assert get_objective("psft").needs_ref and get_objective("thresholded:pct=10").batch_level
    assert get_objective("dft").normalize == "tokens" and get_objective("talr:norm=weight").normalize == "weights"


def test_describe_objectives_lists_every_objective_and_the_generic_parameters():
    from dftune.objective_spec import describe_objectives

    text = describe_objectives()
    for name in set(OBJECTIVES) - {"sft"}:
        assert f"\n  {name}" in text
    assert "floor=0.0" in text and "arXiv 2601.02151" in text and "norm:" in text and "protect:" in text


@pytest.mark.parametrize("spec", ["eaft:k=5", "dft:floor=0.1,protect=special", "chord_phi", "thresholded:pct=30"])
def test_interop_loss_matches_token_loss_for_the_new_objectives(spec):
    """compute_loss_func (TRL / HF Trainer) gives token_loss's value and gradient."""
    from dftune.interop import compute_loss_func

    hidden, weight, b, labels, *_ = _problem(3 * 11, 8, 29, torch.float64, seed=14)
    classes = _classes(29)
    lab = torch.cat([torch.full((3, 1), -100), labels.view(3, 11)], 1)  # (B, T+1): position t predicts t+1
    h1 = hidden.clone().requires_grad_(True)
    logits = torch.cat([(h1 @ weight.T + b).view(3, 11, 29), torch.zeros(3, 1, 29, dtype=torch.float64)], 1)
    ours = compute_loss_func(spec, token_class=classes)({"logits": logits}, lab)
    ours.backward()
    h2 = hidden.clone().requires_grad_(True)
    ref = token_loss(h2, weight, labels, spec, bias=b, token_class=classes)
    ref.loss.backward()
    torch.testing.assert_close(ours, ref.loss)
    torch.testing.assert_close(h1.grad, h2.grad)
    with pytest.raises(ValueError, match="norm=weight"):
        compute_loss_func("dft:norm=weight")
