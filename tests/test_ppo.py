"""The PPO baseline's wiring to verl, everything that runs without verl and a GPU: the reward
function in verl's signature (our grader, real strings), the parquet conversion, the command built
from the config, the CLI, and collecting a finished run. verl itself runs in scripts/gpu_check.sh."""

import dataclasses
import importlib
import importlib.util
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dftune.config import TrainingSection
from dftune.files import read_jsonl
from dftune.offline.ppo import (
    PPO_TRAIN_OMITS,
    REWARD_MODULE,
    PPOConfig,
    _hydra,
    check,
    collect,
    load_ppo_config,
    ppo_training,
    verl_command,
    verl_overrides,
    write_verl_data,
)
from dftune.settings import ConfigError
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper" / "ppo.yaml"


def _load_reward_like_verl(path: str = REWARD_MODULE, name: str = "compute_score"):
    """verl's loader (verl.utils.import_utils.load_extern_object): pkg://a/b or pkg://a.b -> import a.b."""
    assert path.startswith("pkg://")
    return getattr(importlib.import_module(path[len("pkg://"):].replace("/", ".")), name)


def test_reward_function_in_verls_signature_grades_real_responses():
    import numpy

    compute_score = _load_reward_like_verl()
    verl_extra = {"num_turns": None, "rollout_reward_scores": {}}  # what verl's reward manager adds
    cases = [  # (response, ground_truth, extra_info, reward)
        ("We add 1 and 2 to get 3. So the answer is $\\boxed{3}$.", "3", {"index": 0, "golds": ["3"]}, 1.0),
        ("Half of it: $\\boxed{\\frac{1}{2}}$", "0.5", {}, 1.0),
        ("So the answer is $\\boxed{4}$.", "3", {"index": 1, "golds": ["3"]}, 0.0),
        ("I do not know.", "3", None, 0.0),
        # a multi-part gold (OlympiadBench-style): every part, from extra_info (parquet may give a numpy array)
        ("So $\\boxed{2}$ and $\\boxed{7}$.", "7, 2", {"golds": numpy.array(["7", "2"])}, 1.0),
        ("So $\\boxed{7}$.", "7, 2", {"golds": numpy.array(["7", "2"])}, 0.0),
    ]
    def call(case):
        text, gt, extra, _ = case
        info = None if extra is None else {**extra, **verl_extra}
        return compute_score(data_source="dftune", solution_str=text, ground_truth=gt, extra_info=info,
                             reward_router_address=None)

    # verl's reward workers call it from a thread pool, concurrently: so does this test
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        got = list(pool.map(call, cases))
    assert got == [c[-1] for c in cases]


def test_conversion_to_verls_parquet(tmp_path, tiny_dir):
    import pyarrow.parquet as pq
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from dftune.offline.sample import render_prompt

    data = write_jsonl(tmp_path / "q.jsonl", [{"problem": "What is 1 plus 2?", "solution": "so \\boxed{3}"},
                                              {"problem": "Prove it.", "solution": "a proof"},
                                              {"problem": "Half of 1?", "solution": "\\boxed{\\frac{1}{2}}"}])
    cfg = PPOConfig(model=str(tiny_dir), data=str(data), instruction_suffix=" Box it.",
                    train=ppo_training(global_batch=2, micro_batch=1), mini_batch=2, gpus_per_node=1)
    path = tmp_path / "train.parquet"
    counts = write_verl_data(cfg, path)
    assert counts == {"questions": 2, "skipped_no_gold": 1, "skipped_examples": [f"{data}:2"]}
    rows = pq.read_table(path).to_pylist()
    assert [r["reward_model"] for r in rows] == [{"style": "rule", "ground_truth": "3"},
                                                 {"style": "rule", "ground_truth": "\\frac{1}{2}"}]
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is 1 plus 2? Box it."}]
    assert rows[1]["extra_info"] == {"index": 1, "id": "2", "golds": ["\\frac{1}{2}"]}
    assert {r["data_source"] for r in rows} == {"dftune"}
    # verl reads it with `datasets` and renders the prompt with the chat template: the layout sampling used
    ds = load_dataset("parquet", data_files=str(path), split="train")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.apply_chat_template(ds[0]["prompt"], add_generation_prompt=True, tokenize=False) == render_prompt(
        tok, "What is 1 plus 2? Box it.")
    with pytest.raises(ConfigError, match="2 question\\(s\\) with a gold answer, fewer than one batch"):
        write_verl_data(dataclasses.replace(cfg, train=ppo_training(global_batch=4), mini_batch=4), tmp_path / "x.parquet")


