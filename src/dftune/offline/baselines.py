"""DPO and GRPO baselines, run on TRL (not re-implemented here).

    dftune baseline dpo configs/paper/dpo.yaml data=data/rft/dpo.jsonl
    dftune baseline grpo configs/paper/grpo.yaml data=../shared/data/train/math_train.jsonl

The configs mirror the paper (DPO: lr 1e-6, batch 128, warm-up 0.05; GRPO: group size 4,
lr 1e-6, batch 256, warm-up 0.1). GRPO's reward is our grader (1 for a correct final
answer, else 0). The final model is saved with save_pretrained in ``out_dir/final``,
so ``dftune eval`` and ``dftune report`` take it like any run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from dftune.config import ConfigError, from_dict, parse_overrides


@dataclass
class BaselineConfig:
    """A TRL baseline run.

    model: Hub id or local folder.  data: dpo.jsonl (DPO) or a question dataset (GRPO).
    select: all, first:N or random:N rows.  instruction_suffix: appended to every prompt.
    lr, warmup_ratio, weight_decay, grad_clip: optimisation.
    global_batch, micro_batch: sequences per optimizer step, per forward (per process).
    epochs, max_steps: length (max_steps > 0 wins).
    beta: DPO's KL strength, or GRPO's KL coefficient.
    num_generations: GRPO group size.  max_completion_length: GRPO generation length.
    max_length: DPO's prompt + response tokens.  temperature: GRPO sampling.
    seed, out_dir, dtype (auto: bf16 on CUDA, fp32 on CPU), logging_steps.
    """

    model: str = ""
    data: str = ""
    select: str = "all"
    instruction_suffix: str = ""
    lr: float = 1e-6
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    global_batch: int = 128
    micro_batch: int = 4
    epochs: float = 1.0
    max_steps: int = 0
    beta: float = 0.1
    num_generations: int = 4
    max_completion_length: int = 1024
    max_length: int = 2048
    temperature: float = 1.0
    seed: int = 0
    out_dir: str = "runs/baseline"
    dtype: str = "auto"
    logging_steps: int = 10


def load_baseline_config(path: str | None, overrides: list[str]) -> BaselineConfig:
    data = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
    if path and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    data.update(parse_overrides(overrides, nested=False))
    return from_dict(BaselineConfig, data or {}, path or "baseline")


def _common_args(cfg: BaselineConfig, world: int = 1) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    if cfg.global_batch % (cfg.micro_batch * world):
        raise ConfigError(f"global_batch {cfg.global_batch} must be a multiple of micro_batch x processes")
    return dict(
        output_dir=cfg.out_dir, learning_rate=cfg.lr, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.grad_clip, per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=cfg.global_batch // (cfg.micro_batch * world), num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1, seed=cfg.seed, lr_scheduler_type="cosine",
        report_to="none", save_strategy="no", logging_steps=cfg.logging_steps, use_cpu=not cuda,
        bf16=cuda and cfg.dtype in ("auto", "bf16"), disable_tqdm=False,
    )


def _model_and_tokenizer(cfg: BaselineConfig):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if (torch.cuda.is_available() and cfg.dtype in ("auto", "bf16")) else torch.float32
    tok = AutoTokenizer.from_pretrained(cfg.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype), tok


def _finish(trainer, tok, cfg: BaselineConfig, kind: str) -> Path:
    out = Path(cfg.out_dir)
    final = out / "final"
    trainer.save_model(str(final))
    tok.save_pretrained(final)
    with (out / "log.jsonl").open("w") as f:  # the report's learning curves read this
        for i, rec in enumerate(r for r in trainer.state.log_history if "loss" in r):
            f.write(json.dumps({"step": rec.get("step", i + 1), **{k: v for k, v in rec.items() if isinstance(v, (int, float))}}) + "\n")
    (out / "config.yaml").write_text(yaml.safe_dump({"baseline": kind, **asdict(cfg)}, sort_keys=False))
    return final


def run_dpo(cfg: BaselineConfig) -> Path:
    """DPO (Rafailov et al. 2023) with TRL's DPOTrainer on (prompt, chosen, rejected) rows."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from dftune.data import read_records, select_rows

    rows = [r for _, r in select_rows(read_records(cfg.data), cfg.select, cfg.seed)]
    for i, r in enumerate(rows, 1):
        missing = {"prompt", "chosen", "rejected"} - set(r)
        if missing:
            raise ConfigError(f"{cfg.data}, row {i}: missing field(s) {sorted(missing)} (write it with dftune sample)")
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    model, tok = _model_and_tokenizer(cfg)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    args = DPOConfig(beta=cfg.beta, max_length=cfg.max_length, **_common_args(cfg))
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
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

    qs = load_questions(cfg.data, cfg.select, cfg.instruction_suffix, cfg.seed)
    rows = [{"prompt": [{"role": "user", "content": q.prompt}], "gold": q.golds} for q in qs]
    model, tok = _model_and_tokenizer(cfg)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    args = GRPOConfig(num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
                      temperature=cfg.temperature, beta=cfg.beta, **_common_args(cfg))
    trainer = GRPOTrainer(model=model, reward_funcs=[grader_reward], args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok)
    trainer.train()
    return _finish(trainer, tok, cfg, "grpo")
