"""The report's summary block, findings, escaping, paths, folding and first-screen layout, on a
demo-shaped folder written by hand (per-sample files whose means are known)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from dftune.analysis import summary as S
from dftune.analysis.report import Run, build_report, write_report
from dftune.analysis.tokens import ENTROPY_EDGES, P_EDGES
from dftune.eval.metrics import accuracy_by_problem, summarize

XSS = "<script>alert(1)</script>"
OOD = "ood<img src=x onerror=alert(1)>"  # a benchmark name is untrusted text too


def write_eval(folder: Path, correct: dict[str, dict[str, list[bool]]], *, model="m", truncated=0.05,
               warnings=(), completion="So the answer is 7.") -> dict:
    """An evaluation folder as `dftune eval` writes it: samples.jsonl (one row per sample) and
    summary.json built from the same verdicts with the evaluation's own metric code."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(next(iter(correct.values())).values())))
    rows = [{"benchmark": b, "id": i, "sample": j, "prompt": f"<|user|>What is {i}?", "completion": completion,
             "gold": ["7"], "extracted": "7" if ok else "8", "correct": ok, "status": "ok", "reason": "", "rule": "equal",
             "num_tokens": 12, "finish_reason": "stop", "repetitive": False}
            for b, probs in correct.items() for i, v in probs.items() for j, ok in enumerate(v)]
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    benches = {b: {**summarize(probs, ks=(1, n)), "truncated": truncated, "mean_tokens": 12.0} for b, probs in correct.items()}
    key = f"avg@{n}"
    s = {"model": model, "prompt": "chat", "backend": "hf", "sampling": {"n": n, "temperature": 1.0}, "n": n,
         "primary": key, "benchmarks": benches, "mean": {key: float(np.mean([m[key] for m in benches.values()]))},
         "warnings": list(warnings), "finished": "2026-01-01T00:00:00"}
    (folder / "summary.json").write_text(json.dumps(s))
    return s


def verdicts(rng, p: float, benches=("id", OOD), problems=30, n=4) -> dict:
    return {b: {f"{b}-{i}": [bool(x) for x in rng.random(n) < p] for i in range(problems)} for b in benches}


def log_rows(loss0, loss1, nll0, nll1, steps=20) -> list[dict]:
    t = np.linspace(0, 1, steps)
    return [{"step": k + 1, "loss": float(loss0 + (loss1 - loss0) * x), "nll": float(nll0 + (nll1 - nll0) * x),
             "mean_prob": 0.5, "entropy": 1.0, "lr": 1e-3, "grad_norm": 1.0} for k, x in enumerate(t)]


def analysis(tails: dict[str, tuple], eot: dict[str, float] | None = None, tokens: int = 5000) -> dict:
    """token_probs.json with the given (frac_below_0.1, frac_above_0.9, mean_entropy) per model."""
    bins = len(P_EDGES) - 1
    out = {"p_edges": P_EDGES, "entropy_edges": ENTROPY_EDGES, "base": "base", "models": list(tails),
           "summary": {m: {"tokens": tokens, "mean_prob": 0.5, "median_prob": 0.5, "frac_below_0.1": lo,
                           "frac_above_0.9": hi, "mean_entropy": ent, "nll": 1.0} for m, (lo, hi, ent) in tails.items()},
           "hist": {m: [1 / bins] * bins for m in tails}, "entropy_hist": {m: [1 / 12] * 12 for m in tails},
           "shift_vs_base": {m: [0.0] * bins for m in tails if m != "base"},
           "bin_tokens": {m: [[[XSS, 2]]] * bins for m in tails}, "risers": {}, "fallers": {}}
    if eot is not None:
        out["end_of_turn"] = {m: {"tokens": 10, "mean_prob": p} for m, p in eot.items()}
    return out


