"""The offline-RL pipeline on tiny models: sampling + grading + datasets, settings, resume,
DPO and GRPO on TRL (world size, warm-up), and the paper's RFT / DFT-on-RFT configs."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dftune.config import Config, DataConfig, ModelConfig, TrainConfig, load_config
from dftune.eval.generate import HFBackend, SamplingConfig
from dftune.files import read_json, read_jsonl
from dftune.offline.sample import gold_answer, load_questions, render_prompt, sample
from dftune.records import DataError
from dftune.settings import ConfigError
from dftune.train import train
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
QA = [{"question": "What is 1 plus 2?", "answer": "We add them.\n#### 3"},
      {"question": "What is 2 plus 3?", "answer": "We add them.\n#### 5"},
      {"question": "What is 4 plus 4?", "answer": "We add them.\n#### 8"}]


@pytest.fixture(scope="module")
def sampler_model(tiny_dir, tmp_path_factory):
    """A tiny model taught the first question with two answers, the right one (3) and a wrong
    one (4), half the time each: its samples reliably mix correct and incorrect final answers
    in the boxed format (which the grader reads as math-verify does, so garbage is no answer)."""
    root = tmp_path_factory.mktemp("offline")
    wrong = {**QA[0], "answer": "We add them.\n#### 4"}
    data = write_jsonl(root / "teach.jsonl", [QA[0]] * 8 + [wrong] * 8)
    cfg = Config(model=ModelConfig(name_or_path=str(tiny_dir)), data=DataConfig(path=str(data)),
                 train=TrainConfig(objective="nll", lr=1e-2, min_lr_ratio=1.0, global_batch=16, micro_batch=16,
                                   max_steps=30, warmup_ratio=0.0, out=str(root / "teach")))
    return train(cfg), write_jsonl(root / "qa.jsonl", QA)


class Counting:
    """The real HF backend, recording which question ids each generate call asked for."""

    def __init__(self, model):
        self.backend, self.calls = HFBackend(str(model), batch_size=32), []

    def generate(self, prompts, keys, s, stop_token_ids=None):
        self.calls.append(list(keys))
        return self.backend.generate(prompts, keys, s, stop_token_ids=stop_token_ids)


SC = dict(temperature=1.0, max_new_tokens=24, seed=0)


@pytest.mark.parametrize("record, fmt, golds", [
    ({"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}}$"}, "problem_solution", ["\\frac{1}{2}"]),
    ({"problem": "p", "solution": "\\boxed{1} then \\boxed{2}"}, "problem_solution", ["2"]),
    ({"problem": "p", "solution": "a proof, no box"}, "problem_solution", []),
    ({"problem": "p", "solution": "\\boxed{}"}, "problem_solution", []),
    ({"problem": "p", "solution": "\\boxed{1}", "answer": "7"}, "problem_solution", ["7"]),
    ({"question": "q", "answer": "so\n#### 1,000"}, "question_answer", ["1000"]),
    ({"question": "q", "answer": "no final line"}, "question_answer", []),
    ({"prompt": "q", "completion": "c", "answer": 12}, "prompt_completion", ["12"]),
    ({"prompt": "q", "completion": "c"}, "prompt_completion", []),
])
def test_gold_answers(record, fmt, golds):
    assert gold_answer(record, fmt) == golds


def test_questions_skip_rows_without_gold_and_count_them(tmp_path, problems_file):
    qs, skipped = load_questions(str(problems_file), suffix=" Think.")
    assert qs[0].prompt == "What is 1 plus 2? Think." and qs[0].golds == ["3"] and skipped == []
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"problem": "a", "solution": "\\boxed{1}"},
                                                   {"problem": "prove it", "solution": "a proof"},
                                                   {"problem": "c", "solution": "\\boxed{3}"}])
    qs, skipped = load_questions(str(mixed))
    assert [q.id for q in qs] == ["0", "2"] and skipped == [f"{mixed}:2"]  # ids: the row index in the file
    with pytest.raises(DataError, match="none of the 1 selected rows has a gold answer"):
        load_questions(str(write_jsonl(tmp_path / "proofs.jsonl", [{"problem": "x", "solution": "no box"}])))
    with pytest.raises(DataError, match=r"empty\.jsonl:1: field 'problem' must be a non-empty string"):
        load_questions(str(write_jsonl(tmp_path / "empty.jsonl", [{"problem": " ", "solution": "\\boxed{1}"}])))
    with pytest.raises(DataError, match="id '7' repeats"):
        load_questions(str(write_jsonl(tmp_path / "dup.jsonl", [{"id": 7, "problem": "a", "solution": "\\boxed{1}"}] * 2)))


def test_sample_grade_write_and_resume(sampler_model, tmp_path):
    model, qa = sampler_model
    backend = Counting(model)
    out = tmp_path / "rft"
    stats = sample(str(model), str(qa), out, k=4, backend="hf", sampling=SamplingConfig(n=4, **SC), chunk=3,
                   backend_obj=backend, grade_workers=1)
    assert stats["questions"] == 3 and stats["responses"] == 12 and stats["skipped_no_gold"] == 0
    assert sum(stats["questions_by_correct"].values()) == 3
    samples = read_jsonl(out / "samples.jsonl")
    rft, dpo = read_jsonl(out / "rft.jsonl"), read_jsonl(out / "dpo.jsonl")
    assert sorted((s["id"], s["sample"]) for s in samples) == [(str(i), j) for i in range(3) for j in range(4)]
    assert len(rft) == stats["correct"] == sum(s["correct"] for s in samples) > 0
    assert any(not s["correct"] for s in samples)
    assert {r["prompt"] for r in rft} <= {q["question"] for q in QA}
    for pair in dpo:  # chosen is a correct response and rejected an incorrect one for the same question
        q = pair["prompt"][0]["content"]
        mine = {s["response"]: s["correct"] for s in samples if s["prompt"] == q}
        assert mine[pair["chosen"][0]["content"]] and not mine[pair["rejected"][0]["content"]]
    assert len(dpo) == stats["dpo_pairs"] > 0
    assert read_json(out / "sample_config.json")["k"] == 4
    # the RFT file is a dataset `dftune train` reads as it is
    from transformers import AutoTokenizer

    from dftune.data import build_dataset

    exs, _ = build_dataset(DataConfig(path=str(out / "rft.jsonl")), AutoTokenizer.from_pretrained(model))
    assert len(exs) == len(rft)

    # resume: question 2 lost (interrupted), question 1 lost its sample 3, sample 0 of question 0 duplicated with
    # another text, and a torn final line: only questions 1 and 2 are generated; one row per (id, sample) is kept
    by_key = {(s["id"], s["sample"]): s for s in samples}
    keep = [s for s in samples if s["id"] != "2" and (s["id"], s["sample"]) != ("1", 3)]
    dup = {**by_key[("0", 0)], "response": "a different text"}
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in keep + [dup]) + '{"id": "2", "sa')
    backend.calls.clear()
    again = sample(str(model), str(qa), out, k=4, backend="hf", sampling=SamplingConfig(n=4, **SC), chunk=2,
                   backend_obj=backend, grade_workers=1)
    assert backend.calls == [["1", "2"]]
    after = read_jsonl(out / "samples.jsonl")
    firsts = {}
    for s in after:
        firsts.setdefault((s["id"], s["sample"]), s)
    assert sorted(firsts) == sorted(by_key) and len(after) == len(keep) + 1 + 5  # 1 duplicate on disk, 5 new
    assert firsts[("0", 0)]["response"] == by_key[("0", 0)]["response"]  # the first row of a key wins
    assert firsts[("1", 0)]["response"] == by_key[("1", 0)]["response"]  # kept rows are not replaced
    assert again["questions"] == 3 and again["responses"] == 12


TINY_SC = {**SC, "max_new_tokens": 4}


@pytest.fixture(scope="module")
def finished_sample(sampler_model, tmp_path_factory):
    model, qa = sampler_model
    out = tmp_path_factory.mktemp("finished") / "s"
    sample(str(model), str(qa), out, k=1, backend="hf", sampling=SamplingConfig(n=1, **TINY_SC),
           backend_obj=HFBackend(str(model), batch_size=8), grade_workers=1)
    return out


@pytest.mark.parametrize("change, what", [
    (dict(k=2), "k"),
    (dict(sc=dict(seed=1)), "sampling.seed"),
    (dict(sc=dict(temperature=0.5)), "sampling.temperature"),
    (dict(suffix=" Think."), "instruction_suffix"),
    (dict(select="first:2"), "select"),
    (dict(chat_template="plain"), "chat_template"),
])
def test_sample_refuses_other_settings_in_the_same_folder(sampler_model, finished_sample, tmp_path, change, what):
    import shutil

    model, qa = sampler_model
    out = tmp_path / "s"
    shutil.copytree(finished_sample, out)
    before = (out / "samples.jsonl").read_bytes()
    kw = dict(k=1, backend="hf", sampling=SamplingConfig(n=1, **{**TINY_SC, **change.get("sc", {})}))
    kw.update({k: v for k, v in change.items() if k != "sc"})
    with pytest.raises(ConfigError, match=rf"holds samples drawn with other settings \({what}: "):
        sample(str(model), str(qa), out, **kw)  # refused before any model is loaded or sample drawn
    assert (out / "samples.jsonl").read_bytes() == before
    # the same settings resume (nothing left to do: no backend needed)
    assert sample(str(model), str(qa), out, k=1, backend="nonexistent",
                  sampling=SamplingConfig(n=1, **TINY_SC))["responses"] == 3


def test_sample_skips_rows_without_gold_and_reads_sample_records(sampler_model, tmp_path):
    model, _ = sampler_model
    data = write_jsonl(tmp_path / "mixed.jsonl", [{"problem": "What is 1 plus 2?", "solution": "so \\boxed{3}"},
                                                  {"problem": "Prove that 1 plus 2 is odd.", "solution": "proof"}])
    backend = Counting(model)
    stats = sample(str(model), str(data), tmp_path / "o", k=2, backend="hf",
                   sampling=SamplingConfig(n=2, **SC), backend_obj=backend, grade_workers=1)
    assert stats["questions"] == 1 and stats["skipped_no_gold"] == 1 and stats["skipped_examples"] == [f"{data}:2"]
    rows = read_jsonl(tmp_path / "o" / "samples.jsonl")
    assert backend.calls == [["0"]] and len(rows) == 2
    assert all(isinstance(r["response"], str) and r["finish_reason"] in ("stop", "length") for r in rows)


# ---- the paper's RFT and DFT-on-RFT configs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def rft_workdir(sampler_model, tmp_path_factory):
    """A folder holding data/rft/, written by sample() where the paper's sample command writes."""
    model, qa = sampler_model
    work = tmp_path_factory.mktemp("work")
    stats = sample(str(model), str(qa), work / "data" / "rft", k=8, backend="hf", sampling=SamplingConfig(n=8, **SC),
                   backend_obj=HFBackend(str(model), batch_size=32), grade_workers=1)
    assert stats["correct"] >= 1
    return work


