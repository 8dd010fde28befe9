"""Evaluation runs: sample, grade, and write per-sample results, a summary and a table.

    dftune eval --model runs/dft/final --benchmarks math500,aime24 --n 16 --backend vllm --out evals/dft

The per-sample file (``samples.jsonl``) is appended one chunk of problems at a time, each
chunk in a single write followed by fsync; a re-run with the same --out skips every
problem whose samples are all there, so an interrupted evaluation never regenerates
finished samples. Inputs cannot mix silently: a re-run must have the same model weights
(a folder retrained in place is refused), backend and engine options, prompt, stops,
sampling, grading settings and grader versions, the same content for every benchmark it
shares with the stored run, and every stored row's gold must be the current problem's.
Every setting is checked before a model is loaded or a file is written.

Each sample is graded twice: by math-verify (the default, strict) and by the DFT paper's
harness (``paper``); both verdicts are stored per sample (``verdicts``), and summary.json /
results.md give avg@n, maj@n and pass@k under both. ``grader`` names the primary one: its
verdict is also the sample's own ``correct`` (and ``extracted``, ``status``...), its
metrics the summary's top level, and ``dftune compare`` and the report use it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dftune.errors import UserError
from dftune.eval.benchmarks import PAPER_FIVE, load_benchmark, problems_hash
from dftune.eval.generate import (
    EngineConfig,
    SamplingConfig,
    is_repetitive,
    make_backend,
)
from dftune.eval.grade import PROTOCOLS, grade_batch
from dftune.eval.prompts import (
    PROMPTS,
    STOP_POLICIES,
    build_prompt,
    resolve_prompt,
    stop_description,
    stop_settings,
)
from dftune.eval.results import grader_versions, markdown_table, summarize_rows  # noqa: F401  (cli, tests)
from dftune.files import (
    append_jsonl,
    read_json,
    read_jsonl,
    repair_tail,
    write_json,
    write_text,
)
from dftune.settings import Problems

log = logging.getLogger("dftune.eval")


class EvalError(UserError, ValueError):
    """Settings or stored results that cannot be used (another evaluation in the folder, a
    changed benchmark file, a model retrained in place)."""


@dataclass
class EvalConfig:
    """What to evaluate and how (defaults: the paper's protocol)."""

    model: str = ""
    """model folder or Hub id."""
    out: str = ""
    """the results folder (samples.jsonl, summary.json, results.md); re-running with the same folder resumes, and
    refuses other settings."""
    benchmarks: list[str] = field(default_factory=lambda: list(PAPER_FIVE))
    """benchmark names: math500, minerva_math, olympiadbench, aime24, amc23, gsm8k, aime25, or NAME for a
    NAME/test.jsonl under data_dir."""
    backend: str = "vllm"
    """vllm (what real evaluations run) or hf (transformers, for CPU and small runs)."""
    prompt: str = "qwen-boxed"
    """qwen-boxed, llama-base-boxed, deepseek-math (the paper's prompts for Qwen, LLaMA and DeepSeekMath models, the
    exact text of its harness), chat (the model's own template with the same instruction), plain (the layout of
    data.chat_template=plain) or auto (the paper's prompt for the model's family; in training, the run's layout)."""
    grader: str = "math-verify"
    """the primary grader: math-verify (strict) or paper (the paper's harness: quote it beside the paper's numbers);
    both verdicts are stored for every sample."""
    data_dir: str = ""
    """folder with NAME/test.jsonl files; empty: $DFTUNE_DATA_DIR, else the Hub."""
    limit: int = 0
    """the first N problems of each benchmark; 0: all."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """how completions are sampled (n, temperature, top_p, max_new_tokens, seed, stop)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """backend options (tensor/data parallel size, max_model_len, memory, dtype, batch_size)."""
    stops: str = "end-of-turn"
    """where generation stops besides EOS: end-of-turn (the prompt's end-of-turn tokens, and the harness's stop
    strings for the base-model prompts), paper (exactly the paper's harness: its stop strings, and
    <|im_end|>/<|endoftext|> only when the model path contains "qwen2") or eos."""
    strip_think: bool = False
    """grade only what follows </think> (a reasoning model's final answer)."""
    chunk: int = 64
    """problems generated and graded between two appends to samples.jsonl."""
    grade_workers: int = 0
    """grader processes; 0: the CPU count."""
    grade_timeout: int = 5
    """the graders' time limit: per parse or comparison (math-verify), per sample (paper), in seconds."""
    warn_failures: float = 0.01
    """warn when more than this fraction of a benchmark's samples are grader failures (timeout, memory, parse error,
    crash)."""


# the settings a resumed evaluation must share with the stored one
CHECKED = ("graders", "grader", "model", "model_weights", "backend", "prompt", "sampling", "engine", "stops",
           "strip_think")
BACKENDS = ("vllm", "hf")


def check_eval_config(cfg: EvalConfig, problems=None, where: str = "") -> None:
    """The named choices no evaluation can do without (prompt style, stop policy, grader,
    backend): added to ``problems`` (a ``settings.Problems``, ``dftune.eval.validate``'s
    list) or, without one, raised as one error before anything is loaded or written."""
    p = Problems() if problems is None else problems
    p.one_of(f"{where}prompt", cfg.prompt, PROMPTS)
    p.one_of(f"{where}stops", cfg.stops, STOP_POLICIES)
    p.one_of(f"{where}grader", cfg.grader, PROTOCOLS)
    p.one_of(f"{where}backend", cfg.backend, BACKENDS)
    if problems is None:
        p.raise_all()


def read_samples(path) -> list[dict]:
    """Every complete row of a samples.jsonl (``dftune.files.read_jsonl``: a torn final
    line is skipped, never cut off; a bad line before the end is an error)."""
    return read_jsonl(path)


def model_fingerprint(model: str) -> str:
    """The identity of a model's weights: for a local folder, a hash of its weight files'
    names, sizes and modification times (and of a sharded checkpoint's index); a Hub id
    stands for itself."""
    folder = Path(model)
    if not folder.is_dir():
        return f"hub:{model}"
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".gguf", ".pt", ".pth") or f.name.endswith(".index.json"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            if f.name.endswith(".index.json"):
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _check_settings(out: Path, settings: dict) -> dict:
    """The stored settings merged with these; a difference that would mix results is an error."""
    path = out / "eval_config.json"
    old = read_json(path)
    if old is None or not read_samples(out / "samples.jsonl"):  # a start that sampled nothing binds nothing
        return settings
    for key in CHECKED:
        if old.get(key) != settings[key]:
            what = "the model's weights changed (retrained in place?)" if key == "model_weights" else \
                f"{key}: stored {old.get(key)!r}, now {settings[key]!r}"
            raise EvalError(f"{out} holds an evaluation with other settings ({what}; see {path}); use another --out")
    stored = old.get("benchmarks") if isinstance(old.get("benchmarks"), dict) else {}
    for b, h in settings["benchmarks"].items():
        if b in stored and stored[b] != h:
            raise EvalError(f"{out}: benchmark {b!r} has changed since its samples were stored (content hash "
                             f"{stored[b]} -> {h}); use another --out")
    return {**settings, "benchmarks": {**stored, **settings["benchmarks"]}}


def _stored_rows(path: Path, problems: dict) -> dict[tuple, dict[int, dict]]:
    """Stored rows by (benchmark, id) and sample; each row's gold checked against its problem."""
    done: dict[tuple, dict[int, dict]] = {}
    for i, r in enumerate(read_samples(path), 1):
        key = (r.get("benchmark"), r.get("id"))
        p = problems.get(key)
        if p is None:
            continue  # a problem no longer asked for (a smaller limit, another benchmark list)
        if r.get("gold") != p.golds:
            raise EvalError(f"{path}, row {i}: field 'gold' {r.get('gold')!r} of {key[0]}:{key[1]} differs from the "
                             f"benchmark's {p.golds!r}; the benchmark changed since it was sampled: use another --out")
        done.setdefault(key, {})[r["sample"]] = r
    return done


def _verdicts(texts: list[str], problems: list, cfg: EvalConfig) -> list[dict]:
    """Both graders' verdicts of each completion: [{"math-verify": {...}, "paper": {...}}, ...]."""
    items = [(t, p.golds, p.benchmark) for t, p in zip(texts, problems)]
    by = {g: grade_batch(items, protocol=g, workers=cfg.grade_workers, timeout=cfg.grade_timeout,
                         strip_think=cfg.strip_think) for g in PROTOCOLS}
    return [{g: by[g][i].to_dict() for g in PROTOCOLS} for i in range(len(items))]


def _generate(cfg: EvalConfig, todo, out_samples: Path, done: dict, backend, tokenizer, style: str,
              stops: tuple[list[int], list[str]], progress: bool) -> None:
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo) * cfg.sampling.n, desc="eval", unit="sample", dynamic_ncols=True)
    if backend is None:
        backend = make_backend(cfg.backend, cfg.model, cfg.engine, seed=cfg.sampling.seed)
    repair_tail(out_samples)  # we own the file: cut a torn line a crash left, before appending
    for s in range(0, len(todo), cfg.chunk):
        chunk = todo[s:s + cfg.chunk]
        prompts = [build_prompt(p.question, style, tokenizer) for p in chunk]
        keys = [f"{p.benchmark}:{p.id}" for p in chunk]
        outs = backend.generate(prompts, keys, cfg.sampling, stop_token_ids=stops[0], stop_strings=stops[1])
        verdicts = iter(_verdicts([c.text for cs in outs for c in cs], [p for p, cs in zip(chunk, outs) for _ in cs],
                                  cfg))
        rows = []
        for p, prompt, cs in zip(chunk, prompts, outs):
            for j, c in enumerate(cs):
                both = next(verdicts)
                rows.append({"benchmark": p.benchmark, "id": p.id, "sample": j, "prompt": prompt, "completion": c.text,
                             "gold": p.golds, **both[cfg.grader], "verdicts": both, "num_tokens": c.num_tokens,
                             "finish_reason": c.finish_reason, "repetitive": is_repetitive(c.text)})
        append_jsonl(out_samples, rows)
        for r in rows:
            done.setdefault((r["benchmark"], r["id"]), {})[r["sample"]] = r
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()