P_CORRECT = {"weak": {"base": 0.1, "nll": 0.3, "dft": "nll"}, "strong": {"base": 0.3, "nll": 0.35, "dft": 0.75}}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A demo folder: two priors; base (1 seed), nll and dft (3 seeds each). At the strong prior
    DFT is far better, NLL rises under it while its loss falls, it polarises the token
    probabilities, leaves EOS unlearned and hits the token budget more; at the weak prior DFT's
    samples equal NLL's seed by seed and nothing differs."""
    root = tmp_path_factory.mktemp("reports") / "demo"
    rng = np.random.default_rng(7)
    points, truth = [], {}
    for prior, ps in P_CORRECT.items():
        for obj, p in ps.items():
            for seed in range(1 if obj == "base" else 3):
                name = f"prior={prior}_objective={obj}_seed={seed}"
                points.append({"name": name, "values": {"prior": prior, "objective": obj, "seed": seed}})
                correct = truth[(prior, "nll", seed)] if p == "nll" else verdicts(rng, p)
                truth[(prior, obj, seed)] = correct
                trunc = 0.3 if (prior, obj) == ("strong", "dft") else 0.05
                model = XSS if (prior, obj, seed) == ("weak", "base", 0) else f"/abs/{name}/final"
                write_eval(root / name / "eval", correct, model=model, truncated=trunc,
                           warnings=[f"grader note {XSS}"] if obj == "base" else [],
                           completion=f"Let me see {XSS}. So the answer is 7." if obj == "base" else "Answer: 7")
                if obj == "base":
                    continue
                (root / name / "config.yaml").write_text(yaml.safe_dump(
                    {"model": {"name_or_path": f"/abs/cache/{prior}/final"},
                     "train": {"objective": obj, "seed": seed, "out": str(root / name)}}))
                rises = prior == "strong" and obj == "dft"
                rows = log_rows(1.0, 0.5, 1.0, 1.3) if rises else log_rows(1.0, 0.6, 1.0, 0.6) if obj == "nll" else \
                    log_rows(0.3, 0.2, 1.0, 0.7)
                (root / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                (root / name / "eval_curve.jsonl").write_text(
                    "".join(json.dumps({"step": s, "id": 0.1 * s}) + "\n" for s in (0, 5, 10)))
    (root / "sweep.json").write_text(json.dumps({"config": "dftune demo", "axes": ["prior", "objective", "seed"],
                                                 "roles": {"compare": "objective", "replicate": "seed",
                                                           "baseline": "nll"}, "points": points}))
    for prior, a in {"strong": analysis({"base": (0.18, 0.40, 1.0), "nll": (0.10, 0.55, 0.8), "dft": (0.23, 0.60, 0.46)},
                                        {"base": 0.01, "nll": 0.9, "dft": 0.05}),
                     "weak": analysis({"base": (0.30, 0.20, 2.0), "nll": (0.295, 0.205, 1.9),
                                       "dft": (0.30, 0.20, 1.8)})}.items():
        (root / f"analysis_{prior}").mkdir()
        (root / f"analysis_{prior}" / "token_probs.json").write_text(json.dumps(a))
    (root / "probe_strong.json").write_text(json.dumps(
        {"schema": 2, "model": "strong base", "stats": {"mean_prob": 0.7, "frac_below_0.1": 0.1, "frac_above_0.9": 0.5,
                                                        "mean_entropy": 0.9},
         "recommendation": {"objective": "dft", "reasoning": "content p 0.70 >= 0.5", "alpha": 1.0, "basis": "content",
                            "warnings": [{"code": "eot_unlearned", "message": f"EOS p 0.01 {XSS}"}]}}))
    (root / "probe_weak.json").write_text(json.dumps(  # a v1 probe: no classes, warnings or schema
        {"model": "weak base", "stats": {"mean_prob": 0.05, "frac_below_0.1": 0.8, "frac_above_0.9": 0.01,
                                         "mean_entropy": 3.0}, "recommendation": {"objective": "nll", "reasoning": "low"}}))
    (root / "tables.json").write_text(json.dumps({"tables": [
        {"title": "Stopping", "note": "fraction of samples", "columns": ["prior", "objective", "stopped"],
         "rows": [["strong", "dft", 0.7], {"prior": "weak", "objective": XSS, "stopped": 0.95}]}]}))
    inputs = [root] + [root / f"analysis_{p}" for p in P_CORRECT] + [root / f"probe_{p}.json" for p in P_CORRECT]
    page = write_report(inputs, root / "report.html", title="demo report").read_text()
    return root, inputs, page, truth


def rows_of(page: str, group: str) -> dict[str, dict]:
    """The summary table's rows of a group: data-* attributes per objective."""
    block = re.search(rf"<div class='group' data-group='{re.escape(group)}'>(.*?)</table>", page, re.DOTALL).group(1)
    out = {}
    for attrs in re.findall(r"<tr( data-[^>]*)>", block):
        d = dict(re.findall(r'data-(\w+)="([^"]*)"', attrs))
        arm = d.pop("arm")
        out[arm] = {k: float(v) for k, v in d.items()}
    return out


def score_from_files(folders: list[Path]) -> float:
    """The mean over seeds of the mean over benchmarks of per-problem accuracy, read from
    samples.jsonl with plain Python (no dftune code)."""
    per_seed = []
    for f in folders:
        acc: dict[str, dict[str, list]] = {}
        for line in (f / "samples.jsonl").read_text().splitlines():
            r = json.loads(line)
            acc.setdefault(r["benchmark"], {}).setdefault(r["id"], []).append(r["correct"])
        per_seed.append(np.mean([np.mean([np.mean(v) for v in probs.values()]) for probs in acc.values()]))
    return float(np.mean(per_seed))


def test_summary_values_match_the_per_sample_files(demo):
    root, _, page, _ = demo
    for prior, ps in P_CORRECT.items():
        rows = rows_of(page, f"prior={prior}")
        assert list(rows) == sorted(rows, key=lambda o: -rows[o]["score"])  # ranked by the primary metric
        for obj in ps:
            seeds = 1 if obj == "base" else 3
            want = score_from_files([root / f"prior={prior}_objective={obj}_seed={s}" / "eval" for s in range(seeds)])
            assert rows[obj]["score"] == pytest.approx(want, abs=1e-12)
            # and the summary.json numbers agree with the per-sample files
            assert want == pytest.approx(np.mean([json.loads((root / f"prior={prior}_objective={obj}_seed={s}" / "eval" /
                                                              "summary.json").read_text())["mean"]["avg@4"]
                                                   for s in range(seeds)]), abs=1e-12)
            if obj != "nll":
                assert rows[obj]["diff"] == pytest.approx(want - rows["nll"]["score"], abs=1e-12)
                assert rows[obj]["lo"] <= rows[obj]["diff"] <= rows[obj]["hi"]
        assert "diff" not in rows["nll"]  # the baseline itself
    strong, weak = rows_of(page, "prior=strong"), rows_of(page, "prior=weak")
    assert strong["dft"]["lo"] > 0.2 and strong["dft"]["p"] < 0.01  # 0.75 vs 0.35 per sample, 3 seeds
    assert weak["dft"]["diff"] == 0 and weak["dft"]["lo"] < 0 < weak["dft"]["hi"]  # identical samples
    assert "Summary" in page and "two-level bootstrap" in page


def test_interval_resamples_seeds_as_well_as_problems():
    """Every problem has the same accuracy within a seed, so problem resampling alone gives a
    zero-width interval; DFT's two seeds score 0.5 and 1.0, NLL's both 0.5: the replicates of
    the difference are 0, 0.25, 0.5 with probability 1/4, 1/2, 1/4 -> the interval is [0, 0.5]."""
    probs = lambda a: {"b": {str(i): a for i in range(20)}}
    scores, boot, benches, problems = S.bootstrap({"dft": [probs(0.5), probs(1.0)], "nll": [probs(0.5), probs(0.5)]},
                                                  reps=4000)
    assert scores == {"dft": [0.5, 1.0], "nll": [0.5, 0.5]} and benches == ["b"] and problems == 20
    d = boot["dft"] - boot["nll"]
    assert set(np.round(d, 9)) == {0.0, 0.25, 0.5}
    assert np.mean(d == 0.25) == pytest.approx(0.5, abs=0.03)
    assert S.interval(d) == [0.0, 0.5]


def test_with_one_seed_the_interval_agrees_with_dftune_compare(tmp_path):
    """One seed per objective: the paired bootstrap over problems of `dftune compare`."""
    from dftune.eval.compare import compare

    rng = np.random.default_rng(3)
    a, b = verdicts(rng, 0.6, problems=80), verdicts(rng, 0.45, problems=80)
    write_eval(tmp_path / "a", a)
    write_eval(tmp_path / "b", b)
    c = compare(tmp_path / "a", tmp_path / "b")
    g = S.Group("", {})
    for name in ("a", "b"):
        r = Run(name, tmp_path / name, summary=json.loads((tmp_path / name / "summary.json").read_text()))
        r.acc = accuracy_by_problem([json.loads(x) for x in (tmp_path / name / "samples.jsonl").read_text().splitlines()],
                              r.summary)
        g.arms[name] = S.Arm(name, [r])
    g.baseline = "b"
    S.score_group(g, reps=10_000)
    arm = g.arms["a"]
    assert arm.diff == pytest.approx(c["mean"]["diff"], abs=1e-12)
    for mine, theirs in zip(arm.diff_ci95, c["mean"]["ci95"]):
        assert mine == pytest.approx(theirs, abs=0.01)  # two bootstraps of the same statistic
    assert (arm.p < 0.05) == (c["mean"]["p_bootstrap"] < 0.05)


def test_findings_are_computed_from_the_data(demo):
    _, _, page, _ = demo
    lines = []  # each group's findings sit under its table, without the group's name
    for group, items in re.findall(r"<div class='group' data-group='([^']*)'>.*?<ul class='findings'>(.*?)</ul>", page,
                                   re.DOTALL):
        lines += [f"{group}: {x}" for x in re.findall(r"<li>(.*?)</li>", items)]
    text = "\n".join(lines)
    # at the strong prior, each finding the data supports
    assert len(lines) == 9
    assert re.search(r"prior=strong: dft beats nll by \+\d+\.\d points \(95% CI \+\d+\.\d to \+\d+\.\d", text)
    assert "prior=strong: dft polarises token probabilities: p &lt; 0.1 18% → 23%, p &gt; 0.9 40% → 60%, " \
           "entropy -54%" in text
    assert "prior=strong: nll raises token probabilities across the board" in text
    assert "prior=strong: NLL rises under dft while its loss falls (3 of 3 seeds; loss -44%, NLL +25%" in text
    assert "prior=strong: dft leaves the end-of-turn token unlearned: mean p 0.05 (nll: 0.90)" in text
    assert "prior=strong: dft stops less: 30% of samples hit the token budget (nll: 5%)" in text
    assert "prior=strong: the probe recommended dft; measured best: dft" in text and "agrees" in text
    # and none at the weak prior, where nothing differs
    assert "prior=weak: no objective&#x27;s accuracy differs clearly from nll&#x27;s" in text
    weak = [x for x in lines if x.startswith("prior=weak")]
    assert not any(w in x for x in weak for w in ("beats", "polarises", "raises", "NLL rises", "unlearned", "stops less"))
    assert not any("NLL rises under nll" in x or "base" in x.split(":")[1][:6] for x in lines)


@pytest.mark.parametrize("before, after, tokens, kind", [
    ((0.18, 0.40), (0.23, 0.55), 5000, "polarises"),
    ((0.18, 0.40), (0.10, 0.55), 5000, "raises"),
    ((0.011, 0.892), (0.0187, 0.934), 2720, "polarises"),  # the demo's strong prior: +0.8 point is 2.3 SE
    ((0.011, 0.892), (0.0187, 0.934), 500, None),  # the same shares over fewer tokens: within the noise
    ((0.18, 0.40), (0.184, 0.55), 10**6, None),  # the low tail grew by under half a point
    ((0.18, 0.40), (0.25, 0.35), 5000, None),  # only the low tail grew: not polarised
])
def test_token_finding_thresholds(before, after, tokens, kind):
    a = analysis({"base": (*before, 1.0), "dft": (*after, 0.5)}, tokens=tokens)
    found = S.token_findings(a, "g")
    assert [f.kind for f in found] == ([kind] if kind else [])


@pytest.mark.parametrize("loss, nll, hit", [
    ((1.0, 0.5), (1.0, 1.3), True),
    ((1.0, 0.5), (1.0, 1.01), False),  # NLL rose by under 2%
    ((1.0, 0.5), (1.0, 0.7), False),  # both fell
    ((1.0, 1.2), (1.0, 1.3), False),  # the loss rose too
])
def test_nll_rises_thresholds(loss, nll, hit):
    assert (S.nll_rises(log_rows(*loss, *nll)) is not None) == hit
    assert S.nll_rises(log_rows(1.0, 0.5, 1.0, 0.5)) is None  # objective == NLL


def test_probe_finding_says_when_the_recommendation_was_clearly_wrong():
    def run(acc):
        r = Run("r", Path("."), summary={"primary": "avg@1", "sampling": {"n": 1}, "mean": {}, "benchmarks": {}})
        r.acc = {"b": {str(i): a for i, a in enumerate(acc)}}
        return r

    g = S.Group("g", {}, baseline="nll")
    g.arms = {"nll": S.Arm("nll", [run([1.0] * 40)]), "dft": S.Arm("dft", [run([0.0] * 20 + [1.0] * 20)])}
    g.probe = Run("probe_g", Path("."), probe={"recommendation": {"objective": "dft:protect=special"}})
    S.score_group(g)
    (f,) = S.probe_finding(g)
    assert "recommended dft:protect=special; measured best: nll (100.0%); dft -50.0 points" in f.text
    assert f.text.endswith("disagrees")


def test_escaping_relative_paths_and_folding(demo):
    root, _, page, _ = demo
    assert XSS not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown as text
    assert str(root) not in page and str(root.parent) not in page  # every path relative to the page
    inputs = re.search(r"<h2>Inputs</h2><ul>(.*?)</ul>", page).group(1)
    assert re.findall(r"<code>(.*?)</code>", inputs) == [".", "analysis_weak", "analysis_strong", "probe_weak.json",
                                                         "probe_strong.json"]
    # the summary comes first; detail is folded away, not deleted
    assert page.index("id='summary'") < page.index("<details")
    assert page.index("id='summary'") < page.index("<h2>Token probabilities</h2>") < page.index("<h2>Learning curves")
    seeds = re.search(r"<details><summary>Every seed</summary>(.*?)</details>", page, re.DOTALL).group(1)
    assert seeds.count("data:image/png;base64,") == 1 and "learning curves of every seed" in seeds
    completions = re.findall(r"<details><summary>prior=(\w+)_objective=(\w+)_seed=\d: (\d) correct", page)
    assert len(completions) == 14 and "<details open" not in page
    assert "<mark>7</mark>" in page  # the extracted answer highlighted in the completion
    assert "<h3>Stopping</h3>" in page and "0.95" in page  # tables.json rendered as given
    # one colour per objective: the same swatch colour wherever the objective is named
    sw = set(re.findall(r'<span class="sw" style="background:(#\w+)"></span>dft<', page))
    assert len(sw) == 1


def test_two_evaluations_get_a_paired_comparison(tmp_path):
    rng = np.random.default_rng(5)
    write_eval(tmp_path / "evals" / "sft", verdicts(rng, 0.3))
    write_eval(tmp_path / "evals" / "dft", verdicts(rng, 0.8))
    page = build_report([tmp_path / "evals" / "sft", tmp_path / "evals" / "dft"], base=tmp_path)
    assert "<h2>Paired comparison</h2>" in page and "dft − sft" in page
    rows = rows_of(page, "")
    assert set(rows) == {"sft", "dft"} and rows["dft"]["lo"] > 0  # the first is the reference
    assert "<code>evals/sft</code>" in page


def test_runs_and_evaluations_are_paired_by_the_runs_config(tmp_path):
    """Evaluations in folders named anything join the training runs whose final model they
    evaluated (from each run's config); the objective column is the run's objective, its
    schedule when it moved; the baseline is nll by name; Δ is objective − baseline."""
    rng = np.random.default_rng(3)
    for name, train, p in (("r1", {"objective": "dft", "objective_schedule": "nll@0.2,dft"}, 0.8),
                           ("r2", {"objective": "nll"}, 0.3)):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": "base"},
                                                         "train": {**train, "seed": 0, "out": str(run)}}))
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log_rows(1.0, 0.5, 1.0, 0.8)))
        write_eval(tmp_path / "evals" / f"e-{name}", verdicts(rng, p), model=str(run / "final"))
    # a run whose eval/ subfolder evaluated another model: not this run's evaluation
    other = tmp_path / "runs" / "r3"
    other.mkdir()
    (other / "config.yaml").write_text(yaml.safe_dump({"train": {"objective": "focal", "out": str(other)}}))
    (other / "log.jsonl").write_text(json.dumps(log_rows(1.0, 0.5, 1.0, 0.8)[0]) + "\n")
    write_eval(other / "eval", verdicts(rng, 0.5), model="somewhere/else/final")
    inputs = [tmp_path / "evals" / "e-r1", tmp_path / "runs" / "r1", tmp_path / "runs" / "r2", tmp_path / "evals" / "e-r2",
              other]
    page = build_report(inputs, base=tmp_path)
    rows = rows_of(page, "")
    assert set(rows) == {"nll@0.2,dft", "nll"}, rows  # paired by config, named by what was trained; r3 unevaluated
    assert rows["nll@0.2,dft"]["lo"] > 0 and rows["nll"].get("diff") is None  # nll is the baseline
    assert "Δ = objective − nll" in page


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
SCREEN = (1280, 800)  # a laptop's first screen


