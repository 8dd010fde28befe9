"""The laptop-scale testbed: the task generator and its two surface forms, the bases'
shared layout, the tables' statistics, and both demos end to end at toy size."""

import html
import json
import math
from pathlib import Path

import numpy as np
import pytest

from dftune.eval.grade import grade_one
from dftune.files import read_json, read_jsonl
from dftune.testbed import tables, tasks
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
    large = tasks.generate(tasks.TaskSpec(steps=(2, 3), max_number=30, ops="+-"), 200, seed=0)
    assert max(int(r["answer"]) for r in small) <= 27
    assert max(int(r["answer"]) for r in large) > 60  # operands up to 30
    assert all("*" not in r["solution"] and "-" not in r["solution"].split("\n", 1)[1] for r in small)
    assert not tasks.check_solution({**small[0], "answer": str(int(small[0]["answer"]) + 1)})
    bounded = tasks.generate(tasks.TaskSpec(steps=(4, 5), max_number=9, ops="+-*", max_value=19), 500, seed=0)
    values = [v for r in bounded for a, _, _, c in r["steps"] for v in (a, c)]
    assert max(values) == 19 and min(values) == 0  # the bound is reached, never passed
    assert {op for r in bounded for _, op, _, _ in r["steps"]} == {"+", "-", "*"}


def test_a_wrong_demonstration_is_wrong_only_in_its_last_step():
    import random

    rng = random.Random(0)
    for row in tasks.generate(tasks.SPLITS["train_narrow"], 200, seed=4):
        bad = tasks.with_wrong_last_step(row, rng)
        assert bad["answer"] == row["answer"] and not tasks.check_solution(bad)
        good, wrong = row["solution"].split("\n"), bad["solution"].split("\n")
        assert wrong[:-2] == good[:-2]  # every earlier line kept
        a, op, b, c = row["steps"][-1]
        value = int(wrong[-2].rsplit(" ", 1)[1].rstrip("."))
        assert wrong[-2] == f"{a} {op} {b} = {value}." and 1 <= abs(value - c) <= 3 and value >= 0
        assert wrong[-1] == f"The answer is \\boxed{{{value}}}."
        assert not grade_one(bad["solution"], [row["answer"]]).correct


@pytest.mark.parametrize("notation", tasks.NOTATIONS)
@pytest.mark.parametrize("spec", tasks.PRETRAIN_MIX + [tasks.SPLITS["ood_ops"], tasks.SPLITS["ood_steps"]], ids=str)
def test_the_notes_form_says_the_same_arithmetic_differently(spec, notation):
    for row in tasks.generate(spec, 200, seed=3):
        doc = tasks.notes_document(row, notation)
        assert tasks.check_notes(doc, row["answer"], notation), doc
        assert not tasks.check_notes(doc, row["answer"], next(n for n in tasks.NOTATIONS if n != notation))
        assert row["problem"] in doc and doc.endswith(f"Result: {row['answer']}\n\n")
        # none of the demonstrations' layout; the words notation not even their arithmetic
        for demo_only in ("\\boxed", "The answer is", "starts with", "<|") + (("=", "+") if notation == "words" else ()):
            assert demo_only not in doc
        if notation == "symbols":  # the demonstrations' own step lines, inside the notes' wrapper
            steps = [line for line in row["solution"].split("\n")[1:-1]]
            assert "\n".join(steps) in doc


DOC = "Problem: Ava has 5 pens. Then Ava buys 3 more. Then Ava sells 2. How many pens does Ava have now?\n" \
      "Work: Ava has 5 pens.\n5 plus 3 is 8.\n8 minus 2 is 6.\nResult: 6\n\n"
SYMBOLS = DOC.replace("5 plus 3 is 8", "5 + 3 = 8").replace("8 minus 2 is 6", "8 - 2 = 6")


def test_the_symbols_checker_reads_the_demonstrations_notation():
    assert tasks.check_notes(SYMBOLS, "6") and not tasks.check_notes(SYMBOLS, "6", "words")
    assert not tasks.check_notes(SYMBOLS.replace("8 - 2 = 6", "8 - 2 = 5").replace("Result: 6", "Result: 5"), "5")
    assert not tasks.check_notes(SYMBOLS.replace("5 + 3", "__import__('os') + 3"), "6")


