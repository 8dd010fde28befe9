"""Run configuration: dataclasses whose docstrings are the help, YAML that holds values only.

    dftune train configs/tiny_cpu.yaml train.objective=nll train.lr=1e-4

A YAML file and ``section.key=value`` overrides fill a ``Config``; an unknown key or a
value of the wrong type is an error that names the key, raised before anything loads.
The resolved config is written to the run folder as ``config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dftune.eval.generate import SamplingConfig
from dftune.eval.run import EvalConfig
from dftune.settings import ConfigError, load
from dftune.settings import choice as _choice


@dataclass
class ModelConfig:
    """The model to fine-tune.

    name_or_path: Hugging Face Hub id or local folder.
    gguf_file: a GGUF file inside that folder, loaded through transformers (needs `gguf`).
    gradient_checkpointing: recompute activations in backward to save memory.
    lora_r: LoRA rank; 0 trains every weight.
    lora_alpha, lora_dropout, lora_target_modules: peft LoraConfig values.
    attn_implementation: passed to from_pretrained (e.g. sdpa, flash_attention_2).
    trust_remote_code: allow custom model code from the Hub.
    """

    name_or_path: str = ""
    gguf_file: str = ""
    gradient_checkpointing: bool = False
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    attn_implementation: str = ""
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """The training data.

    path: a .jsonl/.json/.parquet file, a folder of them, or a Hub dataset id.
    split: the Hub split (ignored for local files).
    format: auto, messages, prompt_completion, problem_solution or question_answer.
    prompt_field, response_field, messages_field: override the fields the format reads.
    select: all, first:N (the paper took the first 100K rows) or random:N (seeded).
    max_length: tokens per example; longer responses are cut at the end, and examples
        whose prompt alone reaches max_length are dropped and counted.
    instruction_suffix: text appended to every prompt (e.g. the boxed instruction).
    system_prompt: a system turn before every prompt; empty for none.
    chat_template: auto (the tokenizer's; error if it has none), plain (a minimal
        "User:/Assistant:" template for base models), or a path to a .jinja file.
    boxed_answers: rewrite GSM8K's final "#### 72" line as "\\boxed{72}".
    on_bad_row: error (stop, naming file, row and field) or skip (drop and count).
    packing: pack each step's examples into rows of max_length tokens (position_ids restart
        per example, so attention and loss never cross one); train.micro_batch then counts
        rows. The step keeps the same examples, so the gradient is the unpadded one. Needs
        an attention that honours position_ids (sdpa, eager, flex, flash-attention).
    cache: keep the tokenised data on disk, keyed by a hash of the data files, tokenizer,
        template and these settings; a restarted run and every process of a run reuse it.
    cache_dir: where; empty: $DFTUNE_CACHE_DIR, else ~/.cache/dftune/data.
    workers: processes that tokenise; 0 picks (several from 30,000 rows, else one).
    """

    path: str = ""
    split: str = "train"
    format: str = "auto"
    prompt_field: str = ""
    response_field: str = ""
    messages_field: str = ""
    select: str = "all"
    max_length: int = 2048
    instruction_suffix: str = ""
    system_prompt: str = ""
    chat_template: str = "auto"
    boxed_answers: bool = True
    on_bad_row: str = "error"
    packing: bool = False
    cache: bool = True
    cache_dir: str = ""
    workers: int = 0


@dataclass
class TrainingSection:
    """The training settings every trainer shares: ``dftune train``, ``baseline dpo/grpo`` (TRL)
    and ``baseline ppo`` (verl) read the same keys, with the same meaning and type."""

    lr: float = 5e-5
    """Peak learning rate (AdamW), reached after the warm-up."""
    warmup_ratio: float = 0.1
    """Linear warm-up over this fraction of the steps, in [0, 1); then the schedule's decay."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay (not applied to biases and norms)."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    global_batch: int = 256
    """Sequences per optimizer step over all processes (DPO: pairs; GRPO: completions; PPO: questions)."""
    micro_batch: int = 4
    """Sequences per forward pass on one process; the accumulation is global_batch / (micro_batch x processes)."""
    epochs: float = 1.0
    """Passes over the data (fractions allowed where the trainer supports them); max_steps > 0 overrides it."""
    max_steps: int = 0
    """Optimizer steps to run; 0: as many as epochs make."""
    seed: int = 0
    """Data order, initialisation of anything random, dropout."""
    out: str = "runs/dft"
    """The run folder: config.yaml, log.jsonl, checkpoints, and the final model in OUT/final."""
    log_every: int = 10
    """Print a log line every N steps (log.jsonl gets every step)."""


