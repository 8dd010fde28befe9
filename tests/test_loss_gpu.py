"""The CCE and Liger backends on a CPU: their specs, and the installed libraries' signatures
against the calls dftune makes (so a pin that admits a version without them fails here, not
on a GPU). Their numerics are in tests/test_gpu.py (CUDA)."""

import inspect
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from dftune.loss import token_loss
from dftune.loss_gpu import BackendError, GpuBackend, cce_kwargs, check, liger_kwargs, parse_backend

ROOT = Path(__file__).resolve().parents[1]


def _gpu_extra() -> dict[str, Requirement]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {r.name: r for r in map(Requirement, extras["gpu"])}


def _installed(module: str, dist: str):
    pytest.importorskip(module, reason=f"{dist} is not importable here (pip install -e '.[test]' installs it; it "
                                       "needs triton)")
    spec = _gpu_extra()[dist].specifier
    got = version(dist)
    assert spec.contains(got, prereleases=True), f"{dist} {got} is installed but the gpu extra admits {spec}"
    return got


def test_backend_specs_parse_to_exact_defaults_and_named_approximations():
    assert parse_backend("cce") == GpuBackend("cce", accum="fp32", filter_eps=None)
    assert parse_backend("cce:accum=bf16,filter_eps=auto") == GpuBackend("cce", accum="bf16", filter_eps="auto")
    assert parse_backend("cce:filter_eps=1e-5").filter_eps == 1e-5
    assert parse_backend("liger") == GpuBackend("liger", compute="fp32")
    assert parse_backend("liger:compute=bf16").compute == "bf16"
    for bad, match in (("cce:compute=bf16", "unknown option 'compute=bf16'; cce takes accum"),
                       ("liger:compute=fp16", "compute must be one of fp32|bf16"),
                       ("cce:filter_eps=tiny", "filter_eps must be auto, high or a number"),
                       ("cce:accum", "unknown option 'accum'"), ("chunked", "not a GPU backend")):
        with pytest.raises(BackendError, match=match):
            parse_backend(bad)


def test_token_loss_refuses_unknown_backends_and_options_on_cpu_backends():
    h, w, y = torch.randn(4, 8), torch.randn(16, 8), torch.tensor([1, 2, 3, -100])
    for bad in ("chunked:chunk=4", "fused", "naive:x=1"):
        with pytest.raises(ValueError, match="unknown backend"):
            token_loss(h, w, y, "dft", backend=bad)
    with pytest.raises(RuntimeError, match="CUDA only"):  # a valid GPU spec on a CPU tensor
        token_loss(h, w, y, "dft", backend="liger:compute=bf16")


def test_installed_cut_cross_entropy_takes_the_call_dftune_makes():
    got = _installed("cut_cross_entropy", "cut-cross-entropy")
    from cut_cross_entropy import linear_cross_entropy

    params = inspect.signature(linear_cross_entropy).parameters
    # the library's default filters gradients: dftune must pass filter_eps itself
    assert params["filter_eps"].default is not None
    kw = cce_kwargs(parse_backend("cce:accum=bf16"), None, torch.bfloat16)
    assert kw["filter_eps"] is None and kw["reduction"] == "none"
    inspect.signature(linear_cross_entropy).bind("e", "c", "targets", **kw)
    if "accum_c_fp32" in params:  # the repository's 25.6.x: exact by default, bias taken
        kw = cce_kwargs(parse_backend("cce"), torch.zeros(3), torch.float32)
        assert kw["accum_e_fp32"] and kw["accum_c_fp32"]
        inspect.signature(linear_cross_entropy).bind("e", "c", "targets", **kw)
    else:  # 25.1.1: bf16 accumulation, no bias, bf16/fp16 hidden states for its backward
        assert got == "25.1.1"
        with pytest.raises(BackendError, match="cce:accum=bf16 accepts that"):
            check("cce")
        with pytest.raises(BackendError, match="takes no LM-head bias"):
            cce_kwargs(parse_backend("cce:accum=bf16"), torch.zeros(3), torch.bfloat16)
        with pytest.raises(BackendError, match="needs bf16/fp16 hidden states"):
            cce_kwargs(parse_backend("cce:accum=bf16"), None, torch.float32)
    assert check("cce:accum=bf16,filter_eps=high").filter_eps == "high"


def test_installed_liger_kernel_takes_the_call_dftune_makes():
    _installed("liger_kernel", "liger-kernel")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    for spec in ("liger", "liger:compute=bf16"):
        check(spec)  # binds dftune's arguments to the installed signatures
    # constructing the module needs no GPU: the arguments land where the kernel reads them
    fn = LigerFusedLinearCrossEntropyLoss(**liger_kwargs(parse_backend("liger"), "dft"))
    assert fn.use_token_scaling is True and fn.accum_dtype == torch.float32 and fn.reduction == "sum"
    assert LigerFusedLinearCrossEntropyLoss(**liger_kwargs(parse_backend("liger"), "nll")).use_token_scaling is False
    assert list(inspect.signature(fn.forward).parameters)[:4] == ["lin_weight", "_input", "target", "bias"]
    with pytest.raises(BackendError, match="nll and dft only"):
        check("liger", ["dft:floor=0.1"])


def test_training_refuses_a_backend_spec_before_anything_loads(tmp_path):
    from dftune.config import Config, DataConfig, ModelConfig, TrainConfig
    from dftune.train import train

    cfg = Config(model=ModelConfig(name_or_path=str(tmp_path / "absent")), data=DataConfig(path=str(tmp_path / "x")),
                 train=TrainConfig(loss_backend="liger:compute=fp8", out=str(tmp_path / "run")))
    from dftune.settings import ConfigError

    with pytest.raises(ConfigError, match="train.loss_backend: .*compute must be one of fp32"):  # with every other problem
        train(cfg)
    assert not (tmp_path / "run").exists()
