"""The one configuration language: YAML + key=value for every command, errors naming the key."""

import re
from pathlib import Path

import pytest
import yaml

from dftune.config import Config, load_config
from dftune.settings import ConfigError, describe, load, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name_or_path: m}\ntrain: {lr: 1e-4, global_batch: 8}\n")
    cfg = load_config(p, ["train.objective=prob_power:alpha=2", "train.lr=3e-5", "data.max_length=64", "train.epochs=2"])
    assert cfg.model.name_or_path == "m"
    assert cfg.train.lr == 3e-5 and cfg.train.global_batch == 8 and cfg.train.epochs == 2.0
    assert cfg.train.objective == "prob_power:alpha=2" and cfg.data.max_length == 64
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg  # the saved config reproduces the run


def test_bare_keys_resolve_when_unique_and_work_without_yaml():
    cfg = load_config(None, ["model.name_or_path=m", "lr=1e-5", "objective=nll", "max_length=64"])
    assert (cfg.train.lr, cfg.train.objective, cfg.data.max_length) == (1e-5, "nll", 64)


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("train: {lrate: 1}\n", [], r"unknown key 'train.lrate' \(did you mean train.lr\?\)"),
        ("trian: {lr: 1}\n", [], r"unknown key 'trian' \(did you mean train\?\)"),
        ("train: {global_batch: 8.5}\n", [], "train.global_batch: expected int, got float"),
        ("train: {resume: 'yes'}\n", [], "train.resume: expected bool"),
        ("", ["train.lr"], "must look like key=value"),
        ("", ["lrate=1"], "unknown key 'lrate'"),
        ("", ["train.lrate=1"], r"unknown key 'train.lrate' \(did you mean train.lr\?\)"),
        ("", ["train=1"], "'train' is a section"),
        ("", ["train.micro_batch=four"], "train.micro_batch: expected int"),
        ("- a\n- b\n", [], "mapping"),
        ("train: [1, 2]\n", [], "train: expected a mapping"),
    ],
)
def test_bad_configs_fail_with_the_key_named(tmp_path, text, overrides, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p, overrides)


def test_every_type_problem_is_told_at_once(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {lrate: 1, micro_batch: four}\ndata: {max_length: long}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    lines = str(e.value).splitlines()
    assert lines[0].endswith("3 problems with the settings:") and len(lines) == 4
    assert "train.lrate" in lines[1] + lines[2] and "data.max_length: expected int" in str(e.value)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.precision=fp16-mixed"], "train.precision: fp16 is not supported"),
        (["train.precision=fp64"], "train.precision: must be one of"),
        (["train.keep_checkpoints=0"], "train.keep_checkpoints: must be >= 1"),
        (["train.global_batch=10", "train.micro_batch=4"], "is not a multiple of train.micro_batch 4"),
        (["train.parallel=zero3"], "train.parallel: must be one of"),
        (["train.lr=0"], "train.lr: must be > 0"),
        (["train.max_steps=-3"], "train.max_steps: must be >= 0"),
        (["train.warmup_ratio=1.0"], r"train.warmup_ratio: must be in \[0, 1\)"),
        (["train.epochs=0"], "train.epochs: must be > 0"),
        (["train.resume=true", "train.overwrite=true"], "exclude each other"),
        (["train.objective=bogus"], "train.objective: unknown objective 'bogus'"),
        (["data.select=some"], "data.select: must be all, first:N or random:N"),
        (["data.format=csv"], "data.format: must be one of"),
        (["model.name_or_path="], "model.name_or_path: empty"),
    ],
)
def test_bad_values_are_found_before_anything_loads(tmp_path, tiny_dir, problems_file, overrides, match):
    from dftune.settings import Problems
    from dftune.train import check_run

    cfg = load_config(None, [f"model.name_or_path={tiny_dir}", f"data.path={problems_file}", *overrides])
    p = Problems()
    check_run(cfg, p)
    assert len(p) == 1 and re.search(match, p[0]), p


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")


def test_list_fields_and_describe():
    from dftune.analysis.run import AnalyzeConfig

    cfg = load(AnalyzeConfig, None, ["models=base=a,dft=b", "limit=5", "out=o"])
    assert cfg.models == ["base=a", "dft=b"] and cfg.sample.limit == 5
    p = Path(__file__).parent / "_bad_models.yaml"
    try:
        p.write_text("models: [[1, 2]]\n")
        with pytest.raises(ConfigError, match="models: expected a list of strings"):
            load(AnalyzeConfig, p)
    finally:
        p.unlink()
    text = describe(Config)
    assert "train.lr = 5e-05" in text and "fp32 master weights" in text and "model.name_or_path" in text


def test_a_nested_section_keeps_the_defaults_of_the_field_that_holds_it():
    """Config.eval is dftune eval's EvalConfig with short defaults (periodic evaluation): setting
    one of its keys must not reset the others to EvalConfig()'s paper protocol."""
    cfg = load(Config, None, ["eval.limit=5", "eval.sampling.temperature=0.6"])
    assert (cfg.eval.limit, cfg.eval.sampling.temperature) == (5, 0.6)
    assert cfg.eval.backend == "hf" and cfg.eval.benchmarks == ["math500"]  # the field's defaults, kept
    assert (cfg.eval.sampling.n, cfg.eval.sampling.max_new_tokens) == (1, 512)
    assert load(Config).eval == Config().eval
    text = describe(Config)
    assert "eval.sampling.n = 1\n" in text and "eval.limit = 32\n" in text  # --show tells the same defaults


