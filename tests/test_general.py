"""The general-capability (forgetting) suite on lm-evaluation-harness, offline.

Each test run writes its own task definitions (multiple choice, a group of two, and
generate_until) over a local JSON-lines file, evaluates a tiny random base model and a
"fine-tuned" copy trained on the answers, and checks lm-eval's accuracy against float64
log-likelihoods computed here, the files, the resume rules, the comparison and the report.
"""

import json
import math

import pytest

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'dftune[general]')")

import torch  # noqa: E402

from dftune.eval import general  # noqa: E402
from dftune.eval.general import GeneralEvalConfig, GeneralEvalError, compare_general, evaluate_general  # noqa: E402

ROWS = []
for i, (a, b) in enumerate((a, b) for a in range(1, 4) for b in range(2, 6)):
    right, wrong = str(a + b), [str(a + b + 1), str(a * b + 7)]
    label = i % 3  # the right answer moves between positions
    choices = wrong[:label] + [right] + wrong[label:]
    ROWS.append({"question": f"What is {a} plus {b}?", "choices": choices, "label": label, "answer": right})

MC = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{prompt}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""
GROUP = """group: tiny_group
task: [tiny_mc, tiny_mc_b]
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
"""
PROMPTS = {"tiny_mc": lambda r: r["question"], "tiny_mc_b": lambda r: f"Question: {r['question']}\nAnswer:"}


def _texts():
    out = []
    for r in ROWS:
        c = r["choices"][r["label"]]
        out += [f"{r['question']} {c}", f"Question: {r['question']}\nAnswer: {c}", f"Q: {r['question']}\nA:{c}\n"]
    return out


def _finetune(base, out):
    """The 'fine-tuned' model: the base trained on the right answers (all three prompt formats)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    enc = tok(_texts(), padding=True, return_tensors="pt", add_special_tokens=False)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Task folder, base and fine-tuned models, and both evaluated (offline)."""
    from dftune.tiny import make_tiny

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        root = tmp_path_factory.mktemp("general")
        data = root / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        tasks = root / "tasks"
        tasks.mkdir()
        (tasks / "tiny_mc.yaml").write_text(MC.format(name="tiny_mc", data=data, prompt="{{question}}"))
        (tasks / "tiny_mc_b.yaml").write_text(MC.format(name="tiny_mc_b", data=data,
                                                        prompt="Question: {{question}}\\nAnswer:"))
        (tasks / "tiny_gen.yaml").write_text(GEN.format(data=data))
        (tasks / "tiny_group.yaml").write_text(GROUP)
        base = make_tiny(root / "base", _texts() * 5, vocab_size=300, hidden=64, layers=2, heads=1, intermediate=128)
        tuned = _finetune(base, root / "tuned")
        outs = {}
        for name, model in (("base", base), ("tuned", tuned)):
            outs[name] = root / f"eval-{name}"
            evaluate_general(_cfg(model, outs[name], tasks, ["tiny_group", "tiny_gen"]), progress=lambda s: None)
        yield {"root": root, "tasks": tasks, "base": base, "tuned": tuned, "outs": outs}


def _cfg(model, out, tasks, names, **kw):
    return GeneralEvalConfig(model=str(model), out=str(out), tasks=names, include_path=[str(tasks)],
                             include_defaults=False, batch_size="4", **kw)


