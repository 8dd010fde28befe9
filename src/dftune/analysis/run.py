"""The analysis commands: the pre-flight probe and the token-probability comparison.

    dftune probe model=Qwen/Qwen2.5-Math-1.5B data=AI-MO/NuminaMath-CoT limit=300
    dftune analyze models=base=out/tiny-base,dft=runs/tiny-dft/final data=D out=analysis/tiny

Both read a sample of training-format data exactly as training would (chat template,
response tokens only) and write JSON that `dftune report` reads; the schemas belong to
``dftune.analysis.tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dftune.settings import ConfigError


@dataclass
class SampleDataConfig:
    """The data sample the statistics are computed on (response tokens, as in training)."""

    data: str = ""
    """a training-format data file (jsonl/json/parquet/folder) or a Hub dataset id."""
    limit: int = 256
    """the first N rows."""
    max_length: int = 1024
    """tokens per example (longer responses are cut)."""
    format: str = "auto"
    """auto, messages, prompt_completion, problem_solution or question_answer."""
    chat_template: str = "auto"
    """auto (the tokenizer's), plain, or a .jinja file."""
    instruction_suffix: str = ""
    """text appended to every prompt (as in training)."""
    batch_size: int = 8
    """sequences per forward pass."""


@dataclass
class ProbeConfig:
    """Settings of `dftune probe` (how strong is the model's prior on this data?)."""

    model: str = ""
    """the base model: a local folder or a Hub id."""
    out: str = ""
    """also write the result as JSON here (the report reads it); empty: print only."""
    sample: SampleDataConfig = field(default_factory=SampleDataConfig)
    """the data sample (sample.data, sample.limit, ...; bare keys work: data=..., limit=...)."""


@dataclass
class AnalyzeConfig:
    """Settings of `dftune analyze` (token probabilities of several models on one sample)."""

    models: list[str] = field(default_factory=list)
    """name=path pairs (a,b,... ; a bare path is named by its folder); the first is the base unless `base` says
    otherwise."""
    base: str = ""
    """the name of the reference model (shifts, risers/fallers and KL are against it)."""
    out: str = ""
    """the output folder (token_probs.json)."""
    sample: SampleDataConfig = field(default_factory=SampleDataConfig)
    """the data sample (sample.data, sample.limit, ...; bare keys work: data=..., limit=...)."""


def check_sample(s: SampleDataConfig, p) -> None:
    from dftune.paths import data_problem

    p.add(data_problem("sample.data", s.data))
    p.at_least("sample.limit", s.limit, 1)
    p.at_least("sample.max_length", s.max_length, 2)
    p.at_least("sample.batch_size", s.batch_size, 1)


def validate_probe(cfg: ProbeConfig) -> None:
    """`dftune probe`'s settings, every problem raised together before anything loads."""
    from dftune.paths import model_problem
    from dftune.settings import Problems

    p = Problems()
    p.add(model_problem("model", cfg.model))
    check_sample(cfg.sample, p)
    p.raise_all()


def validate_analyze(cfg: AnalyzeConfig) -> None:
    """`dftune analyze`'s settings, every problem raised together before anything loads."""
    from dftune.paths import model_problem
    from dftune.settings import Problems

    p = Problems()
    try:
        models = parse_models(cfg.models)
    except ConfigError as e:
        p.append(str(e))
        models = {}
    for name, path in models.items():
        p.add(model_problem(f"models ({name})", path))
    if models:
        p.check(not cfg.base or cfg.base in models, f"base: {cfg.base!r} is not one of models ({', '.join(models)})")
    p.nonempty("out", cfg.out, "the output folder")
    check_sample(cfg.sample, p)
    p.raise_all()


def sample_examples(tokenizer, s: SampleDataConfig):
    """The sample as training examples (rows that cannot be used are skipped and counted)."""
    from dftune.config import DataConfig
    from dftune.data import build_dataset

    if not s.data:
        raise ConfigError("data is empty: give a training-format data file or a Hub dataset id")
    exs, _ = build_dataset(DataConfig(path=s.data, select=f"first:{s.limit}", max_length=s.max_length, format=s.format,
                                      chat_template=s.chat_template, instruction_suffix=s.instruction_suffix,
                                      on_bad_row="skip"), tokenizer)
    return exs


def run_probe(cfg: ProbeConfig) -> dict:
    """Statistics of the model on the sample and the recommended objective."""
    import torch

    from dftune.analysis.tokens import probe
    from dftune.files import write_json
    from dftune.model import load_pretrained, load_tokenizer
    from dftune.precision import inference_dtype

    validate_probe(cfg)
    tok = load_tokenizer(cfg.model)
    exs = sample_examples(tok, cfg.sample)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(cfg.model, dtype=inference_dtype(device), device=device).eval()
    result = probe(model, exs, tok, model_name=cfg.model, data=cfg.sample.data, batch_size=cfg.sample.batch_size)
    if cfg.out:
        write_json(Path(cfg.out), result)
    return result


def parse_models(items: list[str]) -> dict[str, str]:
    """["base=path", "path2"] -> {"base": "path", "path2's folder name": "path2"}."""
    out = {}
    for item in items:
        name, eq, path = item.partition("=")
        name, path = (name, path) if eq else (Path(item).name, item)
        if name in out:
            raise ConfigError(f"models: the name {name!r} is given twice; name them: a=PATH,b=PATH")
        out[name] = path
    if not out:
        raise ConfigError("models is empty: give name=path pairs, e.g. base=out/base,dft=runs/dft/final")
    return out


def run_analyze(cfg: AnalyzeConfig, progress: bool = True) -> dict:
    """Token statistics of every model on the sample, compared against the base."""
    import torch

    from dftune.analysis.tokens import analyze, token_stats
    from dftune.files import write_json
    from dftune.model import load_pretrained, load_tokenizer
    from dftune.precision import inference_dtype

    validate_analyze(cfg)
    models = parse_models(cfg.models)
    base = cfg.base or next(iter(models))
    tok = load_tokenizer(models[base])
    exs = sample_examples(tok, cfg.sample)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = inference_dtype(device)
    base_model = load_pretrained(models[base], dtype=dtype, device=device).eval()
    vocab = base_model.get_output_embeddings().weight.shape[0]
    stats = {}
    for name, path in models.items():
        model = base_model if name == base else load_pretrained(path, dtype=dtype, device=device).eval()
        if model.get_output_embeddings().weight.shape[0] != vocab:
            raise ConfigError(f"{path}: its vocabulary differs from the base model's; token statistics need one tokenizer")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(exs), desc=f"analyze {name}", unit="ex", disable=None)
        stats[name] = token_stats(model, exs, tok.pad_token_id, base=None if name == base else base_model,
                                  batch_size=cfg.sample.batch_size, progress=bar.update if bar else None)
        if bar:
            bar.close()
    from dftune.vocab import end_of_turn_ids, token_classes

    classes = token_classes(tok, vocab_size=max(vocab, len(tok))).numpy()
    result = analyze(stats, lambda t: tok.decode([t]), base=base, classes=classes, eot_ids=end_of_turn_ids(tok))
    result["data"], result["examples"] = cfg.sample.data, len(exs)
    write_json(Path(cfg.out) / "token_probs.json", result)
    return result
