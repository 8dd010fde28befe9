"""Optional CUDA backends for ``token_loss``: Cut Cross-Entropy and Liger.

Imported only when ``backend="cce"`` or ``"liger"`` is asked for, so that neither package
is needed otherwise (``pip install "dftune[gpu]"``). Versions read and checked (the ``gpu``
extra admits only these; ``tests/test_loss_gpu.py`` checks the installed one's signatures
on CPU): cut-cross-entropy 25.1.1, the only PyPI release since 24.12 (no head bias, no
fp32 gradient accumulation; its repository's 25.6.x adds both and is used as such when
installed from there), and liger-kernel 0.6.3 to 0.8.x (``use_token_scaling`` first
appears in 0.6.3).

A backend is ``NAME`` or ``NAME:key=value,...`` (``train.loss_backend``). Exact by default,
as the chunked backend is: every gradient term kept, fp32 log-probabilities and p, every
accumulated gradient fp32. What each library can only do approximately is refused unless
the option that accepts it is given:

- ``cce``: every objective whose per-token function needs only the target log-prob (nll,
  dft, prob_power, thresholded, dft_clip, talr, focal, chord_phi, psft, iw_sft, and
  ``protect=`` / ``norm=weight`` on any of them). CCE returns the per-token cross-entropy
  (fp32, from its fp32 logsumexp) with its own fused backward; the objective is applied on
  top with autograd. Gradient filtering is off (``filter_eps=None``). No entropy (NaN), no
  top-K entropy (so not eaft), no full-vocabulary KL (so not asft), no head bias with 25.1.1.
  Options:
    ``accum=bf16``: accept CCE 25.1.1's backward, which sums the hidden-state gradient over
      vocabulary blocks and the head gradient over token blocks in bf16 (a bf16 rounding
      per block: ~600 blocks at V=151,936). Required with 25.1.1, which has no fp32 option.
    ``filter_eps=auto|high|FLOAT``: CCE's gradient filtering: vocabulary blocks whose
      softmax gradient is below eps (auto/high: bf16's eps / 32) are skipped. Faster,
      approximate.
  The matmuls run in the compute dtype (bf16 under bf16-mixed); 25.1.1's backward needs
  bf16 or fp16 hidden states, so it is refused in fp32 training.
- ``liger``: plain ``nll`` and ``dft`` only (Liger's ``use_token_scaling`` multiplies each
  token's cross-entropy by its detached probability). Exact by default: the logits, the
  softmax that gives p, and every gradient in fp32 (autocast off, inputs cast to fp32;
  ``accum_dtype=float32``), which costs fp32 matmuls. It returns a summed loss only:
  per-token statistics are NaN, and so are dft's per-token weights (so not norm=weight).
  Option ``compute=bf16``: Liger's own behaviour, the logits and p (a bf16 softmax) in
  bf16; the head gradient is still accumulated in fp32.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from dftune.errors import UserError
from dftune.loss_chunked import cast_to, objective_grad, token_context
from dftune.objectives import Objective

PACKAGES = {"cce": "cut-cross-entropy", "liger": "liger-kernel"}
OPTIONS = {"cce": {"accum": ("fp32", "bf16"), "filter_eps": None}, "liger": {"compute": ("fp32", "bf16")}}


class BackendError(UserError, ValueError):
    """A GPU loss backend asked for what it cannot do (exactly) with the installed library."""


@dataclass(frozen=True)
class GpuBackend:
    """A parsed ``cce[:...]`` / ``liger[:...]`` spec; the defaults are the exact settings."""

    name: str
    accum: str = "fp32"  # cce: gradient accumulation dtype
    filter_eps: float | str | None = None  # cce: gradient filtering threshold; None = off
    compute: str = "fp32"  # liger: dtype of the logits and p


def parse_backend(spec: str) -> GpuBackend:
    """``cce``, ``cce:accum=bf16,filter_eps=auto``, ``liger:compute=bf16`` -> GpuBackend."""
    name, _, rest = spec.partition(":")
    if name not in OPTIONS:
        raise BackendError(f"loss backend {spec!r}: {name!r} is not a GPU backend ({', '.join(OPTIONS)})")
    kw = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        allowed = OPTIONS[name]
        if not eq or key not in allowed:
            raise BackendError(f"loss backend {spec!r}: unknown option {item!r}; {name} takes "
                               f"{', '.join(k + '=' + ('|'.join(v) if v else 'auto|high|FLOAT') for k, v in allowed.items())}")
        if key == "filter_eps":
            if value in ("auto", "high"):
                kw[key] = value
            else:
                try:
                    kw[key] = float(value)
                except ValueError:
                    raise BackendError(f"loss backend {spec!r}: filter_eps must be auto, high or a number; "
                                       f"got {value!r}") from None
        elif value not in allowed[key]:
            raise BackendError(f"loss backend {spec!r}: {key} must be one of {'|'.join(allowed[key])}; got {value!r}")
        else:
            kw[key] = value
    return GpuBackend(name, **kw)


def cce_function():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise ImportError("backend 'cce' needs cut-cross-entropy: pip install 'dftune[gpu]'") from e
    return linear_cross_entropy


def liger_class():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise ImportError("backend 'liger' needs liger-kernel: pip install 'dftune[gpu]'") from e
    return LigerFusedLinearCrossEntropyLoss


def cce_kwargs(opts: GpuBackend, bias: torch.Tensor | None, compute: torch.dtype) -> dict:
    """The keyword arguments of the ``linear_cross_entropy`` call, checked against the
    installed version's signature (a refusal names the option that accepts the difference)."""
    params = inspect.signature(cce_function()).parameters
    kw = {"reduction": "none", "filter_eps": opts.filter_eps}
    fp32_accum = "accum_c_fp32" in params  # cut-cross-entropy >= 25.6.2 (its repository; not on PyPI)
    if opts.accum == "fp32":
        if not fp32_accum:
            raise BackendError("backend 'cce': this cut-cross-entropy (25.1.1, the PyPI release) accumulates the "
                               "hidden and head gradients in bf16 and has no fp32 option; loss_backend=cce:accum=bf16 "
                               "accepts that, or use chunked (exact)")
        kw.update(accum_e_fp32=True, accum_c_fp32=True)
    if bias is not None:
        if "bias" not in params:
            raise BackendError("backend 'cce': this cut-cross-entropy (25.1.1) takes no LM-head bias and this model's "
                               "head has one; use chunked")
        kw["bias"] = bias
    if not fp32_accum and compute not in (torch.bfloat16, torch.float16):
        raise BackendError(f"backend 'cce': cut-cross-entropy 25.1.1's backward needs bf16/fp16 hidden states; the "
                           f"compute dtype here is {compute} (train.precision=bf16-mixed, or use chunked)")
    return kw