@pytest.mark.parametrize("name, objective", [("qwen2.5-math-1.5b-rft", "nll"), ("qwen2.5-math-1.5b-dft-on-rft", "dft")])
def test_rft_configs_train_on_what_sample_writes(sampler_model, rft_workdir, tmp_path, monkeypatch, name, objective):
    model, _ = sampler_model
    monkeypatch.chdir(rft_workdir)  # the configs read data/rft/rft.jsonl, relative to where one runs
    path = ROOT / "configs" / "paper" / f"{name}.yaml"
    paper = load_config(path)
    assert (paper.train.objective, paper.data.format, paper.data.path) == (objective, "prompt_completion",
                                                                           "data/rft/rft.jsonl")
    assert (paper.train.lr, paper.train.global_batch, paper.train.warmup_ratio) == (5e-5, 256, 0.1)
    cfg = load_config(path, [f"model.name_or_path={model}", f"train.out={tmp_path / 'run'}", "train.global_batch=1",
                             "train.micro_batch=1", "train.max_steps=2"])
    # the prompt training sees is the one the samples were drawn from (same chat template, suffix in the file)
    from dftune.data import build_dataset
    from dftune.model import load_tokenizer

    tok = load_tokenizer(cfg.model)
    exs, _ = build_dataset(cfg.data, tok)
    first = read_jsonl("data/rft/rft.jsonl")[0]
    n_prompt = next(i for i, lab in enumerate(exs[0].labels) if lab != -100)
    assert exs[0].input_ids[:n_prompt] == tok(render_prompt(tok, first["prompt"]), add_special_tokens=False)["input_ids"]
    final = train(cfg)
    log = read_jsonl(tmp_path / "run" / "log.jsonl")
    assert [r["step"] for r in log if "loss" in r][:2] == [1, 2]
    a, b = load_file(str(Path(model) / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


# ---- TRL baselines -------------------------------------------------------------------------------------------


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
                                      "max_steps=2", "lr=1e-3", f"out={tmp_path / 'dpo'}", "log_every=1"])
    final = run_dpo(cfg)
    assert _changed(Path(model), final)
    log = read_jsonl(tmp_path / "dpo" / "log.jsonl")
    assert log and "loss" in log[0]


