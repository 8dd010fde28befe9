"""Errors a user can cause, across the commands: one line naming the key or file, exit status
2, no traceback, nothing loaded and nothing written; then the corrected command succeeds in
the same folder (a failed start never blocks the next one).

Every command runs in this process through ``dftune.cli.main``, on a tiny model built offline.
"Nothing loaded" is observed, not timed: transformers' loaders are wrapped to count their calls.
"""

import json
import shutil

import pytest

from dftune.cli import main

TRAIN = ["train", "cfg.yaml"]
EVAL = ["eval", "--model", "model", "--benchmarks", "toy", "--data-dir", "bench", "--limit", "2", "--n", "1",
        "--max-new-tokens", "4", "--backend", "hf", "--grade-workers", "1", "--out", "ev"]
SAMPLE = ["sample", "--model", "model", "--data", "data.jsonl", "--select", "first:2", "--k", "1", "--backend", "hf",
          "--max-new-tokens", "4", "--grade-workers", "1", "--out", "sm"]
SWEEP = ["sweep", "cfg.yaml", "--out", "sw"]
DEMO = ["demo", "out=demo", "cache_dir=cache"]

# (what is wrong, the wrong command, what its one line must name, the corrected command, what the
# wrong one must not have created, whether the corrected one runs (else: its settings are checked))
CASES = [
    ("negative lr", [*TRAIN, "train.lr=-1"], "train.lr", [*TRAIN, "train.lr=1e-3"], "run", True),
    ("negative max_steps", [*TRAIN, "train.max_steps=-3"], "train.max_steps", TRAIN, "run", True),
    ("warm-up of 1", [*TRAIN, "train.warmup_ratio=1"], "train.warmup_ratio", TRAIN, "run", True),
    ("empty data path", [*TRAIN, "data.path="], "data.path", TRAIN, "run", True),
    ("missing data file", [*TRAIN, "data.path=missing.jsonl"], "missing.jsonl", TRAIN, "run", True),
    ("bare-key typo", [*TRAIN, "lrr=1e-3"], "train.lr", [*TRAIN, "lr=1e-3"], "run", True),
    ("fp16", [*TRAIN, "train.precision=fp16"], "train.precision", [*TRAIN, "train.precision=fp32"], "run", True),
    ("a run folder as the model", [*TRAIN, "model.name_or_path=done"], "done/final",
     [*TRAIN, "model.name_or_path=done/final"], "run", True),
    ("unknown objective", [*TRAIN, "objective=dtf"], "train.objective", [*TRAIN, "objective=dft"], "run", True),
    ("--resume with nothing to resume", [*TRAIN, "--resume"], "train.resume", TRAIN, "run", True),
    ("eval key training cannot honour", [*TRAIN, "eval.backend=vllm"], "eval.backend", TRAIN, "run", True),
    ("missing config file", ["train", "nope.yaml"], "nope.yaml", TRAIN, "run", True),
    ("eval with n 0", [*EVAL, "--n", "0"], "sampling.n", EVAL, "ev", True),
    ("eval backend typo", [*EVAL, "--backend", "hff"], "backend", EVAL, "ev", True),
    ("eval of a run folder", [*EVAL, "--model", "done"], "done/final", [*EVAL, "--model", "done/final"], "ev", True),
    ("unknown benchmark", [*EVAL, "--benchmarks", "toi"], "toi", EVAL, "ev", True),
    ("negative temperature", [*EVAL, "--temperature", "-1"], "sampling.temperature", EVAL, "ev", True),
    ("sample k of 0", [*SAMPLE, "--k", "0"], "k:", SAMPLE, "sm", True),
    ("sample from a missing file", [*SAMPLE, "--data", "missing.jsonl"], "missing.jsonl", SAMPLE, "sm", True),
    ("compare one folder", ["compare", "ev-a"], "evals", ["compare", "ev-a", "ev-b"], "", True),
    ("compare a missing folder", ["compare", "ev-a", "ev-c"], "ev-c", ["compare", "ev-a", "ev-b"], "", True),
    ("report of a missing folder", ["report", "ev-c", "-o", "r.html"], "ev-c", ["report", "ev-a", "-o", "r.html"],
     "r.html", True),
    ("sweep without a grid", SWEEP, "grid", [*SWEEP, "--grid", "train.lr=1e-3"], "sw", True),
    ("sweep grid key typo", [*SWEEP, "--grid", "train.lrr=1e-3"], "train.lr", [*SWEEP, "--grid", "train.lr=1e-3"],
     "sw", True),
    ("demo with no seeds", [*DEMO, "seeds=0"], "seeds", DEMO, "demo", False),
    ("demo mode typo", ["demo", "ofline", "out=demo"], "mode", ["demo", "offline", "out=demo"], "demo", False),
    ("tiny-model from a missing file", ["tiny-model", "tm", "--data", "missing.jsonl"], "missing.jsonl",
     ["tiny-model", "tm", "--data", "data.jsonl", "--hidden", "32", "--heads", "1", "--vocab-size", "300"], "tm", True),
]


