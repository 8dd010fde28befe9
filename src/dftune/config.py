"""Run configuration: dataclasses whose docstrings are the help, YAML that holds values only.

    dftune train configs/tiny_cpu.yaml train.objective=nll train.lr=1e-4

A YAML file and ``section.key=value`` overrides fill a ``Config``; an unknown key or a
value of the wrong type is an error that names the key, raised before anything loads.
The resolved config is written to the run folder as ``config.yaml``.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dftune.errors import UserError
from dftune.eval.generate import SamplingConfig
from dftune.eval.run import EvalConfig


class ConfigError(UserError, ValueError):
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

    objective: NAME or NAME:key=value,... e.g. nll, dft, dft:floor=0.1, dft:protect=special,
        eaft:k=20, chord_phi, prob_power:alpha=2, thresholded:q=0.2, talr, iw_sft, asft:lam=0.05;
        every objective also takes norm=weight (divide by the step's summed weights instead of
        its token count) and protect=special (NLL on special tokens). The list is below.
    objective_schedule: the objective changing over training, e.g. prob_power:alpha=0->1 or
        nll@0.2,dft (NLL for the first 20% of steps); empty: objective throughout.
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
    eval_every: run the periodic evaluation (the ``eval`` section) every N steps (0: never).
    """

    objective: str = "dft"
    objective_schedule: str = ""
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
    """A training run: model, data and train sections, and ``eval``: the periodic evaluation
    for learning curves (every ``train.eval_every`` steps, on the live model with transformers;
    the same settings as ``dftune eval``, with short defaults: 32 problems of math500, one
    sample of up to 512 tokens at temperature 1.0, the prompt of the run's own layout:
    ``prompt: auto``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=lambda: periodic_eval_defaults())


def periodic_eval_defaults() -> EvalConfig:
    """The ``eval`` section's defaults: short, because it runs inside training."""
    return EvalConfig(benchmarks=["math500"], backend="hf", limit=32, prompt="auto",
                      sampling=SamplingConfig(n=1, temperature=1.0, max_new_tokens=512))


# ---- the configuration language: one for every command -----------------------------------


def _is_list(typ) -> bool:
    return typing.get_origin(typ) is list


def _coerce(value, typ, where: str, split: bool = True):
    if _is_list(typ):  # list[str]: a YAML list, or "a,b,c" from the command line
        if isinstance(value, str):  # split=False (field metadata): items may hold commas
            return [v.strip() for v in value.split(",") if v.strip()] if split else [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                                    for v in value):
            return [str(v) for v in value]
        raise ConfigError(f"{where}: expected a list of strings (or a,b,c), got {type(value).__name__} {value!r}")
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


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def from_dict(cls, data: dict, where: str = "", base=None):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and bad types.

    Keys not given keep ``base``'s values: a section's own defaults are those of the field
    that holds it (``Config.eval``'s short periodic evaluation, not ``EvalConfig()``'s).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields_)
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        typ, path = hints[key], f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(typ, value or {}, path, _section_default(fields_[key], base))
        else:
            kwargs[key] = _coerce(value, typ, path, fields_[key].metadata.get("split", True))
    if base is not None:
        kept = copy.deepcopy({f.name: getattr(base, f.name) for f in fields_.values() if f.init and f.name not in kwargs})
        kwargs = {**kept, **kwargs}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without a default
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _section_default(f: dataclasses.Field, base):
    """The default value of a nested section: the enclosing default's, else the field's own."""
    if base is not None:
        return getattr(base, f.name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def parse_scalar(raw: str):
    """A command-line value read as YAML, except that 1e-5 (a string in YAML 1.1) is a float."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw  # e.g. "a: b" text: keep it as typed
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, (dict, list)) or value is None:
        return raw  # "[x]" or "null" typed on a command line is text, not structure
    return value


def resolve_key(cls, key: str) -> list[str]:
    """The field path a ``key`` names: ``train.lr``, or a bare ``lr`` when exactly one
    section has it. Unknown or ambiguous keys are errors naming them."""
    parts = key.split(".")
    path, typ = [], cls
    for i, part in enumerate(parts):
        hints = _hints(typ) if dataclasses.is_dataclass(typ) else {}
        if part in hints:
            path.append(part)
            typ = hints[part]
            continue
        if i == 0 and len(parts) == 1:  # a bare key: look in the sections
            found = [f"{sec}.{part}" for sec, t in hints.items() if dataclasses.is_dataclass(t) and part in _hints(t)]
            if len(found) == 1:
                return found[0].split(".")
            if len(found) > 1:
                raise ConfigError(f"key {key!r} is ambiguous: say {' or '.join(found)}")
        import difflib

        known = sorted(hints) if hints else []
        close = difflib.get_close_matches(part, known, n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join('.'.join(path + [c]) for c in close)}?)" if close else ""
        raise ConfigError(f"unknown key {key!r}{hint}" + (f"; known here: {', '.join(known)}" if known else ""))
    if dataclasses.is_dataclass(typ):
        raise ConfigError(f"{key!r} is a section; set one of its keys ({key}.KEY=VALUE)")
    return path


def apply_overrides(cls, data: dict, items) -> dict:
    """Set ``key=value`` items (values read as YAML) into the nested dict ``data``."""
    for item in items:
        key, eq, raw = str(item).partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value")
        node = data
        path = resolve_key(cls, key.strip())
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[path[-1]] = parse_scalar(raw)
    return data


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys")
    return data


def load(cls, path: str | Path | None = None, overrides=()):
    """A ``cls`` config from an optional YAML file plus ``key=value`` overrides; every key
    and type is checked before anything else happens."""
    data = read_yaml(path) if path else {}
    apply_overrides(cls, data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def load_config(path: str | Path | None, overrides=()) -> Config:
    """The training run's config (YAML sections model/data/train, plus overrides)."""
    return load(Config, path, overrides)


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


def save_config(cfg, path: str | Path) -> None:
    """The resolved config as YAML (atomically): what the run actually used."""
    from dftune.files import write_text

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_docs(cls) -> dict[str, str]:
    """``name: text`` lines of a dataclass docstring (continuation lines indented)."""
    docs, current = {}, None
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        head, sep, rest = stripped.partition(":")
        names = [n.strip() for n in head.split(",")]
        if sep and names and all(n in {f.name for f in dataclasses.fields(cls)} for n in names):
            for n in names:
                docs[n] = rest.strip()
            current = names
        elif current and stripped and line.startswith("        "):
            for n in current:
                docs[n] += " " + stripped
        else:
            current = None
    return docs


def describe(cls, prefix: str = "", base=None) -> str:
    """Every key with its default and meaning: the ``--show`` of each command. A nested
    section shows the defaults of the field that holds it (``base``), as ``from_dict`` uses."""
    hints, docs = _hints(cls), field_docs(cls)
    summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else cls.__name__
    out = [f"[{prefix.rstrip('.') or cls.__name__}] {summary}"]
    sections = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            sections.append((f.name, hints[f.name], _section_default(f, base)))
            continue
        if base is not None:
            default = getattr(base, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        line = f"  {prefix}{f.name} = {default!r}"
        if f.name in docs:
            line += f"\n      {docs[f.name]}"
        out.append(line)
    for name, sub, sub_base in sections:
        out.append("")
        out.append(describe(sub, f"{prefix}{name}.", sub_base))
    return "\n".join(out)