def test_paper_config_maps_to_verl():
    cfg = load_ppo_config(str(PAPER), [])
    o = verl_overrides(cfg, Path("/data/train.parquet"))
    expected = {
        "algorithm.adv_estimator": "gae", "actor_rollout_ref.actor.optim.lr": "1e-06",
        "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio": "0.1", "critic.optim.lr_warmup_steps_ratio": "0.1",
        "data.train_batch_size": "256", "actor_rollout_ref.rollout.n": "1", "actor_rollout_ref.rollout.name": "vllm",
        "actor_rollout_ref.rollout.temperature": "1.0", "reward.custom_reward_function.name": "compute_score",
        "actor_rollout_ref.model.path": "Qwen/Qwen2.5-Math-1.5B", "critic.model.path": "Qwen/Qwen2.5-Math-1.5B",
        "trainer.n_gpus_per_node": "8", "algorithm.use_kl_in_reward": "false",
        "actor_rollout_ref.actor.checkpoint.save_contents": "[model,optimizer,extra,hf_model]",
    }
    assert {k: o[k] for k in expected} == expected
    assert _load_reward_like_verl(o["reward.custom_reward_function.path"], o["reward.custom_reward_function.name"])
    assert "trainer.total_training_steps" not in o  # epochs decide unless max_steps > 0


# fields consumed before the command exists (by the data conversion) or that only decide whether it runs
NOT_IN_COMMAND = {"data", "select", "instruction_suffix", "launch"}
CHANGED = {int: lambda v: v * 2 if v else 1, float: lambda v: v + 0.125, bool: lambda v: not v,
           str: lambda v: v + "x" if v else "other"}
FIELDS = [f.name for f in dataclasses.fields(PPOConfig) if f.name != "train"] + [
    f"train.{f.name}" for f in dataclasses.fields(TrainingSection) if f.name not in PPO_TRAIN_OMITS]


@pytest.mark.parametrize("name", FIELDS)
def test_every_config_field_reaches_the_command(name):
    base = PPOConfig(model="m", data="d", train=ppo_training(global_batch=64, micro_batch=2, max_steps=3), mini_batch=32,
                     gpus_per_node=2, kl_coef=0.01)
    section, _, key = name.rpartition(".")
    holder = base.train if section else base
    value = getattr(holder, key)
    special = {"lr_scheduler": "cosine", "extra": ["trainer.logger=[console]"], "train.epochs": 2.0,
               "train.report_to": ["wandb"]}
    new = special[name] if name in special else CHANGED[type(value)](value)
    changed = dataclasses.replace(holder, **{key: new})
    changed = dataclasses.replace(base, train=changed) if section else changed
    check(changed)
    train = Path("/data/train.parquet")
    if name in NOT_IN_COMMAND:
        assert verl_command(changed, train) == verl_command(base, train)
    else:
        assert verl_command(changed, train) != verl_command(base, train), name