@pytest.fixture(scope="module")
def world(tiny_dir, problems_file, tmp_path_factory):
    """A folder with a model, data, a benchmark, a finished run's folder, a training config and
    two evaluations of the same problems."""
    root = tmp_path_factory.mktemp("errors")
    shutil.copytree(tiny_dir, root / "model")
    shutil.copytree(tiny_dir, root / "done" / "final")
    shutil.copy(problems_file, root / "data.jsonl")
    (root / "bench" / "toy").mkdir(parents=True)
    (root / "bench" / "toy" / "test.jsonl").write_text("".join(
        json.dumps({"id": str(i), "question": f"What is {i} plus 2?", "answer": str(i + 2)}) + "\n" for i in range(3)))
    (root / "cfg.yaml").write_text(
        "model: {name_or_path: model}\ndata: {path: data.jsonl, select: 'first:8', max_length: 64}\n"
        "train: {global_batch: 4, micro_batch: 4, max_steps: 1, out: run, log_every: 100}\n")
    return root


@pytest.fixture
def folder(world, tmp_path, monkeypatch):
    """A fresh copy of the world as the working directory, with the two evaluations compare needs."""
    for item in world.iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy)(item, tmp_path / item.name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def loads(monkeypatch):
    """Calls of transformers' loaders (tokenizer, model, config), passed through."""
    import transformers

    calls = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoConfig):
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=cls.__name__, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


def _evaluations(capsys):
    for name, seed in (("ev-a", "0"), ("ev-b", "1")):
        assert main([*EVAL[:-1], name, "--seed", seed]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("what, wrong, names, corrected, created, runs", CASES, ids=[c[0] for c in CASES])
def test_a_wrong_command_is_one_line_and_the_corrected_one_runs(folder, loads, capsys, what, wrong, names, corrected,
                                                                 created, runs):
    if wrong[0] in ("compare", "report"):
        _evaluations(capsys)
        loads.clear()
    assert main(list(wrong)) == 2, what
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # exactly one line
    assert names in err and "Traceback" not in err, err
    assert loads == [], f"{what}: loaded {loads} before refusing"
    if created:
        assert not (folder / created).exists() or not any((folder / created).iterdir()), f"{what}: wrote {created}"
    if runs:
        assert main(list(corrected)) == 0, capsys.readouterr().err
        if wrong[0] in ("train", "eval", "sample"):
            assert "AutoModelForCausalLM" in loads  # the spy sees what the corrected command loads
    else:  # the demo runs for minutes: its corrected settings pass the checks that refused the wrong ones
        from dftune.arguments import build_config, parse_argv
        from dftune.cli import COMMANDS
        from dftune.testbed.demo import validate_demo
        from dftune.testbed.demo_config import apply_full

        cls = COMMANDS["demo"].config()
        validate_demo(apply_full(build_config(cls, parse_argv(cls, list(corrected[1:]), COMMANDS["demo"]))))


def test_the_table_covers_every_command_it_claims():
    assert len(CASES) >= 15
    assert {c[1][0] for c in CASES} >= {"train", "eval", "sample", "compare", "report", "sweep", "demo"}
