"""Token-probability analysis, the probe and the report, on tiny real models."""

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dftune.analysis.report import build_report, write_report
from dftune.analysis.tokens import (
    P_EDGES,
    TokenStats,
    analyze,
    class_summaries,
    end_of_turn_summary,
    format_probe,
    histogram,
    probe,
    probe_report,
    recommend,
    token_stats,
)
from dftune.batching import collate
from dftune.config import Config, DataConfig, ModelConfig, TrainConfig
from dftune.data import build_dataset
from dftune.files import write_json
from dftune.loss import token_loss
from dftune.model import _hidden, decoder_and_head
from dftune.objective_spec import get_objective
from dftune.train import train
from dftune.vocab import PUNCT, SPECIAL, end_of_turn_ids, token_classes


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
    [(0.002, "nll"), (0.099, "nll"), (0.2, "auto"), (0.3, "auto"), (0.48, "auto"), (0.501, "dft"), (0.93, "dft")],
)
def test_recommendation_rule(mean_prob, expected):
    """Without class statistics the rule uses every token: auto's statistic, the geometric mean
    exp(-NLL) (here every token has the same p, so it equals the arithmetic mean)."""
    rec = recommend({"mean_prob": mean_prob, "nll": -math.log(mean_prob), "frac_below_0.1": 0.0})
    assert rec["objective"] == expected and rec["geo_p"] == pytest.approx(mean_prob)
    assert f"{mean_prob:.3g}" in rec["reasoning"] and rec["basis"] == "all"
    assert rec["alpha"] == pytest.approx(min(max((mean_prob - 0.1) / 0.4, 0), 1))


def _cls(mean_prob, below=0.0, tokens=100, nll=None):
    return {"tokens": tokens, "mean_prob": mean_prob, "frac_below_0.1": below, "frac_above_0.9": 0.0,
            "mean_entropy": 1.0, "nll": -math.log(mean_prob) if nll is None else nll}


# (overall mean, content, special, punct, end-of-turn mean) -> objective, warning codes
PROFILES = [
    # the demo's weak base: numbers and layout known, the demonstrations' words never seen (p ~ 1e-7): the
    # arithmetic mean says strong, the geometric mean (auto's statistic) says weak: nll
    ((0.6, _cls(0.42, 0.53, nll=6.0), _cls(1e-7, 1.0, tokens=10, nll=16.0), _cls(0.79, 0.2, nll=2.5), 1e-7), "nll",
     {"eot_unlearned"}),
    # strong prior, EOS never seen: DFT, but NLL on special tokens
    ((0.7, _cls(0.75, 0.05), _cls(0.01, tokens=10), _cls(0.9), 0.01), "dft:protect=special", {"eot_unlearned"}),
    # strong prior, a third of the output layout unknown: DFT with a floor
    ((0.7, _cls(0.9, 0.02), _cls(0.9, tokens=10), _cls(0.6, 0.35, nll=0.6), 0.9), "dft:floor=0.1", {"format_unlearned"}),
    ((0.7, _cls(0.9, 0.02), _cls(0.01, tokens=10), _cls(0.6, 0.35, nll=0.6), 0.01), "dft:floor=0.1,protect=special",
     {"eot_unlearned", "format_unlearned"}),
    # middling prior with an unlearned template token (not the end of turn): auto, which protects special tokens
    ((0.3, _cls(0.3, 0.2), _cls(0.05, tokens=300), _cls(0.6), 0.6), "auto", {"special_unlearned"}),
    # a well-known majority and a third of the content unknown: neither end clearly right
    ((0.6, _cls(0.6, 0.35, nll=1.5), _cls(0.9, tokens=10), _cls(0.9), 0.9), "auto", set()),
    # the end of turn is known, a template token (<think>...) is not: only that warning
    ((0.8, _cls(0.8), _cls(0.25, tokens=40), _cls(0.9), 0.9), "dft:protect=special", {"special_unlearned"}),
    # random model: NLL; the warnings say what DFT would do anyway
    ((0.003, _cls(0.003, 1.0), _cls(0.003, 1.0, tokens=10), _cls(0.003, 1.0), 0.003), "nll",
     {"eot_unlearned", "format_unlearned", "no_prior"}),
    # confident on everything
    ((0.97, _cls(0.96), _cls(0.99, tokens=10), _cls(0.99), 0.99), "dft", set()),
]