@pytest.mark.parametrize("text, answer, ok", [
    (DOC, "6", True),
    (DOC, "7", False),  # not the gold answer
    (DOC.replace("Result: 6", "Result: 7"), "7", False),  # the result is not the last step's
    (DOC.replace("is 8.\n8", "is 9.\n9").replace("is 6", "is 7").replace("Result: 6", "Result: 7"), "7", False),  # 5+3=9
    (DOC.replace("8 minus 2 is 6", "7 minus 2 is 5").replace("Result: 6", "Result: 5"), "5", False),  # broken chain
    (DOC.replace("Ava has 5 pens.\n5", "Ava has 4 pens.\n5"), "6", False),  # the restated start is not the problem's
    (DOC.replace("5 plus 3 is 8", "5 + 3 = 8"), "6", False),  # the demonstrations' notation
    (DOC.replace("Result: 6\n\n", ""), "6", False),
    (DOC.replace("8 minus 2 is 6.\n", "").replace("Result: 6", "Result: 8"), "6", False),  # a step left out
    (DOC + "Problem: more", "6", False),
    (DOC.replace("5 plus 3", "__import__('os') plus 3"), "6", False),
])
def test_the_notes_checker_parses_and_never_evaluates(text, answer, ok):
    assert tasks.check_notes(text, answer, "words") is ok


def test_the_bases_share_one_layout_and_the_weak_rows_hold_no_special_token(tmp_path):
    from dftune.eval.benchmarks import build_prompt
    from dftune.model import load_tokenizer
    from dftune.testbed import bases
    from dftune.vocab import end_of_turn_ids

    rows = bases.pretraining_rows(60)
    init = bases.initial_model(tmp_path, rows, hidden=32, layers=1, heads=1)
    tok = load_tokenizer(str(init))
    q = rows[0]["problem"]
    # the model's own template ("chat") is exactly the paper's qwen-boxed prompt, which periodic evaluation uses
    assert build_prompt(q, "chat", tok) == build_prompt(q, "qwen-boxed")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tok, "chat") == [tok.eos_token_id, im_end]
    assert set(json.loads((init / "generation_config.json").read_text())["eos_token_id"]) == {tok.eos_token_id, im_end}
    weak = bases.notes_rows(tok, rows)
    specials = set(tok.all_special_ids)
    assert len(weak) == len(rows)
    for r, row in zip(weak, rows):
        assert not specials & set(r["input_ids"])  # never an EOS or template token: the weak base never learns to stop
        assert tok.decode(r["input_ids"]) == tasks.notes_document(row)
        # the loss is on the worked part only, as the demonstrations' is on the response
        trained = tok.decode([i for i, m in zip(r["input_ids"], r["completion_mask"]) if m])
        assert trained == "Work: " + tasks.notes_document(row).split("\nWork: ", 1)[1]


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
    se = math.sqrt(d.mean(axis=0).var() / p + (d.mean(axis=1).var() / seeds if seeds > 1 else 0.0))
    width = res["ci95"][1] - res["ci95"][0]
    assert width == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert res["diff"] == pytest.approx(d.mean())


# ---- the demos end to end, at toy size -------------------------------------------------------

TINY = {"priors": "weak,strong", "pretrain_steps": 3, "pretrain_examples": 96, "pretrain_batch": 6,
        "weak_objectives": "nll,auto", "strong_objectives": "nll,dft", "seeds": 2, "finetune_examples": 16,
        "finetune_steps": 2, "weak_finetune_steps": 2, "weak_finetune_lr": 2e-3, "finetune_batch": 8,
        "splits": "id,ood_steps", "eval_problems": 3, "eval_n": 2,
        "max_new_tokens": 12, "curve_priors": "strong", "curve_every": 1, "curve_problems": 2, "curve_n": 1, "hidden": 64,
        "layers": 1, "heads": 1, "analysis_examples": 6, "workers": 1}


def _avg(folder: Path, split: str) -> float:
    rows = [r for r in read_jsonl(folder / "eval" / "samples.jsonl") if r["benchmark"] == split]
    return sum(r["correct"] for r in rows) / len(rows)