@pytest.mark.parametrize("overrides, message", [
    (["mini_batch=12"], "train.global_batch 256 is not a multiple of mini_batch 12"),
    (["micro_batch=3"], r"mini_batch 256 is not a multiple of train.micro_batch 3 x 8 GPU\(s\) \(gpus_per_node 8 x nodes 1\) = 24"),
    (["nodes=3", "micro_batch=16"], r"micro_batch 16 x 24 GPU\(s\)"),
    (["warmup_ratio=1.0"], r"train.warmup_ratio: must be in \[0, 1\)"),
    (["rollout_tp=3"], "rollout_tp 3 does not divide the 8 GPU"),
    (["lr_scheduler=linear"], "lr_scheduler: must be one of constant, cosine"),
    (["global_batch=0"], "train.global_batch: must be >= 1"),
    (["epochs=1.5"], "train.epochs: verl runs whole epochs"),
    (["lr=0"], "train.lr: must be > 0"),
    (["extra=[nokey]"], "extra: expected key=value strings"),
    (["lrr=1"], "unknown key"),
])
def test_config_errors_name_the_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check(load_ppo_config(str(PAPER), overrides))


# each pair was checked once against Hydra's own override parser with verl 0.9.1's config (composed value == input)
@pytest.mark.parametrize("value, text", [
    (True, "true"), (False, "false"), (1e-6, "1e-06"), (256, "256"), ("Qwen/Qwen2.5-Math-1.5B", "Qwen/Qwen2.5-Math-1.5B"),
    ("pkg://dftune.offline.verl_reward", "pkg://dftune.offline.verl_reward"), ("/runs/my run", "'/runs/my run'"),
    ("it's", "'it\\'s'"), ("a,b", "'a,b'"), ("null", "'null'"), ("3", "'3'"), ("1e-3", "'1e-3'"), ("~/m", "'~/m'"),
    ("C:\\dir\\x", "'C:\\dir\\x'"), ("x\\", "'x\\\\'"),
])
def test_values_in_hydra_syntax(value, text):
    assert _hydra(value) == text


def test_cli_prepares_data_and_launch_script_without_verl(tmp_path, problems_file):
    from dftune.cli import main

    out = tmp_path / "ppo"
    common = [str(PAPER), f"data={problems_file}", "select=all", "model=some/model", "global_batch=8",
              "mini_batch=8", "micro_batch=1", f"out={out}"]
    assert main(["baseline", "ppo", *common, "launch=false"]) == 0
    script = (out / "launch.sh").read_text()
    assert subprocess.run(["bash", "-n", str(out / "launch.sh")]).returncode == 0
    assert "verl.trainer.main_ppo" in script and f"data.train_files={(out / 'data' / 'train.parquet').resolve()}" in script
    assert "VERL_FILE_LOGGER_PATH=" in script
    assert (out / "data" / "train.parquet").is_file() and (out / "config.yaml").is_file()
    # launching needs verl: without it, a clear error (exit status 2) before anything runs
    if importlib.util.find_spec("verl") is None:
        assert main(["baseline", "ppo", *common, "launch=true"]) == 2


def test_collect_a_finished_verl_run(tmp_path, tiny_dir):
    """verl's output layout (docs/advance/checkpoint.rst): the last step's actor/huggingface, and its file logger."""
    import shutil

    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    hf = out / "checkpoints" / "global_step_4" / "actor" / "huggingface"
    shutil.copytree(tiny_dir, hf)
    (out / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("4")
    (out / "verl_metrics.jsonl").write_text(
        '{"step": 1, "data": {"critic/score/mean": 0.25, "actor/pg_loss": 0.1, "note": "x"}}\n'
        '{"step": 2, "data": {"critic/score/mean": 0.5}}\n')
    final = collect(PPOConfig(model="m", data="d", train=ppo_training(out=str(out))))
    assert final == out / "final" and AutoModelForCausalLM.from_pretrained(final) is not None
    assert read_jsonl(out / "log.jsonl") == [{"step": 1, "critic/score/mean": 0.25, "actor/pg_loss": 0.1},
                                             {"step": 2, "critic/score/mean": 0.5}]
    (out / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(ConfigError, match="global_step_5/actor/huggingface: no weights"):
        collect(PPOConfig(model="m", data="d", train=ppo_training(out=str(out))))