def liger_kwargs(opts: GpuBackend, objective_name: str) -> dict:
    """The constructor arguments of ``LigerFusedLinearCrossEntropyLoss``."""
    return {"reduction": "sum", "use_token_scaling": objective_name == "dft", "accum_dtype": torch.float32}


def check(spec: str, objective_names=()) -> GpuBackend:
    """Parse ``spec`` and refuse, before any training, what the installed library cannot do."""
    opts = parse_backend(spec)
    if opts.name == "liger":
        bad = [n for n in objective_names if n not in ("nll", "dft")]
        if bad:
            raise BackendError(f"backend 'liger' supports nll and dft only, not {bad[0]!r}; use chunked or cce")
        cls = liger_class()
        try:
            inspect.signature(cls).bind(**liger_kwargs(opts, "dft"))
            inspect.signature(cls.forward).bind(None, "lin_weight", "_input", "target", "bias")
        except TypeError as e:
            raise BackendError(f"backend 'liger': the installed liger-kernel does not take the arguments dftune passes "
                               f"({e}); it needs liger-kernel>=0.6.3 (pip install 'dftune[gpu]')") from None
    else:
        cce_kwargs(opts, None, torch.bfloat16)
    return opts


def _need_cuda(backend: str, hidden: torch.Tensor) -> None:
    if not hidden.is_cuda:
        raise RuntimeError(f"backend {backend!r} runs on CUDA only; use backend='chunked' on {hidden.device}")


def _cce_logp(fn, hidden, weight, bias, tgt, opts: GpuBackend, cdtype: torch.dtype) -> torch.Tensor:
    """(M,) fp32 log-prob of each target through CCE (differentiable)."""
    if tgt.numel() == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    kw = cce_kwargs(opts, bias, cdtype)
    with torch.autocast(hidden.device.type, enabled=False):  # CCE's kernels cast per tile themselves
        return -fn(cast_to(hidden, cdtype).contiguous(), weight, tgt, **kw).float()


def run(backend: str, sel, weight, bias, ref_weight, ref_bias, obj: Objective, num_items: float, cdtype: torch.dtype):
    opts = parse_backend(backend)
    hidden, tgt = sel["hidden"], sel["labels"]
    _need_cuda(opts.name, hidden)
    nan = torch.full(tgt.shape, float("nan"), device=hidden.device)
    if opts.name == "cce":
        if obj.kl_coef:
            raise BackendError(f"backend 'cce' cannot compute {obj.name}'s full-vocabulary KL; use 'chunked'")
        if obj.topk:
            raise BackendError(f"backend 'cce' cannot compute {obj.name}'s top-K entropy; use 'chunked'")
        fn = cce_function()
        logp = _cce_logp(fn, hidden, weight, bias, tgt, opts, cdtype)  # (M,)
        ref_lp = None
        if ref_weight is not None:
            with torch.no_grad():
                ref_lp = _cce_logp(fn, sel["ref_hidden"], ref_weight, ref_bias, tgt, opts, cdtype)
        ctx = token_context(sel, 0, None, None, ref_lp, None)
        vals = obj(logp, ctx)
        _, g = objective_grad(obj, logp, ctx, num_items)
        return vals.sum() / num_items, logp.detach(), nan, None, vals.sum().detach(), -g * num_items
    if obj.name not in ("nll", "dft"):
        raise BackendError(f"backend 'liger' supports nll and dft only, not {obj.name!r}; use 'chunked' or 'cce'")
    w = torch.ones_like(nan) if obj.name == "nll" else nan  # dft's p is inside the kernel
    if tgt.numel() == 0:
        zero = hidden.new_zeros((), dtype=torch.float32)
        return zero, nan, nan, None, zero, w
    fn = liger_class()(**liger_kwargs(opts, obj.name))
    dt = torch.float32 if opts.compute == "fp32" else cdtype
    with torch.autocast(hidden.device.type, enabled=False):  # the dtype is the option's, not autocast's
        total = fn(cast_to(weight, dt), cast_to(hidden, dt).contiguous(), tgt, cast_to(bias, dt)).float()
    return total / num_items, nan, nan, None, total.detach(), w