@pytest.mark.parametrize("inputs, objective, codes", PROFILES)
def test_recommendation_from_class_statistics(inputs, objective, codes):
    overall, content, special, punct, eot = inputs
    classes = {"content": content, "number": content, "content_all": content, "special": special, "punct": punct}
    rec = recommend({"mean_prob": overall, "nll": 1.0, "frac_below_0.1": 0.0}, classes,
                    {"tokens": 10, "mean_prob": eot, "token_ids": [0], "text": ["<eos>"]})
    assert rec["objective"] == objective
    assert {w["code"] for w in rec["warnings"]} == codes
    # the statistic: exp(-NLL) over the non-special classes (content, number, punct), token-weighted
    nll = (2 * content["tokens"] * content["nll"] + punct["tokens"] * punct["nll"]) / (2 * content["tokens"]
                                                                                        + punct["tokens"])
    assert rec["basis"] == "non-special" and rec["geo_p"] == pytest.approx(math.exp(-nll))
    assert f"{rec['geo_p']:.3g}" in rec["reasoning"]
    get_objective(rec["objective"])  # every recommendation is a valid objective
    if objective == "nll" and rec["mean_p"] > 0.5:
        assert "arithmetic mean is high" in rec["reasoning"]


def _stats(ids, p, ent=None):
    ids = np.asarray(ids)
    return TokenStats(ids, np.log(np.asarray(p, dtype=float)), np.asarray(ent if ent is not None else [1.0] * len(ids)))


def test_class_summaries_and_end_of_turn_are_exact():
    # vocabulary of 6: 0 content, 1 special (EOS), 2 number, 3 punct, 4 content, 5 special (end-of-turn)
    classes = np.array([0, 1, 2, 3, 0, 5 * 0 + 1])
    st = _stats([0, 4, 2, 3, 1, 5, 0, 2], [0.9, 0.5, 0.05, 0.95, 0.01, 0.2, 0.7, 0.3], [1, 2, 3, 4, 5, 6, 7, 8])
    c = class_summaries(st, classes)
    assert c["content"]["tokens"] == 3 and c["content"]["mean_prob"] == pytest.approx((0.9 + 0.5 + 0.7) / 3)
    assert c["number"]["frac_below_0.1"] == pytest.approx(0.5) and c["number"]["share"] == pytest.approx(2 / 8)
    assert c["special"]["mean_entropy"] == pytest.approx(5.5) and c["punct"]["frac_above_0.9"] == 1.0
    assert c["content_all"]["tokens"] == 5
    assert c["content_all"]["mean_prob"] == pytest.approx((0.9 + 0.5 + 0.05 + 0.7 + 0.3) / 5)
    eot = end_of_turn_summary(st, [1, 5], decode=lambda t: f"<{t}>")
    assert eot == {"token_ids": [1, 5], "tokens": 2, "mean_prob": pytest.approx(0.105), "min_prob": pytest.approx(0.01),
                   "frac_below_0.1": 0.5, "text": ["<1>", "<5>"]}
    empty = class_summaries(_stats([0], [0.5]), classes)["special"]
    assert empty["tokens"] == 0 and empty["mean_prob"] is None
    report = probe_report(st, classes, [1, 5], model="m")
    assert report["stats"]["p_percentiles"]["50"] == pytest.approx(np.percentile(np.exp(st.logp), 50))
    assert report["schema"] == 3 and report["model"] == "m"
    # the decision's statistic: exp(-NLL) over the non-special tokens (ids 0, 4, 2, 3, 0, 2)
    p = np.array([0.9, 0.5, 0.05, 0.95, 0.7, 0.3])
    assert report["recommendation"]["geo_p"] == pytest.approx(float(np.exp(np.log(p).mean())))
    assert report["recommendation"]["mean_p"] == pytest.approx(float(p.mean()))
    json.dumps(report)  # JSON-serialisable as is
    with pytest.raises(ValueError, match="no response tokens"):
        probe_report(_stats([], []), classes, [1, 5])