def test_shipped_configs_load():
    from dftune.offline.baselines import BaselineConfig
    from dftune.offline.ppo import PPOConfig

    root = ROOT / "configs"
    flat = {"dpo": BaselineConfig, "grpo": BaselineConfig, "ppo": PPOConfig}
    files = sorted(root.rglob("*.yaml"))
    assert len(files) >= 9
    for f in files:
        cfg = load(flat[f.stem], f) if f.stem in flat else load_config(f)
        assert (cfg.model if f.stem in flat else cfg.model.name_or_path), f
    paper = {f.stem: load_config(f) for f in (root / "paper").glob("*.yaml") if f.stem not in flat}
    assert all(c.train.global_batch == 256 and c.data.max_length == 2048 for c in paper.values())
    assert all(c.train.precision == "bf16-mixed" for c in paper.values())
    assert paper["llama-3.1-8b"].train.lr == 2e-5 and paper["qwen2.5-math-1.5b"].train.lr == 5e-5
    assert yaml.safe_load((root / "tiny_cpu.yaml").read_text())["train"]["objective"] == "dft"


# ---- the command line: one grammar for every command ----------------------------------------


@pytest.mark.parametrize("command", ["train", "eval", "eval-general", "probe", "analyze", "report", "sweep", "demo",
                                     "sample", "baseline dpo", "baseline grpo", "baseline ppo", "tiny-model"])
def test_every_command_shows_its_keys_and_has_an_example(command, capsys):
    from dftune.cli import COMMANDS, main

    assert main([*command.split(), "--show"]) == 0
    shown = capsys.readouterr().out
    assert " = " in shown  # keys with defaults
    assert main([*command.split(), "--help"]) == 0
    assert "example:" in capsys.readouterr().out
    assert "example:" in COMMANDS[command].doc


def test_cli_grammar_maps_flags_positionals_and_lists():
    from dftune.arguments import build_config, parse_argv
    from dftune.cli import COMMANDS
    from dftune.sweep import SweepConfig

    cmd = COMMANDS["sweep"]
    argv = ["configs/tiny_cpu.yaml", "--grid", "train.objective=nll,thresholded:q=0.2,normalize=kept", "lr=1e-4,1e-3",
            "--out", "sw", "--print-only", "--set", "train.max_steps=2"]
    cfg = build_config(SweepConfig, parse_argv(SweepConfig, argv, cmd))
    assert cfg.config == "configs/tiny_cpu.yaml" and cfg.out == "sw" and cfg.print_only is True
    assert cfg.grid == ["train.objective=nll,thresholded:q=0.2,normalize=kept", "lr=1e-4,1e-3"]  # commas kept
    assert cfg.set == ["train.max_steps=2"]
    from dftune.analysis.report import ReportConfig

    r = COMMANDS["report"]
    cfg = build_config(ReportConfig, parse_argv(ReportConfig, ["runs/a", "runs/b", "-o", "x.html", "title=T"], r))
    assert cfg.inputs == ["runs/a", "runs/b"] and cfg.output == "x.html" and cfg.title == "T"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "configs/tiny_cpu.yaml", "train.lrr=1"], "unknown key 'train.lrr' (did you mean train.lr?)"),
        (["train", "model.name_or_path=x", "--lr"], "--lr needs a value"),
        (["train", "stray"], "unexpected argument 'stray'"),
        (["probe", "--limit", "many"], "limit: expected int"),
        (["nope"], "unknown command"),
        (["train", "--resume", "--overwrite", "model.name_or_path=x"], "exclude each other"),
    ],
)
def test_user_errors_are_one_line(argv, message, capsys):
    from dftune.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") <= 12


def _command_configs():
    from dftune.cli import COMMANDS

    return {name: cmd.config() for name, cmd in COMMANDS.items()}


@pytest.mark.parametrize("command", sorted(_command_configs()))
def test_every_key_a_command_honours_has_its_own_help_line(command, capsys):
    """--show is read from a docstring after each field: every key shown has one, not blank,
    not another key's (grouped help drifted before)."""
    import typing

    from dftune.cli import main
    from dftune.settings import field_docs, known_keys

    cls = _command_configs()[command]

    def help_of(key):
        typ = cls
        for part in key.split(".")[:-1]:
            typ = typing.get_type_hints(typ)[part]
        return field_docs(typ).get(key.rpartition(".")[2], "")

    keys = known_keys(cls)
    helps = {k: help_of(k) for k in keys}
    assert all(helps.values()), [k for k, h in helps.items() if not h]
    by_text = {}
    for k, h in helps.items():
        by_text.setdefault((k.rpartition(".")[0], h), []).append(k)
    assert all(len(v) == 1 for v in by_text.values()), [v for v in by_text.values() if len(v) > 1]
    assert main([*command.split(), "--show"]) == 0
    shown = capsys.readouterr().out
    for k, h in helps.items():
        assert f"  {k} = " in shown and h in shown, k


def test_show_lists_only_what_the_command_honours(capsys):
    from dftune.cli import main

    assert main(["train", "--show"]) == 0
    shown = capsys.readouterr().out
    assert "eval.limit = " in shown and "train.out = " in shown
    for refused in ("eval.model", "eval.out", "eval.backend", "eval.engine"):
        assert f"{refused} " not in shown and f"{refused}." not in shown, refused
    assert main(["baseline", "ppo", "--show"]) == 0
    assert "train.log_every" not in capsys.readouterr().out  # verl logs every step itself
    assert main(["sweep", "--show"]) == 0
    assert "eval.model" not in capsys.readouterr().out
