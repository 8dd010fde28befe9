"""GPU backends against the chunked backend (run with `pytest -m gpu` on a CUDA machine)."""

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
@pytest.mark.parametrize("backend, specs", [("cce", ["nll", "dft", "prob_power:alpha=2", "talr", "focal"]),
                                             ("liger", ["nll", "dft"])])
def test_gpu_backend_matches_chunked(backend, specs):
    pytest.importorskip({"cce": "cut_cross_entropy", "liger": "liger_kernel"}[backend])
    prob = _problem(torch.bfloat16)
    for spec in specs:
        ref = _run("chunked", spec, *prob)
        got = _run(backend, spec, *prob)
        for a, b in zip(got, ref):
            scale = b.abs().max().clamp_min(1e-6)
            torch.testing.assert_close(a / scale, b / scale, rtol=5e-2, atol=2e-2)


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
