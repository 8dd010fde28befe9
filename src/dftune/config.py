"""Run configuration: dataclasses whose docstrings are the help, YAML that holds values only.

    dftune train configs/tiny_cpu.yaml train.objective=nll train.lr=1e-4

A YAML file and ``section.key=value`` overrides fill a ``Config``; an unknown key or a
value of the wrong type is an error that names the key, raised before anything loads.
The resolved config is written to the run folder as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclasses."""


def _choice(where: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: must be one of {', '.join(choices)}; got {value!r}")


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
class TrainConfig:
    """The optimisation (defaults: the paper's recipe, PAPER.md).

    objective: nll, dft, prob_power:alpha=2, thresholded:q=0.2, dft_clip:tau=0.7, talr,
        focal:gamma=2, iw_sft, iw_sft:level=token, asft:lam=0.05.
    precision: auto (bf16-mixed on CUDA, fp32 on CPU), bf16-mixed (fp32 master weights and
        optimizer state, bf16 compute: the paper's setting), fp32, or bf16-pure (bf16
        weights: small updates are lost; only when memory forces it). fp16 is refused.
    parallel: auto (ddp with several processes), ddp, or fsdp (FSDP2: parameters, gradients
        and optimizer state sharded over processes). Launch several with torchrun.
    loss_backend: chunked (default), naive, cce or liger (CUDA).
    chunk_size: tokens per loss chunk; 0 picks one from the vocabulary size.
    lr, beta1, beta2, weight_decay: AdamW.
    warmup_ratio: linear warm-up over this fraction of the steps, then cosine decay.
    min_lr_ratio: the cosine schedule's floor, as a fraction of lr.
    grad_clip: max global gradient norm; 0 disables clipping.
    global_batch: sequences per optimizer step = micro_batch x accumulation x processes.
    micro_batch: sequences per forward pass on one process.
    epochs: passes over the data (fractions allowed); max_steps > 0 overrides it.
    seed: data order, initialisation of anything random, dropout.
    out_dir: the run folder (config, log, checkpoints, final model).
    save_every: checkpoint every N optimizer steps (0: only at the end).
    keep_checkpoints: how many recent checkpoints to keep (>= 1).
    resume: continue the run in out_dir from its newest checkpoint (same settings required).
    overwrite: delete the run already in out_dir and start again.
    log_every: print a log line every N steps (the JSONL log gets every step).
    tensorboard: also write TensorBoard events (needs the tensorboard package).
    log_kl: keep a frozen reference to log KL(initial || current) every step, also for
        objectives that do not need one (costs a second forward pass).
    eval_every: run the short periodic evaluation every N steps (0: never).
    eval_benchmarks, eval_limit, eval_n, eval_max_new_tokens, eval_data_dir: that evaluation.
    """

    objective: str = "dft"
    precision: str = "auto"
    parallel: str = "auto"
    loss_backend: str = "chunked"
    chunk_size: int = 0
    lr: float = 5e-5
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    global_batch: int = 256
    micro_batch: int = 4
    epochs: float = 1.0
    max_steps: int = 0
    seed: int = 0
    out_dir: str = "runs/dft"
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    log_every: int = 10
    tensorboard: bool = True
    log_kl: bool = False
    eval_every: int = 0
    eval_benchmarks: str = "math500"
    eval_limit: int = 32
    eval_n: int = 1
    eval_max_new_tokens: int = 512
    eval_data_dir: str = ""

    def __post_init__(self):
        if self.precision.startswith("fp16"):
            raise ConfigError("train.precision: fp16 is not supported: fp16 gradients underflow without loss scaling, "
                              "which dftune does not do; use bf16-mixed (GPUs since Ampere) or fp32")
        _choice("train.precision", self.precision, ("auto", "bf16-mixed", "fp32", "bf16-pure"))
        _choice("train.parallel", self.parallel, ("auto", "none", "ddp", "fsdp"))
        for key in ("global_batch", "micro_batch", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1; got {getattr(self, key)}")
        if self.global_batch % self.micro_batch:
            raise ConfigError(f"train.global_batch ({self.global_batch}) must be a multiple of train.micro_batch "
                              f"({self.micro_batch}) x processes")
        if self.resume and self.overwrite:
            raise ConfigError("train.resume and train.overwrite exclude each other")


@dataclass
class Config:
    """A training run: model, data and train sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _coerce(value, typ, where: str):
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if typ in (int, float, str, bool) and type(value) is not typ:
        raise ConfigError(f"{where}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and bad types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        typ, path = hints[key], f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(typ, value or {}, path)
        else:
            kwargs[key] = _coerce(value, typ, path)
    return cls(**kwargs)


def parse_scalar(raw: str):
    """A command-line value read as YAML, except that 1e-5 (a string in YAML 1.1) is a float."""
    if not raw.strip():
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_overrides(items, nested: bool = True) -> dict:
    """``["train.lr=1e-4", ...]`` -> ``{"train": {"lr": 1e-4}}`` (values read as YAML);
    ``nested=False`` for flat configs: ``["lr=1e-4"]`` -> ``{"lr": 1e-4}``."""
    data: dict = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key or (nested and "." not in key):
            raise ConfigError(f"override {item!r} must look like {'section.key' if nested else 'key'}=value")
        value = parse_scalar(raw)
        if nested:
            section, _, name = key.partition(".")
            data.setdefault(section, {})[name] = value
        else:
            data[key] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or start from defaults) and apply ``section.key=value`` overrides."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    for section, values in parse_overrides(overrides).items():
        if not isinstance(data.setdefault(section, {}), dict):
            raise ConfigError(f"override {section}.*: {section} is not a section")
        data[section].update(values)
    try:
        return from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path or 'overrides'}: {e}") from None


def config_diff(saved: dict, cfg) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, current value) for every key whose value differs."""
    a, b = _flatten(saved), _flatten(to_dict(cfg))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe() -> str:
    """Every section's docstring with its defaults: the help for ``dftune train``."""
    out = []
    for name, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)):
        out.append(f"[{name}] {(cls.__doc__ or '').strip()}")
        out += [f"    {name}.{f.name} = {f.default!r}" for f in dataclasses.fields(cls)]
    return "\n".join(out)