def test_summary_block_is_in_the_first_screen(demo, tmp_path):
    if not _chromium():
        pytest.skip("Chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    from PIL import Image

    _, _, page, _ = demo
    probe = tmp_path / "probe.html"  # the page plus a script that records the summary's box
    probe.write_text(page.replace("</body>", "<script>var b=document.getElementById('summary').getBoundingClientRect();"
                                  "document.body.setAttribute('data-box',[b.left,b.top,b.right,b.bottom].join(','));"
                                  "document.body.setAttribute('data-width',window.innerWidth);</script></body>"))
    flags = CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={SCREEN[0]},{SCREEN[1]}"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                         timeout=120, check=False).stdout
    box = [float(x) for x in re.search(r'data-box="([^"]+)"', dom).group(1).split(",")]
    assert int(re.search(r'data-width="(\d+)"', dom).group(1)) == SCREEN[0]
    left, top, right, bottom = box
    assert 0 <= left < right <= SCREEN[0] and 0 <= top < bottom <= SCREEN[1], box
    # the screenshot of the first screen shows it: the summary's tinted background fills its box
    shot = tmp_path / "shot.png"
    html_file = tmp_path / "page.html"
    html_file.write_text(page)
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", html_file.as_uri()], capture_output=True, timeout=120,
                   check=False)
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    assert img.shape[:2] == (SCREEN[1], SCREEN[0])
    tint = np.all(np.abs(img - np.array([0xEE, 0xF4, 0xFB])) <= 2, axis=-1)  # #eef4fb
    inside = tint[int(top):int(bottom), int(left):int(right)].mean()
    assert inside > 0.3 and tint.mean() < 0.9 * (bottom - top) * (right - left) / (SCREEN[0] * SCREEN[1]) + 0.01


