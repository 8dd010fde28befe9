"""Evaluations comparable with the paper's: both graders' verdicts on every sample and in the
summaries, the primary grader, settings refused before anything loads or is written,
`compare` refusing unlike evaluations (and --force recording why), the paper's numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dftune.eval.benchmarks import load_benchmark
from dftune.eval.compare import CompareError, compare, compare_markdown
from dftune.eval.generate import EngineConfig, SamplingConfig
from dftune.eval.grade import grade_batch
from dftune.eval.run import EvalConfig, _verdicts, evaluate, markdown_table, summarize_rows
from dftune.files import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


@pytest.fixture
def toy(tmp_path) -> Path:
    (tmp_path / "data" / "toy").mkdir(parents=True)
    rows = [{"id": str(i), "question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(3)]
    (tmp_path / "data" / "toy" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "data"


def _cfg(model, data, **kw):
    kw = {"backend": "hf", "benchmarks": ["toy"], "sampling": SamplingConfig(n=2, max_new_tokens=4, seed=1), **kw}
    return EvalConfig(model=str(model), data_dir=str(data), grade_workers=2, engine=EngineConfig(batch_size=8), **kw)


# Completions whose verdicts differ between the graders (gold 5): the paper's harness reads the
# last box alone and has a percentage rule; math-verify reads close boxes as one answer.
DIFFER = [("First \\boxed{3} or \\boxed{5}", False, True), ("\\boxed{500}", False, True),
          ("\\boxed{5}", True, True), ("no idea", False, False)]


def test_both_verdicts_on_every_sample_and_in_the_summary(toy):
    problems = {"toy": load_benchmark("toy", toy)[:1]}
    p = problems["toy"][0]
    p.golds = ["5"]
    for grader in ("math-verify", "paper"):
        cfg = _cfg("m", toy, grader=grader, sampling=SamplingConfig(n=len(DIFFER)))
        both = _verdicts([c for c, _, _ in DIFFER], [p] * len(DIFFER), cfg)
        assert [(v["math-verify"]["correct"], v["paper"]["correct"]) for v in both] == [(a, b) for _, a, b in DIFFER]
        done = {("toy", p.id): {j: {**v[grader], "verdicts": v} for j, v in enumerate(both)}}
        s = summarize_rows(cfg, problems, done)
        m, n = s["benchmarks"]["toy"], len(DIFFER)
        assert m["by_grader"]["math-verify"][f"avg@{n}"] == 1 / 4 and m["by_grader"]["paper"][f"avg@{n}"] == 3 / 4
        assert m[f"avg@{n}"] == m["by_grader"][grader][f"avg@{n}"] and s["grader"] == grader
        assert m["by_grader"]["paper"][f"pass@{n}"] == 1.0 and m["by_grader"]["paper"][f"maj@{n}"] == 1.0
        assert s["mean"][f"avg@{n}"] == s["mean_by_grader"][grader][f"avg@{n}"]
        table = markdown_table(s)
        assert table.startswith(f"Graded by **{grader}**") and "Under both graders" in table
        assert f"| toy | 25.00 | 75.00 |" in table  # avg@n math-verify, paper


def test_an_evaluation_stores_both_verdicts(tiny_dir, toy, tmp_path):
    out = tmp_path / "ev"
    summary = evaluate(_cfg(tiny_dir, toy, grader="paper"), out, progress=False)
    rows = read_jsonl(out / "samples.jsonl")
    assert len(rows) == 6 and summary["grader"] == "paper" and summary["prompt"] == "qwen-boxed"
    paper = grade_batch([(r["completion"], r["gold"], "toy") for r in rows], protocol="paper", workers=1)
    mv = grade_batch([(r["completion"], r["gold"]) for r in rows], workers=1)
    for r, p, v in zip(rows, paper, mv):
        assert r["verdicts"]["paper"] == p.to_dict() and r["verdicts"]["math-verify"] == v.to_dict()
        assert r["correct"] == p.correct and r["extracted"] == p.extracted
    stored = json.loads((out / "eval_config.json").read_text())
    assert stored["graders"] == {"math-verify": "3", "paper": "1"} and stored["stops"]["policy"] == "end-of-turn"
    assert stored["stops"]["tokens"] == ["<|im_end|>"]


@pytest.mark.parametrize("change, match", [
    ({"prompt": "deepseek"}, "prompt: must be one of qwen-boxed, .*; got 'deepseek'"),
    ({"grader": "lighteval"}, "grader: must be one of math-verify, paper; got 'lighteval'"),
    ({"stops": "never"}, "stops: must be one of end-of-turn, .*; got 'never'"),
    ({"backend": "sglang"}, "backend: must be one of vllm, hf; got 'sglang'"),
])
def test_bad_settings_are_refused_before_anything_is_written(change, match, tiny_dir, toy, tmp_path):
    out = tmp_path / "ev"
    with pytest.raises(ValueError, match=match):
        evaluate(_cfg(tiny_dir, toy, **change), out, progress=False)
    assert not out.exists()
    evaluate(_cfg(tiny_dir, toy), out, progress=False)  # nothing left behind blocks the folder


def test_chat_without_a_template_is_refused_before_the_model_loads(tiny_dir, toy, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    (model / "model.safetensors").write_bytes(b"not weights")  # loading the model would fail loudly
    with pytest.raises(ValueError, match="chat template"):
        evaluate(_cfg(model, toy, prompt="chat"), tmp_path / "ev", progress=False)
    assert not (tmp_path / "ev").exists()


def _two(tiny_dir, toy, tmp_path, **b_change):
    a, b = tmp_path / "a", tmp_path / "b"
    evaluate(_cfg(tiny_dir, toy), a, progress=False)
    evaluate(_cfg(tiny_dir, toy, **b_change), b, progress=False)
    return a, b


@pytest.mark.parametrize("b_change, keys", [
    ({"sampling": SamplingConfig(n=2, max_new_tokens=4, seed=1, temperature=0.7)}, ["sampling.temperature"]),
    ({"sampling": SamplingConfig(n=2, max_new_tokens=5, seed=1)}, ["sampling.max_new_tokens"]),
    ({"prompt": "chat"}, ["prompt"]),
    ({"grader": "paper"}, ["grader"]),
    ({"stops": "eos"}, ["stops.policy", "stops.tokens"]),
])
def test_compare_refuses_unlike_evaluations(b_change, keys, tiny_dir, toy, tmp_path):
    a, b = _two(tiny_dir, toy, tmp_path, **b_change)
    with pytest.raises(CompareError, match="unlike evaluations") as e:
        compare(a, b, reps=100)
    for k in keys:
        assert f"{k} (A " in str(e.value)
    forced = compare(a, b, reps=100, force=True)
    assert forced["forced"] and [d["key"] for d in forced["differences"]] == keys
    assert "compared with --force" in compare_markdown(forced) and f"- {keys[0]}: A " in compare_markdown(forced)


def test_compare_ignores_the_seed_and_notices_changed_benchmarks(tiny_dir, toy, tmp_path):
    a, b = _two(tiny_dir, toy, tmp_path, sampling=SamplingConfig(n=2, max_new_tokens=4, seed=7))
    assert compare(a, b, reps=100)["differences"] == []  # another draw of the same protocol
    config = json.loads((b / "eval_config.json").read_text())
    config["benchmarks"]["toy"] = "0123456789abcdef"
    (b / "eval_config.json").write_text(json.dumps(config))
    with pytest.raises(CompareError, match="benchmarks.toy"):
        compare(a, b, reps=100)


def test_compare_command_force(tiny_dir, toy, tmp_path):
    a, b = _two(tiny_dir, toy, tmp_path, prompt="plain")  # `compare REFERENCE OTHER`: A is b, the reference B is a
    cmd = [sys.executable, "-m", "dftune.cli", "compare", str(a), str(b), "--out", str(tmp_path / "cmp"), "--reps", "50"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and "unlike evaluations: prompt (A 'plain', B 'qwen-boxed')" in r.stderr
    assert not (tmp_path / "cmp").exists()
    r = subprocess.run(cmd + ["--force"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [d["key"] for d in data["differences"]] == ["prompt", "stops.tokens", "stops.strings"]
    assert data["differences"][0] == {"key": "prompt", "a": "plain", "b": "qwen-boxed"} and data["grader"] == "math-verify"
    assert "- prompt: A 'plain', B 'qwen-boxed'" in (tmp_path / "cmp" / "compare.md").read_text()


def test_the_papers_numbers_beside_ours(toy):
    problems = {b: load_benchmark("toy", toy)[:1] for b in ("math500", "minerva_math", "olympiadbench", "aime24",
                                                            "amc23")}
    done = {}
    for b, [p] in problems.items():
        p.benchmark = b
        v = {"correct": b == "math500", "status": "ok", "extracted": "x", "reason": "", "rule": ""}
        done[(b, p.id)] = {0: {**v, "verdicts": {"math-verify": v, "paper": v}}}
    for model, shown in (("Qwen/Qwen2.5-Math-1.5B", True), ("models/qwen2.5-math-1.5b", True), ("runs/x", False)):
        s = summarize_rows(_cfg(model, "", benchmarks=list(problems), sampling=SamplingConfig(n=1)), problems, done)
        table = markdown_table(s)
        assert ("The paper's numbers for Qwen/Qwen2.5-Math-1.5B" in table) is shown
    cfg = _cfg("Qwen/Qwen2.5-Math-1.5B", "", benchmarks=list(problems), sampling=SamplingConfig(n=1))
    table = markdown_table(summarize_rows(cfg, problems, done))
    assert "| **mean** | 20.00 | 15.92 | 31.58 | +4.08 |" in table
    assert "| math500 | 100.00 | n/a | n/a |  |" in table


def test_the_report_shows_both_graders_the_papers_numbers_and_unlike_settings(tiny_dir, toy, tmp_path):
    from dftune.analysis.report import build_report

    a, b = _two(tiny_dir, toy, tmp_path, grader="paper")
    summary = json.loads((a / "summary.json").read_text())
    summary["model"] = "meta-llama/Llama-3.2-3B"  # as if the paper's base model had been evaluated
    (a / "summary.json").write_text(json.dumps(summary))
    page = build_report([a, b], base=tmp_path)
    assert "Under both graders" in page and "<td>paper</td>" in page and "<td>math-verify</td>" in page
    assert "is the paper's meta-llama/Llama-3.2-3B" in page and "<td>1.19</td><td>4.65</td>" in page
    assert "Unlike evaluations" in page and "grader:" in page  # compared anyway, and said so