@dataclass
class TrainConfig(TrainingSection):
    """The optimisation (defaults: the paper's recipe, PAPER.md): the shared training settings
    and dftune's own loop's."""

    objective: str = "dft"
    """NAME or NAME:key=value,... e.g. nll, dft, dft:floor=0.1, dft:protect=special, eaft:k=20,
    chord_phi, prob_power:alpha=2, thresholded:q=0.2, talr, iw_sft, asft:lam=0.05; every objective
    also takes norm=weight (divide by the step's summed weights instead of its token count) and
    protect=special (NLL on special tokens). The list is below."""
    objective_schedule: str = ""
    """The objective changing over training, e.g. prob_power:alpha=0->1 or nll@0.2,dft (NLL for
    the first 20% of steps); empty: objective throughout."""
    precision: str = "auto"
    """auto (bf16-mixed on CUDA, fp32 on CPU), bf16-mixed (fp32 master weights and optimizer
    state, bf16 compute: the paper's setting), fp32, or bf16-pure (bf16 weights: small updates
    are lost; only when memory forces it). fp16 is refused."""
    parallel: str = "auto"
    """auto (ddp with several processes), ddp, or fsdp (FSDP2: parameters, gradients and optimizer
    state sharded over processes). Launch several with torchrun."""
    loss_backend: str = "chunked"
    """chunked (default), naive, cce or liger (CUDA). cce and liger are exact by default and
    name their approximations: cce:accum=bf16 (required by cut-cross-entropy 25.1.1, whose
    backward sums in bf16), cce:filter_eps=auto|high|FLOAT, liger:compute=bf16 (dftune.loss_gpu)."""
    chunk_size: int = 0
    """Tokens per loss chunk; 0 picks one from the vocabulary size."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay."""
    min_lr_ratio: float = 0.0
    """The cosine schedule's floor after the warm-up, as a fraction of lr."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep (>= 1)."""
    resume: bool = False
    """Continue the run in train.out from its newest checkpoint (same settings required)."""
    overwrite: bool = False
    """Delete the run already in train.out and start again."""
    tensorboard: bool = True
    """Also write TensorBoard events (needs the tensorboard package)."""
    log_kl: bool = False
    """Keep a frozen reference to log KL(initial || current) every step, also for objectives that
    do not need one (costs a second forward pass)."""
    eval_every: int = 0
    """Run the periodic evaluation (the ``eval`` section) every N steps (0: never); with several
    processes each evaluates its share."""
    save_dtype: str = "auto"
    """The dtype the final model (OUT/final) is written in: auto, the base checkpoint's stored
    dtype (bf16 for the paper's models, although training keeps fp32 master weights under
    bf16-mixed), or bf16, fp16, fp32 (fp32: the master weights as trained)."""

    def __post_init__(self):
        if self.precision.startswith("fp16"):
            raise ConfigError("train.precision: fp16 is not supported: fp16 gradients underflow without loss scaling, "
                              "which dftune does not do; use bf16-mixed (GPUs since Ampere) or fp32")
        _choice("train.precision", self.precision, ("auto", "bf16-mixed", "fp32", "bf16-pure"))
        _choice("train.parallel", self.parallel, ("auto", "none", "ddp", "fsdp"))
        _choice("train.save_dtype", self.save_dtype, ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"))
        for key in ("global_batch", "micro_batch", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1; got {getattr(self, key)}")
        if self.global_batch % self.micro_batch:
            raise ConfigError(f"train.global_batch ({self.global_batch}) must be a multiple of train.micro_batch "
                              f"({self.micro_batch}) x processes")
        if self.resume and self.overwrite:
            raise ConfigError("train.resume and train.overwrite exclude each other")


# the ``eval`` keys that the periodic evaluation cannot honour: it scores the live model in the
# training process, with transformers, one benchmark at a time
PERIODIC_OMITS = {
    "model": "periodic evaluation scores the model being trained (dftune eval evaluates a saved one)",
    "out": "periodic evaluation writes eval_curve.jsonl in the run folder (train.out)",
    "backend": "periodic evaluation generates with the live model in the training process (hf); "
               "evaluate saved checkpoints with vLLM by dftune eval",
    "engine": "periodic evaluation generates with the live model as it is (no engine options)",
    "chunk": "periodic evaluation keeps no samples file",
    "warn_failures": "periodic evaluation writes accuracies only",
}


@dataclass
class Config:
    """A training run: model, data and train sections, and ``eval``: the periodic evaluation
    for learning curves (every ``train.eval_every`` steps, on the live model with transformers;
    the same settings as ``dftune eval``, with short defaults: 32 problems of math500, one
    sample of up to 512 tokens at temperature 1.0, the prompt of the run's own layout:
    ``prompt: auto``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=lambda: periodic_eval_defaults(), metadata={"omit": PERIODIC_OMITS})



def periodic_eval_defaults() -> EvalConfig:
    """The ``eval`` section's defaults: short, because it runs inside training."""
    return EvalConfig(benchmarks=["math500"], backend="hf", limit=32, prompt="auto",
                      sampling=SamplingConfig(n=1, temperature=1.0, max_new_tokens=512))


def load_config(path: str | Path | None, overrides=()) -> Config:
    """The training run's config (YAML sections model/data/train, plus overrides)."""
    return load(Config, path, overrides)