def _tokenizer(cfg: EvalConfig, backend):
    """The model's tokenizer, before any model loads (the prompt and stops need it)."""
    tok = getattr(backend, "tok", None)
    if tok is not None:
        return tok
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.model)
    except (OSError, ValueError) as e:
        raise EvalError(f"model {cfg.model!r}: its tokenizer cannot be loaded ({type(e).__name__}: {e})") from None


def evaluate(cfg: EvalConfig, out_dir: str | Path | None = None, backend=None, progress: bool = True) -> dict:
    """Run the evaluation into ``out_dir`` (default ``cfg.out``); return the summary (also
    written to summary.json there). Every setting is checked before the model loads or a
    file is written."""
    check_eval_config(cfg)
    if not cfg.model:
        raise EvalError("model is empty: give a model folder or Hub id")
    if not (out_dir or cfg.out):
        raise EvalError("out is empty: give the results folder")
    out = Path(out_dir or cfg.out)
    # every benchmark is loaded (and its fields checked) before the model is
    problems, hashes = {}, {}
    for b in cfg.benchmarks:
        full = load_benchmark(b, cfg.data_dir or None)
        hashes[b] = problems_hash(full)
        problems[b] = full[:cfg.limit] if cfg.limit else full
    tokenizer = _tokenizer(cfg, backend)
    style = resolve_prompt(cfg.prompt, tokenizer)
    stops = stop_settings(tokenizer, style, cfg.stops, cfg.model)
    settings = {"model": cfg.model, "model_weights": model_fingerprint(cfg.model), "backend": cfg.backend,
                "prompt": style, "sampling": asdict(cfg.sampling), "engine": asdict(cfg.engine),
                "stops": {"policy": cfg.stops, **stop_description(tokenizer, *stops)}, "strip_think": cfg.strip_think,
                "grader": cfg.grader, "graders": grader_versions(), "benchmarks": hashes}
    settings = _check_settings(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval_config.json", {**settings, "config": asdict(cfg)})
    samples_path = out / "samples.jsonl"
    by_key = {(p.benchmark, p.id): p for b in cfg.benchmarks for p in problems[b]}
    done = _stored_rows(samples_path, by_key)
    n = cfg.sampling.n
    todo = [p for b in cfg.benchmarks for p in problems[b] if len(done.get((b, p.id), {})) < n]
    if todo:
        _generate(cfg, todo, samples_path, done, backend, tokenizer, style, stops, progress)
    summary = summarize_rows(cfg, problems, done)
    summary["prompt"] = style
    for w in summary["warnings"]:
        log.warning(w)
    write_json(out / "summary.json", summary)
    write_text(out / "results.md", markdown_table(summary))
    return summary


def quick_eval(model, tokenizer, cfg: EvalConfig, runtime=None, synced: bool = False, chat_template: str = "",
               model_path: str = "") -> dict:
    """A short evaluation of a live model: {benchmark: avg@n, ...} by the primary grader,
    with the settings of an ``EvalConfig`` (benchmarks, data_dir, limit, prompt, sampling,
    stops, grading). chat_template: the run's ``data.chat_template`` (prompt auto follows
    the layout the run trains on); model_path: the run's model (the paper stop policy
    reads it).

    Used by training every ``train.eval_every`` steps for learning curves (its ``eval`` section).
    runtime (``dftune.dist.Runtime``, several processes): every process generates and grades
    its share of the batches (``HFBackend.generate``) and the counts are summed over processes,
    so no process waits while another evaluates alone; synced: the model is FSDP-sharded.
    """
    import torch

    from dftune.eval.generate import HFBackend

    rank, world = (runtime.rank, runtime.world) if runtime is not None else (0, 1)
    backend = HFBackend(model, tokenizer)
    style = resolve_prompt(cfg.prompt, tokenizer, chat_template)
    stop_ids, stop_strings = stop_settings(tokenizer, style, cfg.stops, model_path)
    # the processes of one machine share its cores: grader workers per process, not per machine
    workers = cfg.grade_workers or max(1, (os.cpu_count() or 1) // world)
    out = {}
    for b in cfg.benchmarks:
        problems = load_benchmark(b, cfg.data_dir or None, cfg.limit or None)
        outs = backend.generate([build_prompt(p.question, style, tokenizer) for p in problems],
                                [f"{b}:{p.id}" for p in problems], cfg.sampling, stop_token_ids=stop_ids,
                                stop_strings=stop_strings, rank=rank, world=world, synced=synced)
        verdicts = grade_batch([(c.text, p.golds, b) for p, cs in zip(problems, outs) if cs is not None for c in cs],
                               protocol=cfg.grader, workers=workers, timeout=cfg.grade_timeout,
                               strip_think=cfg.strip_think)
        counts = torch.tensor([sum(v.correct for v in verdicts), len(verdicts)], dtype=torch.float64,
                              device=next(model.parameters()).device)
        if world > 1:
            runtime.all_sum(counts)
        out[b] = float(counts[0] / counts[1].clamp_min(1))
    return out
