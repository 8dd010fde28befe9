"""auto: the exponent follows the data's mean target probability; the loop supplies it
(first step measured, then the previous step's global statistic), logs its decisions and
resumes exactly. The per-token closed form is in test_loss.py's float64 REFERENCE."""

import json
from pathlib import Path

import pytest
import torch

from dftune.loss import token_loss
from dftune.objective_spec import get_objective
from dftune.objectives import auto_exponent, data_stats
from dftune.vocab import SPECIAL


@pytest.mark.parametrize("pbar, a", [(0.0, 0.0), (0.05, 0.0), (0.1, 0.0), (0.2, 0.25), (0.3, 0.5), (0.45, 0.875),
                                     (0.5, 1.0), (0.93, 1.0), (1.0, 1.0)])
def test_the_exponent_follows_the_literatures_thresholds(pbar, a):
    assert auto_exponent(pbar) == pytest.approx(a)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="pbar must be in"):
        get_objective("auto:pbar=1.5")
    with pytest.raises(ValueError, match="mean must be one of geometric, arithmetic"):
        get_objective("auto:mean=median")
    with pytest.raises(ValueError, match="floor must be in"):
        get_objective("auto:floor=2")
    # the name shows what differs from the defaults (geometric mean, floor 0.1)
    assert get_objective("auto:floor=0.1").name == "auto"
    assert get_objective("auto:floor=0,mean=arithmetic").name == "auto:mean=arithmetic,floor=0"


def test_the_geometric_mean_sees_the_unknown_tokens_the_arithmetic_mean_hides():
    """Two thirds of the tokens known (p 0.99), a third never seen (p 1e-6): the weak base of
    the demo. The arithmetic mean says strong prior (DFT), the geometric one weak (NLL)."""
    lp = torch.log(torch.tensor([0.99] * 20 + [1e-6] * 10, dtype=torch.float64))
    stats = data_stats(lp)
    assert auto_exponent(stats["mean_p"]) == 1.0 and auto_exponent(stats["geo_p"]) == 0.0