def _reference(model_dir, prompt):
    """Float64 log-likelihood of each choice after the prompt (lm-eval's split: the context is
    tokenised alone, the continuation is the rest of the tokenised whole), per row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = []
    for r in ROWS:
        ctx = tok(prompt(r), add_special_tokens=False).input_ids
        lls = []
        for c in r["choices"]:
            whole = tok(prompt(r) + " " + c, add_special_tokens=False).input_ids
            assert whole[:len(ctx)] == ctx
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0], -1)  # (T, V)
            lls.append(sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole))))
        out.append(lls)
    return out


def _argmax(xs):
    return max(range(len(xs)), key=xs.__getitem__)


def _mean_stderr(xs):
    n, m = len(xs), sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


@pytest.mark.parametrize("which", ["base", "tuned"])
@pytest.mark.parametrize("task", ["tiny_mc", "tiny_mc_b"])
def test_accuracy_matches_float64_loglikelihoods(setup, which, task):
    out = setup["outs"][which]
    ref = _reference(setup[which], PROMPTS[task])
    acc = [float(_argmax(lls) == r["label"]) for lls, r in zip(ref, ROWS)]
    norm = [float(_argmax([ll / len(c) for ll, c in zip(lls, r["choices"])]) == r["label"])  # per character
            for lls, r in zip(ref, ROWS)]
    e = json.loads((out / "summary.json").read_text())["tasks"][task]
    assert e["n"] == len(ROWS) and e["kind"] == "task" and not e["top"] and e["requested"] == "tiny_group"
    assert e["metrics"]["acc,none"]["value"] == pytest.approx(sum(acc) / len(acc), abs=1e-12)
    assert e["metrics"]["acc,none"]["stderr"] == pytest.approx(_mean_stderr(acc), rel=1e-9)
    assert e["metrics"]["acc_norm,none"]["value"] == pytest.approx(sum(norm) / len(norm), abs=1e-12)
    # lm-eval's per-sample log-likelihoods (float32) against ours (float64)
    samples = [json.loads(line) for line in (out / "samples" / f"{task}.jsonl").read_text().splitlines()]
    assert len(samples) == len(ROWS)
    for s in samples:
        got = [resp[0][0] for resp in s["resps"]]
        assert got == pytest.approx(ref[s["doc_id"]], abs=2e-4)


def test_summary_agrees_with_raw_and_training_shows(setup):
    base, tuned = (json.loads((setup["outs"][k] / "summary.json").read_text()) for k in ("base", "tuned"))
    raw = json.loads((setup["outs"]["base"] / "raw" / "tiny_group.json").read_text())
    assert base["schema"] == general.SCHEMA and base["requested"] == ["tiny_group", "tiny_gen"]
    assert [t for t, _ in general.headline(base)] == ["tiny_group", "tiny_gen"]
    g = base["tasks"]["tiny_group"]
    assert g["kind"] == "group" and g["primary"] == "acc,none"
    assert g["metrics"]["acc,none"]["value"] == raw["results"]["tiny_group"]["acc,none"]
    assert g["metrics"]["acc,none"]["stderr"] == raw["results"]["tiny_group"]["acc_stderr,none"]
    # the group's accuracy is the size-weighted mean of its members'
    members = [base["tasks"][t]["metrics"]["acc,none"]["value"] for t in ("tiny_mc", "tiny_mc_b")]
    assert g["metrics"]["acc,none"]["value"] == pytest.approx(sum(members) / 2)
    # training on the answers moved every headline number up; the random base is near chance
    assert base["tasks"]["tiny_gen"]["metrics"]["exact_match,none"]["value"] < 0.5
    assert tuned["tasks"]["tiny_gen"]["metrics"]["exact_match,none"]["value"] == 1.0
    assert tuned["tasks"]["tiny_group"]["metrics"]["acc,none"]["value"] == 1.0
    assert g["metrics"]["acc,none"]["value"] < 0.8
    for name in ("eval_config.json", "results.md", "raw/tiny_gen.json", "samples/tiny_gen.jsonl"):
        assert (setup["outs"]["base"] / name).is_file(), name
    md = (setup["outs"]["base"] / "results.md").read_text()
    assert "| **tiny_group** | acc |" in md and "| tiny_mc_b | acc_norm |" in md


def test_compare_general_on_real_results(setup):
    c = compare_general(setup["outs"]["base"], setup["outs"]["tuned"] / "summary.json")
    assert c["settings_differ"] == []
    base, tuned = (json.loads((setup["outs"][k] / "summary.json").read_text()) for k in ("base", "tuned"))
    heads = [(r["task"], r["metric"]) for r in c["rows"] if r["headline"]]
    assert heads == [("tiny_group", "acc,none"), ("tiny_gen", "exact_match,none")]
    for r in c["rows"]:
        a, b = base["tasks"][r["task"]]["metrics"][r["metric"]], tuned["tasks"][r["task"]]["metrics"][r["metric"]]
        assert r["delta"] == pytest.approx(b["value"] - a["value"])
        assert r["stderr"] == pytest.approx(math.sqrt(a["stderr"] ** 2 + b["stderr"] ** 2))


def _summary(tasks, **settings):
    return {"schema": general.SCHEMA, "model": "m", "requested": list(tasks),
            "settings": {k: settings.get(k) for k in general.RESULT_KEYS},
            "tasks": {t: {"top": True, "primary": "acc,none",
                          "metrics": {"acc,none": {"value": v, "stderr": se, "higher_is_better": True}}}
                      for t, (v, se) in tasks.items()}}


@pytest.mark.parametrize("a, b, delta, stderr", [
    ((0.60, 0.03), (0.55, 0.04), -0.05, 0.05),
    ((0.20, 0.0), (0.25, 0.0), 0.05, 0.0),
    ((0.50, None), (0.40, 0.02), -0.10, None),  # a stderr lm-eval did not give: no combined one
])
def test_compare_general_arithmetic(a, b, delta, stderr):
    row = compare_general(_summary({"t": a}), _summary({"t": b}))["rows"][0]
    assert row["delta"] == pytest.approx(delta)
    assert row["stderr"] == (None if stderr is None else pytest.approx(stderr))
    assert row["z"] == (None if not stderr else pytest.approx(delta / stderr))


def test_compare_general_one_sided_tasks_and_settings():
    c = compare_general(_summary({"x": (0.5, 0.1)}, limit=0), _summary({"y": (0.5, 0.1)}, limit=100))
    assert c["settings_differ"] == ["limit"]
    assert [(r["task"], r["base"], r["tuned"], r["delta"]) for r in c["rows"]] == [("x", 0.5, None, None),
                                                                                   ("y", None, 0.5, None)]


def test_resume_skips_finished_tasks_and_refuses_other_settings(setup, tmp_path, monkeypatch):
    out = tmp_path / "ev"
    cfg = _cfg(setup["base"], out, setup["tasks"], ["tiny_gen"])
    evaluate_general(cfg, progress=lambda s: None)
    gen = out / "raw" / "tiny_gen.json"
    before = (gen.stat().st_mtime_ns, gen.read_bytes())
    log = []
    evaluate_general(_cfg(setup["base"], out, setup["tasks"], ["tiny_gen", "tiny_mc"]), progress=log.append)
    assert (gen.stat().st_mtime_ns, gen.read_bytes()) == before  # finished: not run again
    assert any("tiny_gen: finished earlier" in s for s in log)
    s = json.loads((out / "summary.json").read_text())
    assert s["requested"] == ["tiny_gen", "tiny_mc"] and s["tasks"]["tiny_mc"]["top"]

    def no_model(cfg):
        raise AssertionError("the model was loaded although every task had finished")

    monkeypatch.setattr(general, "_make_lm", no_model)
    again = evaluate_general(_cfg(setup["base"], out, setup["tasks"], ["tiny_mc"]), progress=lambda s: None)
    assert again["tasks"] == s["tasks"]  # tasks finished earlier stay in the summary
    with pytest.raises(GeneralEvalError, match=r"num_fewshot: -1 there, 1 now.*use another out"):
        evaluate_general(_cfg(setup["base"], out, setup["tasks"], ["tiny_mc"], num_fewshot=1))
    with pytest.raises(GeneralEvalError, match="model: "):
        evaluate_general(_cfg(setup["tuned"], out, setup["tasks"], ["tiny_mc"]))
    assert (gen.stat().st_mtime_ns, gen.read_bytes()) == before


def test_unknown_task_is_named_before_the_model_is_loaded(setup, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(GeneralEvalError, match=r"unknown task\(s\) \['tiny_mcc'\].*did you mean tiny_mc"):
        evaluate_general(_cfg(tmp_path / "no-such-model", out, setup["tasks"], ["tiny_gen", "tiny_mcc"]))
    assert not out.exists()
    with pytest.raises(GeneralEvalError, match="include_path: .* is not a folder"):
        evaluate_general(_cfg(setup["base"], out, tmp_path / "nowhere", ["tiny_gen"]))


@pytest.mark.skipif(bool(general._version("vllm")), reason="a GPU vllm is installed: the vllm backend can run")
def test_vllm_backend_without_vllm_is_refused_before_anything_is_written(setup, tmp_path):
    out = tmp_path / "v"
    with pytest.raises(GeneralEvalError, match="backend=vllm"):
        evaluate_general(_cfg(setup["base"], out, setup["tasks"], ["tiny_gen"], backend="vllm"))
    assert not out.exists()


@pytest.mark.parametrize("kw, match", [
    ({"batch_size": "0"}, "batch_size"), ({"batch_size": "big"}, "batch_size"), ({"backend": "tgi"}, "backend"),
    ({"tasks": ["a", "a"]}, "listed twice"), ({"limit": -1}, "limit"), ({"dtype": "fp8"}, "dtype"),
    ({"tasks": [1]}, "tasks"),
])
def test_bad_settings(kw, match):
    with pytest.raises(GeneralEvalError, match=match):
        GeneralEvalConfig(**kw)


def test_comma_lists():
    cfg = GeneralEvalConfig(tasks="mmlu, ifeval", include_path="a,b", batch_size="auto:4")
    assert cfg.tasks == ["mmlu", "ifeval"] and cfg.include_path == ["a", "b"]
    assert GeneralEvalConfig().tasks == general.DEFAULT_TASKS


def test_default_tasks_and_headline_metrics_are_lm_evals():
    """The default suite and the headline-metric table name real tasks and metrics of the installed
    lm-eval (only their folders are indexed: all ~15,000 definitions take ~10 s)."""
    from pathlib import Path

    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    folders = ["mmlu/default", "arc", "hellaswag", "winogrande", "truthfulqa", "ifeval", "gsm8k", "piqa", "openbookqa"]
    index = TaskManager(include_defaults=False, include_path=[root / f for f in folders]).task_index
    assert set(general.DEFAULT_TASKS) <= set(index)
    for task, key in general.PRIMARY.items():
        cfg = index[task].cfg or {}
        metric, _, filt = key.partition(",")
        assert metric in [m["metric"] for m in cfg.get("metric_list") or cfg.get("aggregate_metric_list")], task
        assert filt == "none" or filt in [f["name"] for f in cfg["filter_list"]], task


def test_cli_runs_offline_and_reports_errors(setup, tmp_path, capsys, monkeypatch):
    from dftune.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "cli"
    args = ["eval-general", f"model={setup['base']}", f"out={out}", "tasks=tiny_mc,tiny_gen",
            f"include_path={setup['tasks']}", "include_defaults=false", "limit=4", "bootstrap_iters=0", "batch_size=2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| **tiny_mc** | acc |" in printed and f"{out}/results.md" in printed
    s = json.loads((out / "summary.json").read_text())
    assert s["tasks"]["tiny_mc"]["n"] == 4 and s["tasks"]["tiny_mc"]["metrics"]["acc,none"]["stderr"] is None
    assert json.loads((out / "eval_config.json").read_text())["limit"] == 4
    assert main(["eval-general", f"model={setup['base']}", f"out={tmp_path / 'x'}", "batch_size=0"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert main(["eval-general", "no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_report_shows_side_by_side(setup, tmp_path):
    from dftune.analysis.report import write_report

    html = write_report([setup["outs"]["base"], setup["outs"]["tuned"]], tmp_path / "r.html").read_text()
    assert "General capability (forgetting)" in html
    c = compare_general(setup["outs"]["base"], setup["outs"]["tuned"])
    row = next(r for r in c["rows"] if r["task"] == "tiny_group" and r["headline"])
    cell = f"+{100 * row['delta']:.2f} ± {100 * row['stderr']:.2f}"
    assert f"color:#1a7f37'>{cell}</b>" in html  # the difference ± combined stderr, in points; significant: green
    assert f"{100 * row['base']:.2f} ± {100 * row['base_stderr']:.2f}" in html
    assert "eval-base (reference)" in html and "Δ eval-tuned" in html
    # a general-suite summary.json given directly, and inside a run folder's general/
    run = tmp_path / "run"
    (run / "general").mkdir(parents=True)
    (run / "general" / "summary.json").write_text((setup["outs"]["tuned"] / "summary.json").read_text())
    html = write_report([setup["outs"]["base"] / "summary.json", run], tmp_path / "r2.html").read_text()
    assert cell in html and "Δ run" in html
