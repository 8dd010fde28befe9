"""Token-probability analysis, the probe and the report, on tiny real models."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dftune.analysis.report import build_report, write_report
from dftune.analysis.tokens import P_EDGES, analyze, histogram, recommend, summary, token_stats
from dftune.config import Config, DataConfig, ModelConfig, TrainConfig
from dftune.data import build_dataset, collate
from dftune.train import train
from tests.conftest import write_jsonl


@pytest.fixture
def setup(tiny_dir, problems_file):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    exs, _ = build_dataset(DataConfig(path=str(problems_file)), tok)
    return tok, exs[:10]


def _float64_reference(model, base, exs, pad_id):
    b = collate(exs, pad_id)
    with torch.no_grad():
        lp = model.double()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.log_softmax(-1)[:, :-1]
        blp = base.double()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.log_softmax(-1)[:, :-1]
    model.float(), base.float()
    lab = b["labels"][:, 1:]
    m = lab != -100
    logp = lp.gather(-1, lab.clamp_min(0)[..., None]).squeeze(-1)[m]
    ent = -(lp.exp() * lp).sum(-1)[m]
    kl = (blp.exp() * (blp - lp)).sum(-1)[m]
    return logp.numpy(), ent.numpy(), kl.numpy(), lab[m].numpy()


def test_token_stats_histograms_and_kl_match_float64(tiny_dir, setup):
    tok, exs = setup
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    st = token_stats(model, exs, tok.pad_token_id, base=base, batch_size=3)
    logp, ent, kl, ids = _float64_reference(model, base, exs, tok.pad_token_id)
    np.testing.assert_array_equal(st.token_ids, ids)
    np.testing.assert_allclose(st.logp, logp, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st.entropy, ent, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st.kl, kl, rtol=1e-3, atol=1e-6)
    # histogram against a float64 numpy histogram of the reference probabilities
    want, _ = np.histogram(np.exp(logp), bins=P_EDGES)
    np.testing.assert_allclose(histogram(np.exp(st.logp), P_EDGES), want / len(logp), atol=2 / len(logp))
    assert sum(histogram(np.exp(st.logp), P_EDGES)) == pytest.approx(1.0)
    res = analyze({"base": token_stats(base, exs, tok.pad_token_id), "moved": st}, lambda t: tok.decode([t]), base="base")
    assert res["summary"]["moved"]["mean_kl_to_base"] == pytest.approx(float(kl.mean()), rel=1e-3)
    assert sum(res["shift_vs_base"]["moved"]) == pytest.approx(0.0, abs=1e-9)
    assert len(res["bin_tokens"]["moved"]) == len(P_EDGES) - 1 and res["risers"]["moved"]


@pytest.mark.parametrize(
    "mean_prob, expected",
    [(0.002, "nll"), (0.1, "nll"), (0.2, "prob_power:alpha=0.25"), (0.3, "prob_power:alpha=0.5"), (0.4, "prob_power:alpha=0.75"), (0.48, "dft"),
     (0.5, "dft"), (0.93, "dft")],
)
def test_recommendation_rule(mean_prob, expected):
    rec = recommend({"mean_prob": mean_prob, "frac_below_0.1": 0.0})
    assert rec["objective"] == expected and f"{mean_prob:.2f}"[:3] in rec["reasoning"]


def test_probe_on_a_uniform_model_and_a_nearly_certain_one(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What is 1 plus 2?", "completion": "We add 1 and 2 to get 3."}] * 16)
    exs, _ = build_dataset(DataConfig(path=str(data)), tok)
    uniform = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        uniform.model.norm.weight.zero_()  # hidden states 0 -> every logit 0 -> p = 1/V
    s = summary(token_stats(uniform, exs, tok.pad_token_id))
    assert s["mean_prob"] == pytest.approx(1 / len(tok), rel=1e-4)
    assert s["mean_entropy"] == pytest.approx(np.log(len(tok)), rel=1e-4)
    assert recommend(s)["objective"] == "nll"
    # a model trained until it is nearly certain of this data
    cfg = Config(model=ModelConfig(name_or_path=str(tiny_dir)), data=DataConfig(path=str(data)),
                 train=TrainConfig(objective="nll", lr=1e-2, global_batch=16, micro_batch=16, max_steps=40,
                                   warmup_ratio=0.0, out_dir=str(tmp_path / "run"), tensorboard=False))
    certain = AutoModelForCausalLM.from_pretrained(train(cfg))
    s = summary(token_stats(certain, exs, tok.pad_token_id))
    assert s["mean_prob"] > 0.9 and s["frac_above_0.9"] > 0.8
    assert recommend(s)["objective"] == "dft"


@pytest.fixture(scope="module")
def report_inputs(tiny_dir, problems_file, tmp_path_factory):
    """Two tiny real runs (nll, dft), an analysis of both and a probe: what a user would report on."""
    root = tmp_path_factory.mktemp("report")
    runs = []
    for obj in ("nll", "dft"):
        cfg = Config(model=ModelConfig(name_or_path=str(tiny_dir)), data=DataConfig(path=str(problems_file)),
                     train=TrainConfig(objective=obj, lr=3e-3, global_batch=8, micro_batch=8, max_steps=4,
                                       out_dir=str(root / obj), tensorboard=False))
        train(cfg)
        runs.append(root / obj)
    from dftune.cli import main

    models = f"base={tiny_dir},nll={root / 'nll' / 'final'},dft={root / 'dft' / 'final'}"
    assert main(["analyze", "--models", models, "--data", str(problems_file), "--limit", "16",
                 "--out", str(root / "analysis")]) == 0
    assert main(["probe", "--model", str(tiny_dir), "--data", str(problems_file), "--limit", "16",
                 "--out", str(root / "probe.json")]) == 0
    return runs + [root / "analysis", root / "probe.json"]


def test_report_contains_every_section(report_inputs, tmp_path):
    page = build_report(report_inputs)
    for section in ("Learning curves", "Token probabilities", "Pre-flight probe", "Config differences"):
        assert f"<h2>{section}</h2>" in page
    assert "train.objective" in page and page.count("data:image/png;base64,") >= 8
    assert "http://" not in page and "https://" not in page.replace("https://arxiv", "")  # self-contained
    with pytest.raises(ValueError, match="nothing to report"):
        build_report([tmp_path])


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(page: Path, shot: Path, tmp: Path) -> str:
    """Screenshot a page in headless Chromium; return its log (console messages included)."""
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr",
           "--v=0", "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return r.stderr


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]


def test_report_renders_in_headless_chromium(report_inputs, tmp_path):
    if not _chromium():
        pytest.skip("Chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    from PIL import Image

    page = write_report(report_inputs, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    log = render(page, shot, tmp_path)
    assert shot.is_file(), log[-2000:]
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.std() > 10 and (img < 128).mean() > 0.01  # not blank: text and plots drawn
    assert console_errors(log) == []
    # the console check itself can fail: a page with a script error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    assert console_errors(render(bad, tmp_path / "bad.png", tmp_path))