def _confident_problem(n=40, h=8, v=30, seed=0):
    """Logits sharp enough that the targets' mean p is between 0.1 and 0.5."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.8
    logits = hidden @ weight.T
    labels = torch.where(torch.rand(n, generator=g) < 0.9, logits.argmax(-1), torch.randint(0, v, (n,), generator=g))
    classes = torch.randint(0, 4, (v,), generator=g)
    return hidden, weight, labels, classes


@pytest.mark.parametrize("mean", ["geometric", "arithmetic"])
@pytest.mark.parametrize("backend", ["chunked", "naive"])
def test_without_pbar_the_calls_own_tokens_set_the_exponent(backend, mean):
    hidden, weight, labels, classes = _confident_problem()
    probe = token_loss(hidden, weight, labels, "nll", token_class=classes)
    special = classes[labels] == SPECIAL
    stats = data_stats(probe.logp[~special])
    mean_p = stats["geo_p" if mean == "geometric" else "mean_p"]
    assert 0.12 < stats["geo_p"] < stats["mean_p"] < 0.48  # the problem is in the blend, not at an end
    results = {}
    for spec in (f"auto:mean={mean}", f"auto:mean={mean},pbar={mean_p!r}"):
        h = hidden.clone().requires_grad_(True)
        r = token_loss(h, weight, labels, spec, token_class=classes, backend=backend, chunk_size=7)
        r.loss.backward()
        results[spec] = (r, h.grad)
    (a, ga), (b, gb) = results.values()
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(ga, gb)
    # the weights: p^a off the special class, 1 on it
    expo = auto_exponent(mean_p)
    want = torch.where(special, torch.ones_like(a.logp), (expo * a.logp).exp().clamp_min(0.1))
    torch.testing.assert_close(a.weight, want)


# ---- in the training loop --------------------------------------------------------------------


def _run(tiny_dir, data, out, **kw):
    from tests.test_train import _cfg
    from dftune.train import train

    return train(_cfg(tiny_dir, data, out, **kw))


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_the_loop_supplies_the_data_prob_and_logs_the_decisions(tiny_dir, problems_file, tmp_path):
    """Accumulation 2 (global 8, micro 4): the first step's pbar is its own batch's global mean p,
    measured before the update; every later step uses the previous step's; a random model's
    p is far below 0.1, so auto is NLL exactly (the same weights as an NLL run)."""
    from safetensors.torch import load_file

    out = tmp_path / "auto"
    final = _run(tiny_dir, problems_file, out, objective="auto", max_steps=3, save_every=1, keep_checkpoints=5)
    log = _log(out)
    state = [json.loads((out / "checkpoints" / f"step_{s:07d}" / "state.json").read_text()) for s in (1, 2, 3)]
    # the first step's statistic, measured before its update, is the step's own (over the unprotected tokens)
    assert log[0]["auto_pbar"] == pytest.approx(state[0]["data_stats"]["geo_p"], rel=1e-6)
    assert log[0]["auto_pbar"] < log[0]["mean_prob"]  # the geometric mean is below the arithmetic one
    for st, rec in zip(state, log[1:]):
        assert rec["auto_pbar"] == st["data_stats"]["geo_p"]  # the previous step's statistic, exactly
    for rec in log:
        assert rec["auto_exponent"] == auto_exponent(rec["auto_pbar"]) == 0.0
        assert rec["weight_mean"] == pytest.approx(1.0)
        # EOS targets are special: a share of the tokens, the same share of the weight (all weights 1)
        assert 0 < rec["protected_tokens"] < 0.2 and rec["protected_weight"] == pytest.approx(rec["protected_tokens"])
        assert rec["low_p_tokens"] > 0.9 and rec["low_p_weight"] == pytest.approx(rec["low_p_tokens"])
    nll = _run(tiny_dir, problems_file, tmp_path / "nll", objective="nll", max_steps=3)
    assert [r["loss"] for r in _log(tmp_path / "nll")] == [r["loss"] for r in log]
    wa, wb = load_file(str(final / "model.safetensors")), load_file(str(nll / "model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert "auto_pbar" not in _log(tmp_path / "nll")[0] and "protected_tokens" not in _log(tmp_path / "nll")[0]


def test_dft_gives_the_low_p_tokens_almost_no_weight(tiny_dir, problems_file, tmp_path):
    _run(tiny_dir, problems_file, tmp_path / "dft", objective="dft:protect=special", max_steps=1)
    rec = _log(tmp_path / "dft")[0]
    # DFT weights are p: the tokens below p = 0.1 get less than 0.1 each, special ones 1
    assert rec["low_p_weight"] < 0.1 * rec["low_p_tokens"] / rec["weight_mean"] + rec["protected_weight"]
    assert rec["protected_weight"] > rec["protected_tokens"]  # weight 1 among weights of ~p


def test_auto_resumes_exactly(tiny_dir, problems_file, tmp_path):
    """The statistic auto follows is in the checkpoint (state.json), so a killed and resumed
    run has the same pbar at every step and the same weights as an uninterrupted one."""
    from safetensors.torch import load_file

    from tests.test_train import _cfg
    from dftune.train import train

    full = train(_cfg(tiny_dir, problems_file, tmp_path / "a", objective="auto", max_steps=4, save_every=1, lr=2e-2))

    class Killed(Exception):
        pass

    def kill_after_2(step, rec):
        if step == 2:
            raise Killed

    cfg = _cfg(tiny_dir, problems_file, tmp_path / "b", objective="auto", max_steps=4, save_every=1, lr=2e-2)
    with pytest.raises(Killed):
        train(cfg, on_step=kill_after_2)
    state = json.loads((tmp_path / "b" / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert set(state["data_stats"]) == {"mean_p", "geo_p"}
    cfg.train.resume = True
    resumed = train(cfg)
    la, lb = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["auto_pbar"] for r in la] == [r["auto_pbar"] for r in lb]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
