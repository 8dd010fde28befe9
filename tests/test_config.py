"""The one configuration language: YAML + key=value for every command, errors naming the key."""

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
        ("train: {lrate: 1}\n", [], r"train: unknown key\(s\) \['lrate'\]"),
        ("trian: {lr: 1}\n", [], r"unknown key\(s\) \['trian'\]"),
        ("train: {global_batch: 8.5}\n", [], "train.global_batch: expected int, got float"),
        ("train: {resume: 'yes'}\n", [], "train.resume: expected bool"),
        ("", ["train.lr"], "must look like key=value"),
        ("", ["lrate=1"], "unknown key 'lrate'"),
        ("", ["train.lrate=1"], r"unknown key 'train.lrate' \(did you mean train.lr\?\)"),
        ("", ["train=1"], "'train' is a section"),
        ("", ["train.micro_batch=four"], "train.micro_batch: expected int"),
        ("", ["train.precision=fp16-mixed"], "fp16 is not supported"),
        ("", ["train.keep_checkpoints=0"], "keep_checkpoints: must be >= 1"),
        ("", ["train.global_batch=10", "train.micro_batch=4"], "multiple of train.micro_batch"),
        ("", ["train.parallel=zero3"], "train.parallel: must be one of"),
        ("- a\n- b\n", [], "mapping"),
        ("train: [1, 2]\n", [], "train: expected a mapping"),
    ],
)
def test_bad_configs_fail_with_the_key_named(tmp_path, text, overrides, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p, overrides)


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
    from dftune.cli import COMMANDS, build_config, parse_argv
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
