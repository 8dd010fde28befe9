"""The offline-RL pipeline on tiny models: sampling + grading + datasets, resume, DPO and GRPO on TRL."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dftune.config import Config, DataConfig, ModelConfig, TrainConfig
from dftune.eval.generate import HFBackend, SamplingConfig
from dftune.eval.run import read_samples
from dftune.offline.sample import load_questions, sample
from dftune.train import train
from tests.conftest import write_jsonl

QA = [{"question": "What is 1 plus 2?", "answer": "We add them.\n#### 3"},
      {"question": "What is 2 plus 3?", "answer": "We add them.\n#### 5"},
      {"question": "What is 4 plus 4?", "answer": "We add them.\n#### 8"}]


@pytest.fixture(scope="module")
def sampler_model(tiny_dir, tmp_path_factory):
    """A tiny model taught to answer the first question only: some samples right, some wrong."""
    root = tmp_path_factory.mktemp("offline")
    data = write_jsonl(root / "teach.jsonl", [QA[0]] * 16)
    cfg = Config(model=ModelConfig(name_or_path=str(tiny_dir)), data=DataConfig(path=str(data)),
                 train=TrainConfig(objective="nll", lr=1e-2, global_batch=16, micro_batch=16, max_steps=12,
                                   warmup_ratio=0.0, out_dir=str(root / "teach"), tensorboard=False))
    return train(cfg), write_jsonl(root / "qa.jsonl", QA)


def test_questions_and_golds(tmp_path, problems_file):
    qs = load_questions(str(problems_file), suffix=" Think.")
    assert qs[0].prompt == "What is 1 plus 2? Think." and qs[0].golds == ["3"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "x", "solution": "no box"}])
    from dftune.data import DataError

    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'solution' has no"):
        load_questions(str(bad))


def test_sample_grade_write_and_resume(sampler_model, tmp_path):
    model, qa = sampler_model
    sc = SamplingConfig(n=4, temperature=1.0, max_new_tokens=24, seed=0)
    backend = HFBackend(str(model), batch_size=32)
    calls = []

    class Counting:
        def generate(self, prompts, keys, s):
            calls.append(keys)
            return backend.generate(prompts, keys, s)

    out = tmp_path / "rft"
    stats = sample(str(model), str(qa), out, k=4, backend="hf", sampling=sc, chunk=2, backend_obj=Counting())
    assert stats["questions"] == 3 and stats["responses"] == 12
    assert sum(stats["questions_by_correct"].values()) == 3
    samples = read_samples(out / "samples.jsonl")
    rft = [json.loads(x) for x in (out / "rft.jsonl").read_text().splitlines()]
    dpo = [json.loads(x) for x in (out / "dpo.jsonl").read_text().splitlines()]
    assert len(rft) == stats["correct"] == sum(s["correct"] for s in samples) > 0
    assert any(not s["correct"] for s in samples)
    assert {r["prompt"] for r in rft} <= {q["question"] for q in QA}
    for pair in dpo:  # chosen is a correct response and rejected an incorrect one for the same question
        q = pair["prompt"][0]["content"]
        mine = {s["response"]: s["correct"] for s in samples if s["prompt"] == q}
        assert mine[pair["chosen"][0]["content"]] and not mine[pair["rejected"][0]["content"]]
    assert len(dpo) == stats["dpo_pairs"] > 0
    # the RFT file is a dataset `dftune train` reads as it is
    from dftune.data import build_dataset
    from transformers import AutoTokenizer

    exs, _ = build_dataset(DataConfig(path=str(out / "rft.jsonl")), AutoTokenizer.from_pretrained(model))
    assert len(exs) == len(rft)
    # resume: drop the last question's samples (as if interrupted), re-run: only it is generated
    keep = [s for s in samples if s["id"] != "2"]
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in keep))
    calls.clear()
    again = sample(str(model), str(qa), out, k=4, backend="hf", sampling=sc, chunk=2, backend_obj=Counting())
    assert calls == [["2"]]
    assert again["questions"] == 3 and len(read_samples(out / "samples.jsonl")) == 12


def _changed(before: Path, after: Path) -> bool:
    a, b = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_dpo_baseline_on_trl_changes_the_weights(sampler_model, tmp_path):
    pytest.importorskip("trl")
    from dftune.offline.baselines import load_baseline_config, run_dpo

    model, qa = sampler_model
    pairs = [{"prompt": [{"role": "user", "content": q["question"]}],
              "chosen": [{"role": "assistant", "content": f"The answer is \\boxed{{{q['answer'][-1]}}}."}],
              "rejected": [{"role": "assistant", "content": "The answer is \\boxed{0}."}]} for q in QA] * 2
    data = write_jsonl(tmp_path / "dpo.jsonl", pairs)
    cfg = load_baseline_config(None, [f"model={model}", f"data={data}", "global_batch=4", "micro_batch=2",
                                      "max_steps=2", "lr=1e-3", f"out_dir={tmp_path / 'dpo'}", "logging_steps=1"])
    final = run_dpo(cfg)
    assert _changed(Path(model), final)
    log = [json.loads(x) for x in (tmp_path / "dpo" / "log.jsonl").read_text().splitlines()]
    assert log and "loss" in log[0]


def test_grpo_baseline_on_trl_with_our_grader_as_reward(sampler_model, tmp_path):
    pytest.importorskip("trl")
    from dftune.offline.baselines import load_baseline_config, run_grpo

    model, qa = sampler_model
    cfg = load_baseline_config(None, [f"model={model}", f"data={qa}", "global_batch=8", "micro_batch=8",
                                      "num_generations=4", "max_steps=2", "lr=1e-3", "max_completion_length=16",
                                      f"out_dir={tmp_path / 'grpo'}", "logging_steps=1", "beta=0.0"])
    final = run_grpo(cfg)
    log = [json.loads(x) for x in (tmp_path / "grpo" / "log.jsonl").read_text().splitlines()]
    assert any("reward" in k for k in log[0])
    assert _changed(Path(model), final)


def test_baseline_config_errors(tmp_path):
    from dftune.config import ConfigError
    from dftune.offline.baselines import load_baseline_config

    with pytest.raises(ConfigError, match="unknown key"):
        load_baseline_config(None, ["lrr=1"])
    with pytest.raises(ConfigError, match="expected int"):
        load_baseline_config(None, ["global_batch=many"])
    assert load_baseline_config(str(Path(__file__).resolve().parents[1] / "configs/paper/dpo.yaml"), []).lr == 1e-6