def test_grpo_baseline_on_trl_with_our_grader_as_reward(sampler_model, tmp_path):
    pytest.importorskip("trl")
    from dftune.offline.baselines import load_baseline_config, run_grpo

    model, _ = sampler_model
    # Only the question the model was taught: its groups mix right (3) and wrong (4) answers, so
    # the advantages are not all zero (on the other questions every reward is 0: no gradient).
    qa = write_jsonl(tmp_path / "qa0.jsonl", [QA[0]] * 4)
    cfg = load_baseline_config(None, [f"model={model}", f"data={qa}", "global_batch=8", "micro_batch=8",
                                      "num_generations=4", "max_steps=3", "lr=1e-3", "max_completion_length=40",
                                      f"out={tmp_path / 'grpo'}", "log_every=1", "beta=0.0",
                                      "lr_scheduler=constant"])
    final = run_grpo(cfg)
    log = read_jsonl(tmp_path / "grpo" / "log.jsonl")
    assert any("reward" in k for k in log[0])
    assert max(r["reward_std"] for r in log if "reward_std" in r) > 0
    assert _changed(Path(model), final)


@pytest.mark.parametrize("world, global_batch, micro, accum", [
    ("1", 128, 4, 32), ("4", 128, 4, 8), ("8", 256, 16, 2), ("3", 128, 4, None), ("4", 128, 64, None),
])
def test_baselines_derive_accumulation_from_the_world_size(monkeypatch, world, global_batch, micro, accum):
    from dftune.offline.baselines import BaselineConfig, _common_args, baseline_training

    monkeypatch.setenv("WORLD_SIZE", world)
    cfg = BaselineConfig(train=baseline_training(global_batch=global_batch, micro_batch=micro))
    if accum is None:
        with pytest.raises(ConfigError, match=rf"global_batch {global_batch} is not a multiple of micro_batch {micro} "
                                              rf"x {world} process\(es\) = {micro * int(world)}"):
            _common_args(cfg)
    else:
        args = _common_args(cfg)
        assert args["gradient_accumulation_steps"] == accum
        assert args["per_device_train_batch_size"] * accum * int(world) == global_batch