def test_the_continuum_demo_end_to_end(tmp_path, capsys):
    from dftune.testbed.demo import run_demo
    from dftune.testbed.demo_config import DemoConfig

    cfg = DemoConfig(out=str(tmp_path / "demo"), cache_dir=str(tmp_path / "cache"), **TINY)
    report = run_demo(cfg)
    out = capsys.readouterr().out
    assert "pretraining 3 steps on plain-text notes" in out and "pretraining 3 steps in the demonstrations' format" in out
    root = tmp_path / "demo"
    page = report.read_text()
    for section in ("Evaluation", "Token probabilities", "Pre-flight probe", "Learning curves", "Tables (demo)",
                    "Where the gradient goes"):
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
        assert set(analysis["end_of_turn"]) == {"base", "nll", "dft" if prior == "strong" else "auto"}
    # each prior's runs used its own fine-tuning length and rate; auto logged its decisions every step
    for prior, lr in (("weak", 2e-3), ("strong", 5e-4)):
        log = read_jsonl(root / f"prior={prior}_objective=nll_seed=0" / "log.jsonl")
        assert len(log) == 2 and max(r["lr"] for r in log) == pytest.approx(lr)
    auto_log = read_jsonl(root / "prior=weak_objective=auto_seed=0" / "log.jsonl")
    assert all(0 <= r["auto_exponent"] <= 1 and "protected_weight" in r for r in auto_log)

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
    # the tables the report shows (and results.md) are built from those numbers
    shown = {tab["title"]: tab for tab in t["tables"]}
    continuum = shown["The continuum: accuracy by prior and objective"]
    row = next(r for r in continuum["rows"] if r[:2] == ["strong", "dft"])
    cell = next(c for c in t["accuracy"] if (c["prior"], c["objective"], c["split"]) == ("strong", "dft", "id"))
    assert row[2] == "2" and row[3] == tables.fmt_cell(cell)
    diff = next(d for d in t["vs_baseline"] if (d["prior"], d["objective"], d["split"]) == ("strong", "dft", "mean"))
    assert row[-1] == tables.fmt_diff(diff)
    assert not any(d["objective"] == "base" for d in t["vs_baseline"])  # the base has no training seeds to pair
    stops = shown["Does the model learn to stop? (how samples end, all splits and seeds pooled)"]
    eos = next(r for r in t["eos"] if (r["prior"], r["objective"]) == ("weak", "auto"))
    assert ["weak", "auto", tables._pct(eos["stop"])] == next(r for r in stops["rows"] if r[:2] == ["weak", "auto"])[:3]
    probe_rows = {r[0]: r for r in shown["Each base on the demonstrations, before training (the probe), and the "
                                         "outcome"]["rows"]}
    checks = {c["prior"]: c for c in t["probe_check"]}
    for prior in ("weak", "strong"):
        assert 0 <= t["probe"][prior]["notes_accuracy"] <= 1
        rec = read_json(root / f"probe_{prior}.json")["recommendation"]
        assert probe_rows[prior][7] == rec["objective"] == checks[prior]["recommended"]
        assert t["probe"][prior]["geo_p"] == rec["geo_p"] and probe_rows[prior][1] == f"{rec['geo_p']:.3g}"
        # the recommendation tested against the outcome: the best trained objective by mean accuracy
        trained = {c["objective"]: c["mean"] for c in t["accuracy"]
                   if c["prior"] == prior and c["split"] == "mean" and c["objective"] != "base"}
        assert trained[checks[prior]["best"]] == max(trained.values())
        want = ("not trained" if rec["objective"] not in trained else "best" if rec["objective"] == checks[prior]["best"]
                else None)
        assert checks[prior]["verdict"] == want or (want is None and checks[prior]["verdict"] in ("within noise",
                                                                                                  "behind"))
    curves = next(tab for title, tab in shown.items() if title.startswith("Learning curves"))
    assert curves["columns"][2:] == ["step 0", "step 1", "step 2"] and len(curves["rows"]) == 2
    md = (root / "results.md").read_text()
    for title, tab in shown.items():
        assert f"## {title}" in md and tab["note"] in md and html.escape(title) in page
    assert "| weak | auto | 2 |" in md

    # a second run reuses the cached bases and every finished point; changed settings redo them
    def mtimes():
        return [(root / p["name"] / "config.yaml").stat().st_mtime_ns for p in sweep["points"]
                if p["values"]["objective"] != "base"]

    before = mtimes()
    bases_made = sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*/final/config.json"))
    assert len(bases_made) == 2
    run_demo(DemoConfig(out=str(root), cache_dir=str(tmp_path / "cache"), **{**TINY, "workers": 2}))
    assert capsys.readouterr().out.count("cached at") == 2
    assert mtimes() == before
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*/final/config.json")) == bases_made
    run_demo(DemoConfig(out=str(root), cache_dir=str(tmp_path / "cache"), **{**TINY, "finetune_lr": 1e-4}))
    assert "settings changed since the last run (finetune_lr)" in capsys.readouterr().out
    assert all(a < b for a, b in zip(before, mtimes()))