@pytest.fixture(scope="module")
def profiles(tiny_dir, problems_file):
    """Tiny models with each profile, trained for a few seconds on 8 examples:
    uniform (p = 1/V everywhere), certain (memorised everything), no_eos (memorised all
    but the end-of-turn token, never trained on it), format_only (only template and
    punctuation tokens trained: a high overall mean with no content prior)."""
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    exs = build_dataset(DataConfig(path=str(problems_file)), tok)[0][:8]
    classes = token_classes(tok)
    batch = collate(exs, tok.pad_token_id)

    def fit(keep):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_dir)
        labels = batch["labels"].clone()
        labels[(labels != -100) & ~keep(classes[labels.clamp_min(0)])] = -100
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        _, head = decoder_and_head(model)
        for _ in range(80):
            h = _hidden(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
            loss = token_loss(h.reshape(-1, h.shape[-1]), head.weight, labels[:, 1:].reshape(-1), "nll").loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval()

    uniform = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        uniform.model.norm.weight.zero_()  # hidden states 0 -> every logit 0 -> p = 1/V
    models = {"uniform": uniform, "certain": fit(lambda c: torch.ones_like(c, dtype=torch.bool)),
              "no_eos": fit(lambda c: c != SPECIAL), "format_only": fit(lambda c: (c == PUNCT) | (c == SPECIAL))}
    return tok, exs, models


# profile -> (objective, warning codes, a check on the statistics)
PROBE_CASES = {
    "uniform": ("nll", {"eot_unlearned", "format_unlearned", "no_prior"},
                lambda r, v: r["stats"]["mean_prob"] == pytest.approx(1 / v, rel=1e-4)
                and r["stats"]["mean_entropy"] == pytest.approx(np.log(v), rel=1e-4)),
    "certain": ("dft", set(), lambda r, v: r["stats"]["frac_above_0.9"] > 0.8 and r["end_of_turn"]["mean_prob"] > 0.9),
    "no_eos": ("dft:protect=special", {"eot_unlearned"},
               lambda r, v: r["classes"]["content_all"]["mean_prob"] > 0.9 and r["end_of_turn"]["mean_prob"] < 0.01),
    "format_only": ("nll", {"no_prior"},
                    lambda r, v: r["classes"]["punct"]["mean_prob"] > 0.9 and r["classes"]["content_all"]["mean_prob"] < 0.01
                    and r["stats"]["mean_prob"] > 0.2),
}


@pytest.mark.parametrize("profile", sorted(PROBE_CASES))
def test_probe_on_models_built_to_have_each_profile(profiles, profile, tmp_path):
    tok, exs, models = profiles
    objective, codes, check = PROBE_CASES[profile]
    res = probe(models[profile], exs, tok, model_name=profile, data="problems", batch_size=3)
    rec = res["recommendation"]
    assert rec["objective"] == objective, format_probe(res)
    assert {w["code"] for w in rec["warnings"]} == codes, format_probe(res)
    assert check(res, len(tok)), format_probe(res)
    # the v1 keys the report reads are still there
    for key in ("mean_prob", "frac_below_0.1", "frac_above_0.9", "mean_entropy"):
        assert isinstance(res["stats"][key], float)
    assert res["model"] == profile and res["examples"] == len(exs) and rec["reasoning"]
    assert res["end_of_turn"]["tokens"] == len(exs)  # every response ends with EOS
    assert res["end_of_turn"]["text"] == ["<|endoftext|>", "<|im_end|>"]
    text = format_probe(res)
    assert f"recommended objective: {objective}" in text and all(f"[{c}]" in text for c in codes)
    write_json(tmp_path / "probe.json", res)
    assert json.loads((tmp_path / "probe.json").read_text()) == json.loads(json.dumps(res))


def test_analyze_reports_classes_and_end_of_turn_per_model(profiles):
    tok, exs, models = profiles
    stats = {name: token_stats(models[name], exs, tok.pad_token_id) for name in ("certain", "no_eos")}
    res = analyze(stats, lambda t: tok.decode([t]), base="certain", classes=token_classes(tok).numpy(),
                  eot_ids=end_of_turn_ids(tok))
    assert res["end_of_turn"]["certain"]["mean_prob"] > 0.9
    assert res["end_of_turn"]["no_eos"]["mean_prob"] < 0.01
    assert set(res["classes"]["no_eos"]) == {"content", "special", "number", "punct", "content_all"}
    assert analyze(stats, str)["classes"] == {}  # without a class table: no class statistics


@pytest.fixture(scope="module")
def report_inputs(tiny_dir, problems_file, tmp_path_factory):
    """Two tiny real runs (nll, dft), an analysis of both and a probe: what a user would report on."""
    root = tmp_path_factory.mktemp("report")
    runs = []
    for obj in ("nll", "dft"):
        cfg = Config(model=ModelConfig(name_or_path=str(tiny_dir)), data=DataConfig(path=str(problems_file)),
                     train=TrainConfig(objective=obj, lr=3e-3, global_batch=8, micro_batch=8, max_steps=4,
                                       out=str(root / obj)))
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
    for section in ("Summary", "Learning curves", "Token probabilities", "Pre-flight probe", "Config differences"):
        assert f"<h2>{section}</h2>" in page
    assert "train.objective" in page and page.count("data:image/png;base64,") >= 6
    assert "No evaluation results among the inputs" in page  # runs without eval/: the summary says what is missing
    # the runs' curves are drawn per objective, with the analysis' models in the same colours
    assert re.search(r'<span class="sw" style="background:#1f77b4"></span>nll', page)
    assert "http://" not in page and "https://" not in page.replace("https://arxiv", "")  # self-contained
    with pytest.raises(ValueError, match="nothing to report"):
        build_report([tmp_path])


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(page: Path, shot: Path, tmp: Path) -> str:
    """Screenshot a page in headless Chromium; return its log (console messages included)."""
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr",
           "--v=0", "--window-size=1280,1600", f"--screenshot={shot}", page.as_uri()]
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