def test_a_sweep_without_roles_groups_by_its_other_axes(tmp_path):
    """`dftune sweep` writes no roles: objective is compared, seed replicates, nll is the
    baseline, and every other axis (here the learning rate) makes a group."""
    rng = np.random.default_rng(1)
    points = []
    for lr in (1e-3, 1e-2):
        for obj in ("dft", "nll"):
            for seed in (0, 1):
                values = {"train.objective": obj, "train.lr": lr, "train.seed": seed}
                name = f"objective={obj}_lr={lr}_seed={seed}"
                points.append({"name": name, "values": values})
                write_eval(tmp_path / "sw" / name / "eval", verdicts(rng, 0.5, problems=10))
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps({"config": "x.yaml", "axes": list(values), "points": points}))
    page = build_report([tmp_path / "sw"], base=tmp_path / "sw")
    for lr in ("0.001", "0.01"):
        rows = rows_of(page, f"lr={lr}")
        assert set(rows) == {"dft", "nll"} and "diff" in rows["dft"] and "diff" not in rows["nll"]
    assert "<h2>Sweep</h2>" in page


@pytest.mark.parametrize("text, answer, want", [
    ("12 + 0 = 12. The answer is \\boxed{2}.", "2", "12 + 0 = 12. The answer is \\boxed{<mark>2</mark>}."),
    ("so 7 <b>", "7", "so <mark>7</mark> &lt;b&gt;"),
    ("no answer <i>", None, "no answer &lt;i&gt;"),
    ("x = 3", "<s>", "x = 3"),
])
def test_completion_highlights_the_extracted_answer(text, answer, want):
    from dftune.analysis.evidence import _marked

    assert _marked(text, answer) == want