def test_jobs_run_in_order_one_thread_each_and_a_failure_is_raised():
    import operator

    import torch

    from dftune.testbed.stages import run_jobs

    threads = torch.get_num_threads()
    for workers in (1, 2):
        assert run_jobs(operator.truediv, [(1, 2), (3, 4), (5, 8)], workers) == [0.5, 0.75, 0.625]
        assert run_jobs(torch.get_num_threads, [(), ()], workers) == [1, 1]
        with pytest.raises(ZeroDivisionError):
            run_jobs(operator.truediv, [(1, 1), (1, 0)], workers)
    assert torch.get_num_threads() == threads  # restored after the jobs run here


def test_a_point_from_another_base_is_redone(tmp_path):
    import yaml

    from dftune.testbed.stages import stale

    run = tmp_path / "run"
    run.mkdir()
    assert not stale(run, tmp_path / "base")  # nothing there yet
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(tmp_path / "old")}}))
    assert stale(run, tmp_path / "base") and not stale(run, tmp_path / "old")


def test_demo_settings_are_checked_before_any_work(tmp_path):
    from dftune.errors import UserError
    from dftune.testbed.demo import run_demo
    from dftune.testbed.demo_config import DemoConfig, OfflineSettings

    for bad, match in [({"weak_objectives": "dft"}, "must include nll"), ({"strong_objectives": "nll,bogus"}, "bogus"),
                       ({"splits": "id,train_narrow"}, "splits"), ({"priors": "medium"}, "priors"),
                       ({"mode": "online"}, "mode"), ({"wrong_demos": 1.0}, "wrong_demos"), ({"seeds": 0}, "seeds"),
                       ({"mode": "offline", "offline": OfflineSettings(objectives="rft,ppo")}, "GPU")]:
        with pytest.raises(UserError, match=match):  # the CLI prints these as one line
            run_demo(DemoConfig(out=str(tmp_path / "x"), cache_dir=str(tmp_path / "c"), **bad))
    assert not (tmp_path / "c").exists() and not (tmp_path / "x").exists()


def test_the_offline_demo_asks_for_trl_before_any_work(tmp_path, monkeypatch):
    """Where TRL is missing (the main job's install has no TRL), DPO and GRPO are refused
    up front with the install command; RFT and DFT-on-RFT alone pass the check."""
    import importlib.util

    from dftune.errors import UserError
    from dftune.testbed.demo import run_demo
    from dftune.testbed.demo_config import DemoConfig, OfflineSettings
    from dftune.testbed.demo_offline import _objectives

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    with pytest.raises(UserError, match=r"dpo,grpo run on TRL.*pip install 'dftune\[trl\]'"):
        run_demo(DemoConfig(mode="offline", out=str(tmp_path / "x"), cache_dir=str(tmp_path / "c")))
    assert not (tmp_path / "c").exists() and not (tmp_path / "x").exists()
    cfg = DemoConfig(mode="offline", offline=OfflineSettings(objectives="rft,dft_on_rft"))
    assert _objectives(cfg) == ["rft", "dft_on_rft"]


def test_full_raises_the_defaults_but_keeps_explicit_settings():
    from dftune.testbed.demo_config import FULL, DemoConfig, apply_full

    cfg = apply_full(DemoConfig(full=True, seeds=7))
    assert cfg.seeds == 7 and cfg.eval_problems == FULL["eval_problems"]
    assert apply_full(DemoConfig()).eval_problems == DemoConfig().eval_problems