def test_world_size_must_be_a_positive_integer(monkeypatch):
    from dftune.offline.baselines import world_size

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_size() == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("WORLD_SIZE", bad)
        with pytest.raises(ConfigError, match="WORLD_SIZE"):
            world_size()


@pytest.mark.parametrize("ratio, max_steps", [(0.05, 100), (0.1, 7), (0.1, 1000), (0.0, 50), (0.5, 3)])
def test_warmup_ratio_gives_the_intended_warmup_steps(ratio, max_steps):
    pytest.importorskip("trl")
    from trl import DPOConfig, GRPOConfig

    from dftune.offline.baselines import BaselineConfig, _common_args, baseline_training, warmup_args

    expected = math.ceil(ratio * max_steps)
    cfg = BaselineConfig(train=baseline_training(warmup_ratio=ratio, max_steps=max_steps, global_batch=8, micro_batch=4),
                         num_generations=4)
    for cls in (DPOConfig, GRPOConfig):  # the real argument classes of the installed transformers / TRL
        assert cls(**_common_args(cfg)).get_warmup_steps(max_steps) == expected
    # transformers 4.x reads only warmup_ratio (its int warmup_steps would override the ratio when > 0)
    assert warmup_args(ratio, "4.57.6") == {"warmup_ratio": ratio, "warmup_steps": 0}
    assert warmup_args(ratio, "5.0.0") == {"warmup_steps": ratio}