def test_tables_json_is_rendered_generically():
    from dftune.analysis.sections import tables_section

    page = tables_section([{"title": "EOS", "columns": ["objective", "p(EOS)"], "rows": [["nll", 0.91234567]]},
                           "not a table", {"title": "empty"}], "demo")
    assert "<h3>EOS</h3>" in page and "<td>0.9123</td>" in page and "<h3>empty</h3>" in page
    assert tables_section({"tables": []}, "demo") == "" and tables_section("junk", "demo") == ""


def test_an_evaluation_without_samples_is_ranked_by_its_summary(tmp_path):
    rng = np.random.default_rng(2)
    a = write_eval(tmp_path / "nll", verdicts(rng, 0.3))
    b = write_eval(tmp_path / "dft", verdicts(rng, 0.6))
    (tmp_path / "dft" / "samples.jsonl").unlink()  # an old evaluation: summary.json only
    page = build_report([tmp_path / "nll", tmp_path / "dft"], base=tmp_path)
    rows = rows_of(page, "")
    assert rows["dft"]["score"] == pytest.approx(b["mean"]["avg@4"]) and rows["nll"]["score"] == pytest.approx(
        a["mean"]["avg@4"])
    assert rows["dft"]["diff"] == pytest.approx(b["mean"]["avg@4"] - a["mean"]["avg@4"]) and "lo" not in rows["dft"]
    assert "<h2>Paired comparison</h2>" not in page  # compare needs both samples.jsonl
