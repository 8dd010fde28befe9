import pytest
import yaml

from dftune.config import ConfigError, load_config, save_config


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name_or_path: m}\ntrain: {lr: 1e-4, global_batch: 8}\n")
    cfg = load_config(p, ["train.objective=prob_power:alpha=2", "train.lr=3e-5", "data.max_length=64", "train.epochs=2"])
    assert cfg.model.name_or_path == "m"
    assert cfg.train.lr == 3e-5 and cfg.train.global_batch == 8 and cfg.train.epochs == 2.0
    assert cfg.train.objective == "prob_power:alpha=2" and cfg.data.max_length == 64
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg  # the saved config reproduces the run


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("train: {lrate: 1}\n", [], r"train: unknown key\(s\) \['lrate'\]"),
        ("trian: {lr: 1}\n", [], r"unknown key\(s\) \['trian'\]"),
        ("train: {global_batch: 8.5}\n", [], "train.global_batch: expected int, got float"),
        ("train: {resume: 'yes'}\n", [], "train.resume: expected bool"),
        ("", ["train.lr"], "section.key=value"),
        ("", ["lr=1"], "section.key=value"),
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


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")


def test_shipped_configs_load(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(f for f in root.rglob("*.yaml") if f.parent.name != "accelerate" and f.stem not in ("dpo", "grpo", "ppo"))
    assert len(files) >= 6  # the tiny config and the paper's five recipes
    for f in files:
        cfg = load_config(f)
        assert cfg.model.name_or_path, f
    paper = {f.stem: load_config(f) for f in (root / "paper").glob("*.yaml") if f.stem not in ("dpo", "grpo", "ppo")}
    assert all(c.train.global_batch == 256 and c.data.max_length == 2048 for c in paper.values())
    assert paper["llama-3.1-8b"].train.lr == 2e-5 and paper["qwen2.5-math-1.5b"].train.lr == 5e-5
    assert yaml.safe_load((root / "tiny_cpu.yaml").read_text())["train"]["objective"] == "dft"