def test_baseline_config_errors(monkeypatch):
    from dftune.offline.baselines import BaselineConfig, _common_args, baseline_training, load_baseline_config

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="unknown key"):
        load_baseline_config(None, ["lrr=1"])
    with pytest.raises(ConfigError, match="expected int"):
        load_baseline_config(None, ["global_batch=many"])
    with pytest.raises(ConfigError, match=r"warmup_ratio must be in \[0, 1\)"):
        _common_args(BaselineConfig(train=baseline_training(warmup_ratio=1.0)))
    with pytest.raises(ConfigError, match="lr_scheduler must be one of"):
        _common_args(BaselineConfig(lr_scheduler="linear"))
    dpo = load_baseline_config(str(ROOT / "configs/paper/dpo.yaml"), [])
    assert (dpo.train.lr, dpo.train.global_batch, dpo.train.warmup_ratio) == (1e-6, 128, 0.05)
    grpo = load_baseline_config(str(ROOT / "configs/paper/grpo.yaml"), [])
    assert (grpo.train.lr, grpo.train.warmup_ratio, grpo.num_generations, grpo.train.global_batch // grpo.num_generations) == (
        1e-6, 0.1, 4, 256)


def _dpo_trainer(model, rows, tmp_path):
    """TRL's DPOTrainer on ``rows`` (built, not trained): its tokenised dataset is what DPO sees."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), report_to="none", use_cpu=True, bf16=False, max_length=256)
    return DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model), args=args,
                      train_dataset=Dataset.from_list(rows), processing_class=tok), tok


def test_dpo_pairs_end_with_the_models_own_eos_as_rft_trains_them(sampler_model, tmp_path):
    """The pairs dftune sample writes reach DPO as the tokens dftune train gives the same
    prompt and response (RFT's): the response ends with the tokenizer's EOS, not with the
    chat template's <|im_end|> and newline, which is what TRL makes of them as conversations."""
    pytest.importorskip("trl")
    from dftune.offline.baselines import dpo_text_rows, dpo_token_mismatch

    model, _ = sampler_model
    pair = {"prompt": [{"role": "user", "content": "What is 1 plus 2?"}],
            "chosen": [{"role": "assistant", "content": "We add them. \\boxed{3}"}],
            "rejected": [{"role": "assistant", "content": "We add them. \\boxed{4}"}]}
    trainer, tok = _dpo_trainer(model, [pair], tmp_path / "conv")  # TRL's own conversational rendering
    row = trainer.train_dataset[0]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in row["chosen_ids"] and row["chosen_ids"][-1] != tok.eos_token_id
    assert dpo_token_mismatch(row, tok, pair)  # differs from dftune train's tokens: the check can fail

    trainer, tok = _dpo_trainer(model, dpo_text_rows([pair], tok), tmp_path / "ours")
    row = trainer.train_dataset[0]
    assert dpo_token_mismatch(row, tok, pair) == ""
    assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tok.eos_token_id and im_end not in row["chosen_ids"]
    rft = write_jsonl(tmp_path / "rft.jsonl", [{"prompt": "What is 1 plus 2?", "completion": "We add them. \\boxed{3}"}])
    from dftune.data import build_dataset

    ex = build_dataset(DataConfig(path=str(rft)), tok)[0][0]  # what RFT trains on, through the training data path
    assert list(ex.input_ids) == list(row["prompt_ids"]) + list(row["chosen_ids"])
    assert tok.decode(row["rejected_ids"]) == "We add them. \\boxed{4}<|endoftext|>"