def test_the_offline_demo_keeps_its_own_problem_count_unless_given():
    """The continuum's default of 80 problems per split is not the offline table's 40 (the
    size it was measured at); an explicit setting, or --full's, wins."""
    from dftune.testbed.demo_config import FULL, OFFLINE_DEFAULTS, DemoConfig, apply_full, apply_mode

    assert OFFLINE_DEFAULTS["eval_problems"] != DemoConfig().eval_problems
    assert apply_mode(DemoConfig(mode="offline")).eval_problems == OFFLINE_DEFAULTS["eval_problems"]
    assert apply_mode(DemoConfig(mode="offline", eval_problems=60)).eval_problems == 60
    assert apply_mode(apply_full(DemoConfig(mode="offline", full=True))).eval_problems == FULL["eval_problems"]
    assert apply_mode(DemoConfig()).eval_problems == DemoConfig().eval_problems  # the continuum keeps its own


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
                                   max_steps=80, warmup_ratio=0.0, out=str(tmp_path / "teach")))
    return train(cfg)


def test_the_offline_demo_end_to_end(answering_base, tmp_path):
    pytest.importorskip("trl")
    from dftune.testbed.demo import run_demo
    from dftune.testbed.demo_config import DemoConfig, OfflineSettings

    cfg = DemoConfig(mode="offline", out=str(tmp_path / "off"), cache_dir=str(tmp_path / "cache"),
                     real_base=str(answering_base), seeds=1, finetune_steps=1, finetune_batch=2, splits="id",
                     eval_problems=2, eval_n=2, max_new_tokens=16,
                     offline=OfflineSettings(questions=4, k=4, sample_tokens=16, dpo_batch=2, dpo_epochs=2,
                                             grpo_questions=1, grpo_steps=2))  # TRL: step 1 is warm-up at 0
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
    assert t["settings"]["grpo"]["schedule"] == "constant" and t["settings"]["dpo"]["schedule"] == "cosine"
    for cell in t["accuracy"]:
        if cell["split"] == "id":
            f = root / next(p["name"] for p in sweep["points"] if p["values"]["objective"] == cell["objective"])
            assert cell["values"] == pytest.approx([_avg(f, "id")])
    assert {d["objective"] for d in t["vs_baseline"]} == {"dft_on_rft", "dpo", "grpo"}
    assert {d["objective"] for d in t["vs_base"]} == {"rft", "dft_on_rft", "dpo", "grpo"}
    assert [r["set"] for r in t["base_pass"]] == ["training questions", "id"]
    for m in t["movement"]:  # every run's measured budget and movement
        assert m["optimizer_steps"] >= 1 and m["lr_sum"] > 0 and m["weight_change"] > 0 and "dlogp_seq_wrong" in m
    grpo = next(m for m in t["movement"] if m["objective"] == "grpo")
    assert read_json(root / "setting=offline_objective=grpo_seed=0" / "budget.json")["lr_sum"] == grpo["lr_sum"]
    for name in ("dpo", "grpo"):
        folder = root / f"setting=offline_objective={name}_seed=0"
        assert (folder / "log.jsonl").is_file() and (folder / "final" / "config.json").is_file()
    shown = {tab["title"]: tab for tab in t["tables"]}
    rows = {r[0]: r for r in shown["Offline RL in miniature: accuracy by method"]["rows"]}
    assert list(rows) == ["base", "rft", "dft_on_rft", "dpo", "grpo"] and rows["rft"][-3] == ""  # the baseline
    assert rows["base"][-4] == "" and rows["rft"][-4] == tables.fmt_diff(
        next(d for d in t["vs_base"] if (d["objective"], d["split"]) == ("rft", "mean")))
    diff = next(d for d in t["vs_baseline"] if (d["objective"], d["split"]) == ("dpo", "mean"))
    assert rows["dpo"][-3] == tables.fmt_diff(diff)
    md, page = (root / "results.md").read_text(), report.read_text()
    assert "| rft | 1 |" in md and "verl" in md
    for title in shown:
        assert f"## {title}" in md and html.escape(title) in page


def test_the_command_line_takes_the_mode_as_a_word():
    from dftune.arguments import build_config, parse_argv
    from dftune.cli import COMMANDS
    from dftune.settings import ConfigError
    from dftune.testbed.demo_config import DemoConfig

    cmd = COMMANDS["demo"]
    cfg = build_config(DemoConfig, parse_argv(DemoConfig, ["offline", "--full", "seeds=2", "offline.k=8"], cmd))
    assert (cfg.mode, cfg.full, cfg.seeds, cfg.offline.k) == ("offline", True, 2, 8)
    assert build_config(DemoConfig, parse_argv(DemoConfig, [], cmd)).mode == "continuum"
    with pytest.raises(ConfigError):
        parse_argv(DemoConfig, ["offline", "continuum"], cmd)  # one mode
