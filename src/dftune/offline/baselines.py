"""DPO and GRPO baselines, run on TRL (not re-implemented here); PPO is in ``ppo.py`` (verl).

    dftune baseline dpo configs/paper/dpo.yaml data=data/rft/dpo.jsonl
    dftune baseline grpo configs/paper/grpo.yaml data=../shared/data/train/math_train.jsonl
    accelerate launch --num_processes 8 -m dftune.cli baseline grpo configs/paper/grpo.yaml

The configs mirror the paper (DPO: lr 1e-6, batch 128, warm-up 0.05; GRPO: group size 4,
lr 1e-6, batch 256 questions, warm-up 0.1). GRPO's reward is our grader (1 for a correct
final answer, else 0). ``global_batch`` is per optimizer step over all processes: the
gradient accumulation is global_batch / (micro_batch x WORLD_SIZE), and a global batch
that does not divide is an error. The final model is saved with save_pretrained in
``train.out/final``, so ``dftune eval`` and ``dftune report`` take it like any run.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from dftune.config import TrainingSection
from dftune.settings import ConfigError, load


def baseline_training(**changes) -> TrainingSection:
    """The ``train`` section's defaults for DPO and GRPO (the paper's DPO: lr 1e-6, 128 pairs
    per step, warm-up 0.05, no weight decay), with ``changes``."""
    return TrainingSection(**{"lr": 1e-6, "warmup_ratio": 0.05, "weight_decay": 0.0, "global_batch": 128,
                              "out": "runs/baseline", **changes})


@dataclass
class BaselineConfig:
    """A TRL baseline run (DPO or GRPO)."""

    model: str = ""
    """The policy to train: a Hub id or local folder."""
    data: str = ""
    """dpo.jsonl from dftune sample (DPO), or a question dataset with gold answers (GRPO)."""
    select: str = "all"
    """all, first:N or random:N rows."""
    instruction_suffix: str = ""
    """GRPO: text appended to every question."""
    train: TrainingSection = field(default_factory=baseline_training)
    """The shared training settings (lr, warm-up, batches, length, seed, out, log_every)."""
    lr_scheduler: str = "cosine"
    """cosine (decay to 0 after the warm-up) or constant (flat after it; verl's default)."""
    beta: float = 0.1
    """DPO's KL strength, or GRPO's KL coefficient."""
    num_generations: int = 4
    """GRPO: the group size (completions per question)."""
    max_completion_length: int = 1024
    """GRPO: generation length in tokens."""
    max_length: int = 2048
    """DPO: prompt + response tokens."""
    temperature: float = 1.0
    """GRPO: sampling temperature."""
    dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32."""


SCHEDULERS = {"cosine": "cosine", "constant": "constant_with_warmup"}  # ours -> transformers' names


def validate_baseline(cfg: BaselineConfig, kind: str) -> None:
    """Every problem with a DPO (``kind`` dpo) or GRPO run's settings, raised together before
    anything loads."""
    from dftune.config import check_training
    from dftune.paths import data_problem, model_problem
    from dftune.settings import Problems

    p = Problems()
    p.add(model_problem("model", cfg.model))
    p.add(data_problem("data", cfg.data))
    check_training(cfg.train, p, world_size())
    p.one_of("lr_scheduler", cfg.lr_scheduler, tuple(SCHEDULERS))
    p.at_least("beta", cfg.beta, 0)
    p.one_of("dtype", cfg.dtype, ("auto", "bf16", "fp32"))
    if kind == "dpo":
        p.at_least("max_length", cfg.max_length, 2)
    else:
        p.at_least("num_generations", cfg.num_generations, 2)
        p.at_least("max_completion_length", cfg.max_completion_length, 1)
        p.at_least("temperature", cfg.temperature, 0)
        p.check(cfg.train.global_batch % max(cfg.num_generations, 1) == 0,
                f"train.global_batch {cfg.train.global_batch} (completions) must be a multiple of num_generations "
                f"{cfg.num_generations}: each question's group is in one step")
    p.raise_all()


def load_baseline_config(path: str | None, overrides: list[str]) -> BaselineConfig:
    """YAML (optional) + key=value overrides, checked (dftune.config.load)."""
    return load(BaselineConfig, path, overrides)


def world_size() -> int:
    """Processes in this run, as the launcher (accelerate, torchrun) announces it in WORLD_SIZE."""
    raw = os.environ.get("WORLD_SIZE", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"WORLD_SIZE={raw!r} in the environment is not a positive integer")
    return int(raw)


def grad_accumulation(global_batch: int, micro_batch: int, world: int) -> int:
    """Micro-batches per process per optimizer step: global_batch / (micro_batch x world)."""
    if global_batch < 1 or micro_batch < 1:
        raise ConfigError(f"global_batch and micro_batch must be >= 1; got {global_batch} and {micro_batch}")
    if global_batch % (micro_batch * world):
        raise ConfigError(f"global_batch {global_batch} is not a multiple of micro_batch {micro_batch} x {world} "
                          f"process(es) = {micro_batch * world}; change global_batch or micro_batch")
    return global_batch // (micro_batch * world)


def warmup_args(ratio: float, transformers_version: str | None = None) -> dict:
    """TrainingArguments keywords for a linear warm-up over ``ratio`` of the steps.

    transformers 5 reads a float ``warmup_steps`` below 1 as a ratio (``warmup_ratio`` is
    deprecated in 5.0-5.1 and gone after); transformers 4 needs ``warmup_ratio`` (its
    ``warmup_steps`` must be an int and overrides the ratio when positive).
    """
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"warmup_ratio must be in [0, 1); got {ratio}")
    if transformers_version is None:
        import transformers

        transformers_version = transformers.__version__
    if int(transformers_version.split(".")[0]) >= 5:
        return {"warmup_steps": float(ratio)}
    return {"warmup_ratio": float(ratio), "warmup_steps": 0}


def _common_args(cfg: BaselineConfig, batch_unit: str = "sequences") -> dict:
    import torch

    cuda = torch.cuda.is_available()
    if cfg.lr_scheduler not in SCHEDULERS:
        raise ConfigError(f"lr_scheduler must be one of {sorted(SCHEDULERS)}; got {cfg.lr_scheduler!r}")
    world = world_size()
    accum = grad_accumulation(cfg.train.global_batch, cfg.train.micro_batch, world)
    print(f"batch: {cfg.train.global_batch} {batch_unit} per step = micro_batch {cfg.train.micro_batch} x {accum} "
          f"accumulation x {world} process(es)")
    return dict(
        output_dir=cfg.train.out, learning_rate=cfg.train.lr, weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.grad_clip, per_device_train_batch_size=cfg.train.micro_batch,
        gradient_accumulation_steps=accum, num_train_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps if cfg.train.max_steps > 0 else -1, seed=cfg.train.seed,
        lr_scheduler_type=SCHEDULERS[cfg.lr_scheduler], report_to=list(cfg.train.report_to) or "none", save_strategy="no",
        logging_steps=cfg.train.log_every, use_cpu=not cuda, bf16=cuda and cfg.dtype in ("auto", "bf16"),
        disable_tqdm=False, **warmup_args(cfg.train.warmup_ratio),
    )


def _model_and_tokenizer(cfg: BaselineConfig):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dftune.precision import torch_dtype

    # bf16 only where it computes fast (CUDA); on a CPU the baselines run in fp32
    dtype = torch_dtype(cfg.dtype, "cuda") if torch.cuda.is_available() else torch.float32
    tok = AutoTokenizer.from_pretrained(cfg.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype), tok


def lr_recorder():
    """A TrainerCallback that keeps the learning rate each optimizer step used (read from the
    optimizer just before its step: after the previous scheduler step, so the rate applied,
    where transformers' logged ``learning_rate`` is the next step's). ``_finish`` writes them
    to budget.json: the run's learning-rate budget is measured, not recomputed."""
    from transformers import TrainerCallback

    class LrRecorder(TrainerCallback):
        def __init__(self):
            self.lrs: list[float] = []

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    return LrRecorder()


def lr_budget(lrs: list[float]) -> dict:
    """budget.json: the rate of every optimizer step and their sum (the learning-rate budget:
    under Adam, a step moves each weight by about its rate, so the sum bounds the movement)."""
    return {"optimizer_steps": len(lrs), "lr_sum": float(sum(lrs)), "lr": [float(x) for x in lrs]}


def _finish(trainer, tok, cfg: BaselineConfig, kind: str) -> Path:
    from dftune.files import write_json, write_text

    out = Path(cfg.train.out)
    final = out / "final"
    trainer.save_model(str(final))
    tok.save_pretrained(final)
    logs = [r for r in trainer.state.log_history if "loss" in r]  # the report's learning curves read log.jsonl
    write_text(out / "log.jsonl", "".join(
        json.dumps({"step": r.get("step", i + 1), **{k: v for k, v in r.items() if isinstance(v, (int, float))}}) + "\n"
        for i, r in enumerate(logs)))
    write_text(out / "config.yaml", yaml.safe_dump({"baseline": kind, **asdict(cfg)}, sort_keys=False))
    recorder = next(c for c in trainer.callback_handler.callbacks if hasattr(c, "lrs"))
    write_json(out / "budget.json", lr_budget(recorder.lrs))
    return final


def _last_text(x) -> str:
    """A conversation's last turn, or a plain string (dftune's prompt/completion convention)."""
    return x[-1]["content"] if isinstance(x, list) else x


def dpo_text_rows(rows: list[dict], tok) -> list[dict]:
    """(prompt, chosen, rejected) rows as the text ``dftune train`` sees for a prompt/completion
    row: the user's text (a string, or a conversation's last turn) in the model's chat template
    with the generation prompt (what the samples answered), each response followed by the
    tokenizer's EOS, the model's own end of a response (RFT and DFT-on-RFT train on exactly
    these tokens). Given to TRL as conversations instead, each response would end with the chat
    template's end of turn (ChatML: ``<|im_end|>`` and a newline), tokens a base that ends with
    EOS never produces, whose log-probability would dominate the pair's."""
    from dftune.data import response_text
    from dftune.offline.sample import render_prompt

    return [{"prompt": render_prompt(tok, _last_text(r["prompt"])),
             **{k: response_text(tok, _last_text(r[k])) + tok.eos_token for k in ("chosen", "rejected")}}
            for r in rows]


def dpo_token_mismatch(trainer_row: dict, tok, row: dict) -> str:
    """"" when TRL's tokens of a pair's chosen sequence (``trainer_row``: its prompt_ids and
    chosen_ids) are those ``dftune train`` makes of the same prompt and response, else what
    differs (TRL tokenises prompt + response as one text and may add a BOS; ``dftune.data``
    encodes them apart, without special tokens)."""
    from dftune.data import tokenize_example

    msgs = [{"role": "user", "content": _last_text(row["prompt"])},
            {"role": "assistant", "content": _last_text(row["chosen"])}]
    ours = tokenize_example(tok, msgs, "prompt_completion", "dpo")[0]
    theirs = list(trainer_row["prompt_ids"]) + list(trainer_row["chosen_ids"])
    if theirs == ours:
        return ""
    i = next((j for j, (x, y) in enumerate(zip(theirs, ours)) if x != y), min(len(theirs), len(ours)))
    return (f"DPO's tokens differ from dftune train's at position {i}: {tok.decode(theirs[i:i + 8])!r} vs "
            f"{tok.decode(ours[i:i + 8])!r}")


def run_dpo(cfg: BaselineConfig) -> Path:
    """DPO (Rafailov et al. 2023) with TRL's DPOTrainer on (prompt, chosen, rejected) rows,
    rendered by ``dpo_text_rows`` (the model's own end of response)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from dftune.records import read_records, select_rows

    rows = [r for _, r in select_rows(read_records(cfg.data), cfg.select, cfg.train.seed)]
    for i, r in enumerate(rows, 1):
        missing = {"prompt", "chosen", "rejected"} - set(r)
        if missing:
            raise ConfigError(f"{cfg.data}, row {i}: missing field(s) {sorted(missing)} (write it with dftune sample)")
    args = _common_args(cfg, "pairs")
    model, tok = _model_and_tokenizer(cfg)
    Path(cfg.train.out).mkdir(parents=True, exist_ok=True)
    args = DPOConfig(beta=cfg.beta, max_length=cfg.max_length, **args)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(dpo_text_rows(rows, tok)),
                         processing_class=tok, callbacks=[lr_recorder()])
    mismatch = dpo_token_mismatch(trainer.train_dataset[0], tok, rows[0])
    if mismatch:
        print(f"warning: {mismatch}")
    trainer.train()
    return _finish(trainer, tok, cfg, "dpo")


def grader_reward(completions, gold, **kwargs) -> list[float]:
    """GRPO reward: 1.0 when our grader judges the completion's final answer correct."""
    from dftune.eval.grade import grade_batch

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    verdicts = grade_batch(list(zip(texts, gold)), workers=2)
    return [1.0 if v.correct else 0.0 for v in verdicts]


def run_grpo(cfg: BaselineConfig) -> Path:
    """GRPO (Shao et al. 2024) with TRL's GRPOTrainer; group size = num_generations."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from dftune.offline.sample import load_questions

    if cfg.num_generations < 2 or cfg.train.global_batch % cfg.num_generations:
        raise ConfigError(f"train.global_batch {cfg.train.global_batch} (completions) must be a multiple of "
                          f"num_generations {cfg.num_generations} (>= 2): each question's group is in one step")
    qs, skipped = load_questions(cfg.data, cfg.select, cfg.instruction_suffix, cfg.train.seed)
    if skipped:
        print(f"{cfg.data}: {len(skipped)} row(s) without a gold answer skipped (first: {skipped[0]})")
    rows = [{"prompt": [{"role": "user", "content": q.prompt}], "gold": q.golds} for q in qs]
    args = _common_args(cfg, f"completions ({cfg.train.global_batch // cfg.num_generations} questions)")
    model, tok = _model_and_tokenizer(cfg)
    Path(cfg.train.out).mkdir(parents=True, exist_ok=True)
    args = GRPOConfig(num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
                      temperature=cfg.temperature, beta=cfg.beta, **args)
    trainer = GRPOTrainer(model=model, reward_funcs=[grader_reward], args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[lr_recorder()])
    trainer.train()
    return _finish(trainer, tok, cfg, "grpo")
