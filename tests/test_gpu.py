"""GPU backends against the chunked backend (run with `pytest -m gpu` on a CUDA machine)."""

import importlib.util

import pytest
import torch

from dftune.loss import token_loss

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _problem(dtype, n=1000, h=256, v=32000):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(n, h, device="cuda", generator=g) * 0.5).to(dtype)
    weight = (torch.randn(v, h, device="cuda", generator=g) * 0.05).to(dtype)
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[: n // 4] = -100
    return hidden, weight, labels


def _run(backend, spec, hidden, weight, labels):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    r = token_loss(h, w, labels, spec, backend=backend)
    r.loss.backward()
    return r.loss.float(), h.grad.float(), w.grad.float()


@cuda
@pytest.mark.parametrize("backend, specs", [("cce:accum=bf16", ["nll", "dft", "prob_power:alpha=2", "talr", "focal",
                                                                "chord_phi", "dft:floor=0.1", "thresholded:pct=20"]),
                                             ("cce:accum=bf16,filter_eps=high", ["dft"]),
                                             ("liger", ["nll", "dft"]), ("liger:compute=bf16", ["nll", "dft"])])
def test_gpu_backend_matches_chunked(backend, specs):
    pytest.importorskip({"cce": "cut_cross_entropy", "liger": "liger_kernel"}[backend.split(":")[0]])
    prob = _problem(torch.bfloat16)
    for spec in specs:
        ref = _run("chunked", spec, *prob)
        got = _run(backend, spec, *prob)
        for a, b in zip(got, ref):
            scale = b.abs().max().clamp_min(1e-6)
            torch.testing.assert_close(a / scale, b / scale, rtol=5e-2, atol=2e-2)


def _float64_dft(hidden, weight, labels, spec):
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    lp = (h64 @ w64.T).log_softmax(-1)
    m = labels != -100
    logp = lp[m].gather(1, labels[m][:, None]).squeeze(1)
    loss = (-(logp.detach().exp() * logp) if spec == "dft" else -logp).sum() / m.sum()
    loss.backward()
    return loss, h64.grad, w64.grad


@cuda
@pytest.mark.parametrize("master", [torch.bfloat16, torch.float32])  # FSDP's gathered bf16 head; DDP's fp32 one
def test_exact_defaults_match_float64(master):
    """liger (and cce where the library can accumulate in fp32) by default: fp32 logits, p and
    gradients, so they agree with a float64 reference of the same bf16 inputs to fp32 precision."""
    from dftune.loss_gpu import BackendError, cce_function

    hidden, weight, labels = _problem(torch.bfloat16, n=600, h=256, v=20000)
    backends = []
    try:
        import inspect

        fp32_cce = "accum_c_fp32" in inspect.signature(cce_function()).parameters
        if fp32_cce:
            backends.append("cce")
        else:  # 25.1.1: the exact default is refused, naming the option
            with pytest.raises(BackendError, match="cce:accum=bf16"):
                token_loss(hidden, weight.to(master), labels, "dft", backend="cce")
    except ImportError:
        pass
    if importlib.util.find_spec("liger_kernel"):
        backends.append("liger")
    if not backends:
        pytest.skip("neither cut-cross-entropy with fp32 accumulation nor liger-kernel is installed")
    for spec in ("nll", "dft"):
        ref = _float64_dft(hidden, weight, labels, spec)
        for backend in backends:
            h, w = hidden.clone().requires_grad_(True), weight.to(master).requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                r = token_loss(h, w, labels, spec, backend=backend)
            r.loss.backward()
            assert w.grad.dtype == master
            torch.testing.assert_close(r.loss.double(), ref[0], rtol=1e-4, atol=1e-7)
            # the gradients' only rounding: to the parameter's own dtype at the end
            for got, want in ((h.grad, ref[1]), (w.grad, ref[2])):
                tol = 1e-2 if got.dtype == torch.bfloat16 else 1e-4
                scale = want.abs().max()
                torch.testing.assert_close(got.double() / scale, want / scale, rtol=tol, atol=tol / 10)


@cuda
def test_chunked_on_cuda_matches_naive_in_fp32():
    prob = _problem(torch.float32, n=300, v=5000)
    for spec in ("dft", "asft"):
        kw = {}
        if spec == "asft":
            kw = dict(ref_hidden=prob[0] * 1.1, ref_weight=prob[1])
        a = token_loss(prob[0], prob[1], prob[2], spec, backend="chunked", chunk_size=64, **kw).loss
        b = token_loss(prob[0], prob[1], prob[2], spec, backend="naive", **kw).loss
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@cuda
def test_bf16_mixed_head_on_cuda_matches_float64():
    """The bf16-mixed path: bf16 hidden states, fp32 master head under autocast, the weight
    gradient accumulated by the bf16 GEMM with fp32 output (no (V, H) temporaries)."""
    hidden, weight, labels = _problem(torch.bfloat16, n=700, h=256, v=20000)
    w32 = weight.float().requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        r = token_loss(h, w32, labels, "dft", chunk_size=128)
    r.loss.backward()
    assert w32.grad.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    lp = (h64 @ w64.T).log_softmax(-1)
    m = labels != -100
    logp = lp[m].gather(1, labels[m][:, None]).squeeze(1)
    ref = (-logp.detach().exp() * logp).sum() / m.sum()
    ref.backward()
    torch.testing.assert_close(r.loss.double(), ref, rtol=1e-3, atol=1e-6)
    for got, want in ((w32.grad, w64.grad), (h.grad, h64.grad)):
        scale = want.abs().max()
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=3e-2, atol=1e-2)


@cuda
def test_new_objectives_on_cuda_match_naive_with_weights():
    """EAFT's top-K entropy, protect's token classes and the per-token weights on CUDA."""
    hidden, weight, labels = _problem(torch.float32, n=300, v=5000)
    classes = torch.randint(0, 4, (5000,), device="cuda")
    for spec in ("eaft:k=20", "dft:floor=0.1,protect=special", "thresholded:pct=30,loss=p", "chord_phi:norm=weight"):
        a = token_loss(hidden, weight, labels, spec, backend="chunked", chunk_size=64, token_class=classes)
        b = token_loss(hidden, weight, labels, spec, backend="naive", token_class=classes)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-6)
        assert a.weight_sum.isfinite()
