"""The laptop-scale testbed: the task generator and its two surface forms, the bases'
shared layout, the tables' statistics, and both demos end to end at toy size."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dftune.eval.grade import grade_one
from dftune.files import read_json, read_jsonl
from dftune.testbed import tasks
from dftune.testbed.tables import paired_difference, seed_interval


@pytest.mark.parametrize("split", sorted(tasks.SPLITS))
def test_generator_is_deterministic_and_every_answer_is_right(split):
    spec = tasks.SPLITS[split]
    a = tasks.generate(spec, 300, seed=7)
    assert a == tasks.generate(spec, 300, seed=7)
    assert a != tasks.generate(spec, 300, seed=8)
    for row in a:
        assert tasks.check_solution(row), row
        assert grade_one(row["solution"], [row["answer"]]).correct  # the grader agrees
        assert spec.steps[0] <= len(row["steps"]) <= spec.steps[1]
        assert row["solution"].split("\n")[1:-1] == [f"{a} {op} {b} = {c}." for a, op, b, c in row["steps"]]
        assert int(row["answer"]) >= 0


def test_difficulty_knobs():
    small = tasks.generate(tasks.TaskSpec(steps=(2, 2), max_number=9, ops="+"), 200, seed=0)
    large = tasks.generate(tasks.SPLITS["ood_numbers"], 200, seed=0)
    assert max(int(r["answer"]) for r in small) <= 27
    assert max(int(r["answer"]) for r in large) > 60  # ood_numbers: operands up to 30
    assert all("*" not in r["solution"] and "-" not in r["solution"].split("\n", 1)[1] for r in small)
    assert not tasks.check_solution({**small[0], "answer": str(int(small[0]["answer"]) + 1)})


@pytest.mark.parametrize("spec", tasks.PRETRAIN_MIX + [tasks.SPLITS["ood_ops"]], ids=str)
def test_the_notes_form_says_the_same_arithmetic_differently(spec):
    for row in tasks.generate(spec, 200, seed=3):
        doc = tasks.notes_document(row)
        assert tasks.check_notes(doc, row["answer"]), doc
        assert row["problem"] in doc and doc.endswith(f"Result: {row['answer']}\n\n")
        for demo_only in ("\\boxed", "=", "The answer is", "starts with", "<|"):  # nothing of the demonstrations' format
            assert demo_only not in doc


DOC = "Problem: Ava has 5 pens. Then Ava buys 3 more. Then Ava sells 2. How many pens does Ava have now?\n" \
      "Work: add 3 to 5, get 8; take 2 from 8, get 6.\nResult: 6\n\n"


@pytest.mark.parametrize("text, answer, ok", [
    (DOC, "6", True),
    (DOC, "7", False),  # not the gold answer
    (DOC.replace("Result: 6", "Result: 7"), "7", False),  # the result is not the last step's
    (DOC.replace("get 8; take 2 from 8", "get 9; take 2 from 9").replace("get 6", "get 7").replace("Result: 6",
                                                                                                 "Result: 7"), "7", False),
    (DOC.replace("take 2 from 8", "take 2 from 7").replace("get 6", "get 5").replace("Result: 6", "Result: 5"), "5",
     False),  # the chain is broken: the second step does not start from the first's result
    (DOC.replace("add 3 to 5, get 8", "5 + 3 = 8"), "6", False),  # the demonstrations' notation
    (DOC.replace("Result: 6\n\n", ""), "6", False),
    (DOC + "Problem: more", "6", False),
    (DOC.replace("add 3 to 5", "add 3 to __import__('os')"), "6", False),
])
def test_the_notes_checker_parses_and_never_evaluates(text, answer, ok):
    assert tasks.check_notes(text, answer) is ok


def test_the_bases_share_one_layout_and_the_weak_rows_hold_no_special_token(tmp_path):
    from dftune.eval.benchmarks import build_prompt
    from dftune.eval.generate import end_of_turn_ids
    from dftune.model import load_tokenizer
    from dftune.testbed import bases
    from dftune.vocab import end_of_turn_ids as stop_targets

    rows = bases.pretraining_rows(60)
    init = bases.initial_model(tmp_path, rows, hidden=32, layers=1, heads=1)
    tok = load_tokenizer(str(init))
    q = rows[0]["problem"]
    # the model's own template ("chat") is exactly the paper's qwen-boxed prompt, which periodic evaluation uses
    assert build_prompt(q, "chat", tok) == build_prompt(q, "qwen-boxed")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tok, "chat") == [im_end] and set(stop_targets(tok)) == {tok.eos_token_id, im_end}
    assert set(json.loads((init / "generation_config.json").read_text())["eos_token_id"]) == {tok.eos_token_id, im_end}
    weak = bases.notes_rows(tok, rows)
    specials = set(tok.all_special_ids)
    assert len(weak) == len(rows) // bases.NOTES_PER_ROW
    for r, s in zip(weak, range(0, len(rows), bases.NOTES_PER_ROW)):
        assert not specials & set(r["input_ids"]) and all(r["completion_mask"])
        assert tok.decode(r["input_ids"]) == "".join(tasks.notes_document(x) for x in rows[s:s + bases.NOTES_PER_ROW])


# ---- the tables' statistics ------------------------------------------------------------------


def test_seed_interval_is_the_student_t_interval():
    cell = seed_interval([0.1, 0.2, 0.3])
    assert cell["mean"] == pytest.approx(0.2)
    half = 4.303 * 0.1 / math.sqrt(3)  # t(0.975, 2 df) x sd / sqrt(n)
    assert cell["ci95"] == pytest.approx([0.2 - half, 0.2 + half])
    assert seed_interval([0.4])["ci95"] is None


def test_paired_difference_exact_cases():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, size=(3, 20)) / 2  # accuracies over n=2 samples
    same = paired_difference(a, a)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0] and same["sign_test"]["ties"] == 20
    shifted = paired_difference(a, a - 0.25)
    assert shifted["diff"] == pytest.approx(0.25) and shifted["ci95"] == pytest.approx([0.25, 0.25])
    assert shifted["seeds_better"] == 3 and shifted["sign_test"]["a_better"] == 20 and shifted["sign_test"]["p"] < 1e-5
    b = a.copy()
    b[0] += 0.5  # seed 0 of B better on every problem: paired by seed, the other seeds tie
    d = paired_difference(a, b)
    assert d["per_seed"] == pytest.approx([-0.5, 0.0, 0.0]) and d["seeds_worse"] == 1 and d["seeds_better"] == 0
    with pytest.raises(ValueError, match="one shape"):
        paired_difference(a, a[:, :5])


@pytest.mark.parametrize("seeds, seed_sd, noise_sd", [(1, 0.0, 0.3), (5, 0.05, 0.3)])
def test_the_bootstrap_covers_problems_and_seeds(seeds, seed_sd, noise_sd):
    """The bootstrap's spread matches the analytic standard error of the mean difference:
    over problems, sd / sqrt(P); with seed effects, plus their variance / S (the bootstrap's
    own (S-1)/S and (P-1)/P shrinkage included)."""
    rng = np.random.default_rng(1)
    p = 400
    offsets = rng.normal(0, seed_sd, size=(seeds, 1)) if seeds > 1 else np.zeros((1, 1))
    d = offsets + rng.normal(0, noise_sd, size=(seeds, p))
    res = paired_difference(d, np.zeros_like(d), reps=20_000)
    se = math.sqrt(d.mean(axis=0).var() / p * (1 if seeds == 1 else 1)
                   + (d.mean(axis=1).var() / seeds if seeds > 1 else 0.0))
    width = res["ci95"][1] - res["ci95"][0]
    assert width == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert res["diff"] == pytest.approx(d.mean())


# ---- the demos end to end, at toy size -------------------------------------------------------

TINY = dict(priors="weak,strong", pretrain_steps=3, format_steps=2, pretrain_examples=96, pretrain_batch=6,
            weak_objectives="nll,dft:protect=special", strong_objectives="nll,dft", seeds=2, finetune_examples=16,
            finetune_steps=2, finetune_batch=8, splits="id,ood_steps", eval_problems=3, eval_n=2, max_new_tokens=12,
            curve_priors="strong", curve_every=1, curve_problems=2, curve_n=1, hidden=64, layers=1, heads=1,
            analysis_examples=6)


def _avg(folder: Path, split: str) -> float:
    rows = [r for r in read_jsonl(folder / "eval" / "samples.jsonl") if r["benchmark"] == split]
    return sum(r["correct"] for r in rows) / len(rows)


def test_the_continuum_demo_end_to_end(tmp_path, capsys):
    from dftune.testbed.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=str(tmp_path / "demo"), cache_dir=str(tmp_path / "cache"), **TINY)
    report = run_demo(cfg)
    out = capsys.readouterr().out
    assert "pretraining 3 steps on plain-text notes" in out and "+ 2 steps in the demonstrations' format" in out
    root = tmp_path / "demo"
    page = report.read_text()
    for section in ("Evaluation", "Token probabilities", "Pre-flight probe"):
        assert f"<h2>{section}</h2>" in page

    # the report's contract: sweep.json and the point folders
    sweep = read_json(root / "sweep.json")
    assert sweep["axes"] == ["prior", "objective", "seed"]
    assert sweep["roles"] == {"compare": "objective", "replicate": "seed", "baseline": "nll"}
    assert len(sweep["points"]) == 2 + 2 * 2 * 2
    for pt in sweep["points"]:
        folder = root / pt["name"]
        assert (folder / "eval" / "summary.json").is_file() and (folder / "eval" / "samples.jsonl").is_file()
        if pt["values"]["objective"] != "base":
            assert (folder / "config.yaml").is_file() and (folder / "log.jsonl").is_file()
            assert not (folder / "checkpoints").exists()
        curve = read_jsonl(folder / "eval_curve.jsonl")
        if pt["values"]["prior"] == "strong" and pt["values"]["objective"] != "base":
            assert [r["step"] for r in curve] == [0, 1, 2]  # the base at step 0, then every step
        else:
            assert curve == []
    for prior in ("weak", "strong"):
        assert read_json(root / f"probe_{prior}.json")["recommendation"]["objective"]
        analysis = read_json(root / f"analysis_{prior}" / "token_probs.json")
        assert set(analysis["end_of_turn"]) == {"base", "nll", "dft" if prior == "strong" else "dft:protect=special"}

    # tables.json agrees with the per-sample files
    t = read_json(root / "tables.json")
    assert t["kind"] == "continuum" and t["splits"] == ["id", "ood_steps", "mean"]
    names = {(p["values"]["prior"], p["values"]["objective"], p["values"]["seed"]): root / p["name"] for p in sweep["points"]}
    for cell in t["accuracy"]:
        seeds = range(cell["seeds"])
        for s, v in zip(seeds, cell["values"]):
            f = names[(cell["prior"], cell["objective"], s)]
            want = (_avg(f, "id") + _avg(f, "ood_steps")) / 2 if cell["split"] == "mean" else _avg(f, cell["split"])
            assert v == pytest.approx(want)
        assert cell["mean"] == pytest.approx(np.mean(cell["values"]))
    for d in t["vs_baseline"]:
        if d["split"] == "mean":
            continue
        want = [_avg(names[(d["prior"], d["objective"], s)], d["split"]) - _avg(names[(d["prior"], "nll", s)], d["split"])
                for s in range(2)]
        assert d["per_seed"] == pytest.approx(want) and d["diff"] == pytest.approx(np.mean(want))
        assert d["ci95"][0] <= d["diff"] + 1e-12 and d["diff"] <= d["ci95"][1] + 1e-12
    for row in t["eos"]:
        samples = [r for s in range(row["seeds"]) for r in read_jsonl(names[(row["prior"], row["objective"], s)] /
                                                                       "eval" / "samples.jsonl")]
        assert row["samples"] == len(samples)
        assert row["stop"] == pytest.approx(np.mean([r["finish_reason"] == "stop" for r in samples]))
        assert row["stop"] + row["truncated"] == pytest.approx(1.0)
        assert row["mean_tokens"] == pytest.approx(np.mean([r["num_tokens"] for r in samples]))
        if row["objective"] == "base":
            probe = read_json(root / f"probe_{row['prior']}.json")
            assert row["eot_p"]["mean"] == pytest.approx(probe["end_of_turn"]["mean_prob"])
            assert row["probe"]["objective"] == probe["recommendation"]["objective"]
        else:
            assert len(row["eot_p"]["values"]) == 2 and 0 <= row["eot_p"]["mean"] <= 1
    assert {(c["prior"], c["objective"]) for c in t["curves"]} == {("strong", "nll"), ("strong", "dft")}
    for c in t["curves"]:
        rows = [read_jsonl(names[("strong", c["objective"], s)] / "eval_curve.jsonl") for s in range(2)]
        assert c["steps"] == [0, 1, 2]
        assert c["mean"] == pytest.approx([np.mean([r[i]["id"] for r in rows]) for i in range(3)])
    assert t["steps_to_reach"][0]["objective"] == "dft" and t["steps_to_reach"][0]["baseline"] == "nll"
    md = (root / "results.md").read_text()
    for heading in ("## Accuracy", "## Paired difference to nll", "## How samples end", "## Learning curves",
                    "## Probe of each base"):
        assert heading in md
    assert "| weak | dft:protect=special | 2 |" in md

    # a second run reuses the cached bases and every finished point
    logs = {p: (root / p["name"] / "log.jsonl").stat().st_mtime_ns for p in map(lambda x: x, [])}
    mtimes = [(root / p["name"] / "config.yaml").stat().st_mtime_ns for p in sweep["points"]
              if p["values"]["objective"] != "base"]
    run_demo(DemoConfig(out=str(root), cache_dir=str(tmp_path / "cache"), **TINY))
    assert capsys.readouterr().out.count("cached at") == 2 and not logs
    assert mtimes == [(root / p["name"] / "config.yaml").stat().st_mtime_ns for p in sweep["points"]
                      if p["values"]["objective"] != "base"]


def test_a_point_from_another_base_is_redone(tmp_path):
    import yaml

    from dftune.testbed.demo import stale

    run = tmp_path / "run"
    run.mkdir()
    assert not stale(run, tmp_path / "base")  # nothing there yet
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(tmp_path / "old")}}))
    assert stale(run, tmp_path / "base") and not stale(run, tmp_path / "old")


def test_demo_settings_are_checked_before_any_work(tmp_path):
    from dftune.config import ConfigError
    from dftune.testbed.demo import DemoConfig, run_demo

    for bad, match in [({"weak_objectives": "dft"}, "must include nll"), ({"strong_objectives": "nll,bogus"}, "bogus"),
                       ({"splits": "id,train_narrow"}, "splits"), ({"priors": "medium"}, "priors"),
                       ({"mode": "online"}, "mode")]:
        with pytest.raises(ConfigError, match=match):
            run_demo(DemoConfig(out=str(tmp_path / "x"), cache_dir=str(tmp_path / "c"), **bad))
    assert not (tmp_path / "c").exists()


def test_full_raises_the_defaults_but_keeps_explicit_settings():
    from dftune.testbed.demo import FULL, DemoConfig, apply_full

    cfg = apply_full(DemoConfig(full=True, seeds=7))
    assert cfg.seeds == 7 and cfg.eval_problems == FULL["eval_problems"]
    assert apply_full(DemoConfig()).eval_problems == DemoConfig().eval_problems


@pytest.fixture
def answering_base(tiny_dir, tmp_path):
    """A tiny model taught the offline demo's first questions in the demonstrations' format,
    each with its right answer half the time and a wrong one otherwise: its samples mix
    correct and incorrect boxed answers, as rejection sampling needs."""
    from dftune.config import Config, DataConfig, ModelConfig, TrainConfig
    from dftune.testbed.bases import SUFFIX
    from dftune.train import train
    from tests.conftest import write_jsonl

    rows = tasks.generate(tasks.SPLITS["train_narrow"], 4, seed=3, prefix="q")
    teach = [{"problem": r["problem"], "solution": f"The answer is \\boxed{{{int(r['answer']) + wrong}}}."}
             for r in rows for wrong in (0, 1)]
    data = write_jsonl(tmp_path / "teach.jsonl", teach * 2)
    cfg = Config(model=ModelConfig(name_or_path=str(tiny_dir)), data=DataConfig(path=str(data), instruction_suffix=SUFFIX),
                 train=TrainConfig(objective="nll", lr=1e-2, min_lr_ratio=1.0, global_batch=16, micro_batch=16,
                                   max_steps=40, warmup_ratio=0.0, out_dir=str(tmp_path / "teach"), tensorboard=False))
    return train(cfg)


def test_the_offline_demo_end_to_end(answering_base, tmp_path):
    pytest.importorskip("trl")
    from dftune.testbed.demo import DemoConfig, OfflineSettings, run_demo

    cfg = DemoConfig(mode="offline", out=str(tmp_path / "off"), cache_dir=str(tmp_path / "cache"),
                     real_base=str(answering_base), seeds=1, finetune_steps=1, finetune_batch=2, splits="id",
                     eval_problems=2, eval_n=2, max_new_tokens=16,
                     offline=OfflineSettings(questions=4, k=4, sample_tokens=16, dpo_batch=2, dpo_steps=1,
                                             grpo_questions=1, grpo_steps=1))
    report = run_demo(cfg)
    root = tmp_path / "off"
    assert report.is_file()
    stats = read_json(root / "sampled" / "stats.json")
    assert stats["responses"] == 16 and stats["correct"] >= 2 and stats["dpo_pairs"] >= 2
    sweep = read_json(root / "sweep.json")
    assert sweep["roles"]["baseline"] == "rft" and sweep["axes"] == ["setting", "objective", "seed"]
    assert [p["values"]["objective"] for p in sweep["points"]] == ["base", "rft", "dft_on_rft", "dpo", "grpo"]
    t = read_json(root / "tables.json")
    assert t["kind"] == "offline" and t["sampling"] == stats and "verl" in t["settings"]["ppo"]
    assert t["settings"]["lr_scale"] == pytest.approx(cfg.finetune_lr / 5e-5)
    for cell in t["accuracy"]:
        if cell["split"] == "id":
            f = root / next(p["name"] for p in sweep["points"] if p["values"]["objective"] == cell["objective"])
            assert cell["values"] == pytest.approx([_avg(f, "id")])
    assert {d["objective"] for d in t["vs_baseline"]} == {"dft_on_rft", "dpo", "grpo"}
    for name in ("dpo", "grpo"):
        folder = root / f"setting=offline_objective={name}_seed=0"
        assert (folder / "log.jsonl").is_file() and (folder / "final" / "config.json").is_file()
    md = (root / "results.md").read_text()
    assert "| rft | 1 |" in md and "PPO" in md and "## Paired difference to RFT" in md
