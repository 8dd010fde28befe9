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
from dftune.paths import data_problem, model_problem
from dftune.settings import Problems, load


@dataclass
class ModelConfig:
    """The model to fine-tune."""

    name_or_path: str = ""
    """Hugging Face Hub id or local folder."""
    gguf_file: str = ""
    """a GGUF file inside that folder, loaded through transformers (needs `gguf`)."""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory."""
    lora_r: int = 0
    """LoRA rank; 0 trains every weight."""
    lora_alpha: int = 16
    """LoRA's scale (peft's lora_alpha): the update is scaled by lora_alpha / lora_r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input (peft's lora_dropout), in [0, 1)."""
    lora_target_modules: str = "all-linear"
    """The modules that get adapters: all-linear, or names separated by commas (e.g. q_proj,v_proj)."""
    attn_implementation: str = ""
    """passed to from_pretrained (e.g. sdpa, flash_attention_2)."""
    trust_remote_code: bool = False
    """allow custom model code from the Hub."""


@dataclass
class DataConfig:
    """The training data."""

    path: str = ""
    """a .jsonl/.json/.parquet file, a folder of them, or a Hub dataset id."""
    split: str = "train"
    """the Hub split (ignored for local files)."""
    format: str = "auto"
    """auto, messages, prompt_completion, problem_solution or question_answer."""
    prompt_field: str = ""
    """The field that holds the prompt; empty: the format's own (prompt, problem, question)."""
    response_field: str = ""
    """The field that holds the response; empty: the format's own (completion, solution, answer)."""
    messages_field: str = ""
    """The field that holds the chat messages (format messages); empty: messages."""
    select: str = "all"
    """all, first:N (the paper took the first 100K rows) or random:N (seeded)."""
    max_length: int = 2048
    """tokens per example; longer responses are cut at the end, and examples whose prompt alone reaches max_length
    are dropped and counted."""
    instruction_suffix: str = ""
    """text appended to every prompt (e.g. the boxed instruction)."""
    system_prompt: str = ""
    """a system turn before every prompt; empty for none."""
    chat_template: str = "auto"
    """auto (the tokenizer's; error if it has none), plain (a minimal "User:/Assistant:" template for base models),
    or a path to a .jinja file."""
    boxed_answers: bool = True
    """rewrite GSM8K's final "#### 72" line as "\\boxed{72}"."""
    on_bad_row: str = "error"
    """error (stop, naming file, row and field) or skip (drop and count)."""
    packing: bool = False
    """pack each step's examples into rows of max_length tokens (position_ids restart per example, so attention and
    loss never cross one); train.micro_batch then counts rows. The step keeps the same examples, so the gradient
    is the unpadded one. Needs an attention that honours position_ids (sdpa, eager, flex, flash-attention)."""
    cache: bool = True
    """keep the tokenised data on disk, keyed by a hash of the data files, tokenizer, template and these settings; a
    restarted run and every process of a run reuse it."""
    cache_dir: str = ""
    """where; empty: $DFTUNE_CACHE_DIR, else ~/.cache/dftune/data."""
    workers: int = 0
    """processes that tokenise; 0 picks (several from 30,000 rows, else one)."""


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
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also get every step's numbers and the settings: tensorboard, wandb,
    mlflow (a,b,c; empty: log.jsonl only, which is always written). Their own environment configures
    them (WANDB_MODE=offline, MLFLOW_TRACKING_URI)."""


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
    """The model to fine-tune (model.KEY=...)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training data (data.KEY=...)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation and the run folder (train.KEY=...)."""
    eval: EvalConfig = field(default_factory=lambda: periodic_eval_defaults(), metadata={"omit": PERIODIC_OMITS})
    """The periodic evaluation during training, every train.eval_every steps: dftune eval's settings, short
    defaults."""



def periodic_eval_defaults() -> EvalConfig:
    """The ``eval`` section's defaults: short, because it runs inside training."""
    return EvalConfig(benchmarks=["math500"], backend="hf", limit=32, prompt="auto",
                      sampling=SamplingConfig(n=1, temperature=1.0, max_new_tokens=512))


def load_config(path: str | Path | None, overrides=()) -> Config:
    """The training run's config (YAML sections model/data/train, plus overrides)."""
    return load(Config, path, overrides)


# ---- checks: every problem with the values, collected before anything loads ---------------


def check_model(m: ModelConfig, p: Problems, where: str = "model") -> None:
    p.add(model_problem(f"{where}.name_or_path", m.name_or_path, m.gguf_file))
    p.at_least(f"{where}.lora_r", m.lora_r, 0)
    if m.lora_r:
        p.positive(f"{where}.lora_alpha", m.lora_alpha)
        p.fraction(f"{where}.lora_dropout", m.lora_dropout)


def check_data(d: DataConfig, p: Problems, where: str = "data") -> None:
    from dftune.records import FORMATS, DataError, parse_select

    p.add(data_problem(f"{where}.path", d.path))
    p.one_of(f"{where}.format", d.format, ("auto", *FORMATS))
    try:
        parse_select(d.select)
    except DataError:
        p.append(f"{where}.select: must be all, first:N or random:N; got {d.select!r}")
    p.at_least(f"{where}.max_length", d.max_length, 2)
    p.one_of(f"{where}.on_bad_row", d.on_bad_row, ("error", "skip"))
    if d.chat_template not in ("auto", "plain"):
        p.check(Path(d.chat_template).is_file(), f"{where}.chat_template: {d.chat_template} not found "
                                                 "(auto, plain, or a .jinja file)")
    p.at_least(f"{where}.workers", d.workers, 0)


def check_training(t: TrainingSection, p: Problems, world: int = 1, where: str = "train") -> None:
    """The shared training section, the same for every trainer."""
    p.positive(f"{where}.lr", t.lr)
    p.fraction(f"{where}.warmup_ratio", t.warmup_ratio)
    p.at_least(f"{where}.weight_decay", t.weight_decay, 0)
    p.at_least(f"{where}.grad_clip", t.grad_clip, 0)
    p.positive(f"{where}.epochs", t.epochs)
    p.at_least(f"{where}.max_steps", t.max_steps, 0)
    p.at_least(f"{where}.log_every", t.log_every, 1)
    p.nonempty(f"{where}.out", t.out, "the run folder")
    from dftune.trackers import tracker_problems

    p.extend(tracker_problems(t.report_to, f"{where}.report_to"))
    if p.at_least(f"{where}.global_batch", t.global_batch, 1) & p.at_least(f"{where}.micro_batch", t.micro_batch, 1):
        p.check(t.global_batch % (t.micro_batch * world) == 0,
                f"{where}.global_batch {t.global_batch} is not a multiple of {where}.micro_batch {t.micro_batch} x "
                f"{world} process(es) = {t.micro_batch * world}")


def check_train(t: TrainConfig, p: Problems, world: int = 1) -> None:
    """The train section (the objective and its schedule are parsed by the caller, once)."""
    from dftune.loss import BACKENDS
    from dftune.precision import DTYPES, precision_problem

    check_training(t, p, world)
    p.add(precision_problem(t.precision))
    p.one_of("train.save_dtype", t.save_dtype, ("auto", *DTYPES))
    p.one_of("train.parallel", t.parallel, ("auto", "none", "ddp", "fsdp"))
    p.one_of("train.loss_backend", t.loss_backend.partition(":")[0], BACKENDS)  # cce:...: its options checked apart
    p.at_least("train.chunk_size", t.chunk_size, 0)
    p.fraction("train.beta1", t.beta1)
    p.fraction("train.beta2", t.beta2)
    p.fraction("train.min_lr_ratio", t.min_lr_ratio, one=True)
    p.at_least("train.save_every", t.save_every, 0)
    p.at_least("train.keep_checkpoints", t.keep_checkpoints, 1)
    p.at_least("train.eval_every", t.eval_every, 0)
    p.check(not (t.resume and t.overwrite), "train.resume and train.overwrite exclude each other")
