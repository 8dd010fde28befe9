"""Evaluation runs: sample, grade, and write per-sample results, a summary and a table.

    dftune eval --model runs/dft/final --benchmarks math500,aime24 --n 16 --backend vllm --out evals/dft

The per-sample file (``samples.jsonl``) is appended one chunk of problems at a time, each
chunk in a single write followed by fsync; a re-run with the same --out skips every
problem whose samples are all there, so an interrupted evaluation never regenerates
finished samples. Inputs cannot mix silently: a re-run must have the same model weights
(a folder retrained in place is refused), backend and engine options, prompt, sampling,
grading settings and grader version, the same content for every benchmark it shares with
the stored run, and every stored row's gold must be the current problem's.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dftune.errors import UserError
from dftune.eval.benchmarks import (
    PAPER_FIVE,
    build_prompt,
    load_benchmark,
    problems_hash,
)
from dftune.eval.generate import (
    EngineConfig,
    SamplingConfig,
    end_of_turn_ids,
    is_repetitive,
    make_backend,
)
from dftune.eval.grade import (
    FAILURES,
    GRADER_VERSION,
    STATUSES,
    failure_counts,
    grade_batch,
)
from dftune.eval.metrics import bootstrap_means, generation_stats, interval, summarize
from dftune.eval.vote import majority_correct
from dftune.files import (
    append_jsonl,
    read_json,
    read_jsonl,
    repair_tail,
    write_json,
    write_text,
)

log = logging.getLogger("dftune.eval")


class EvalError(UserError, ValueError):
    """Settings or stored results that cannot be used (another evaluation in the folder, a
    changed benchmark file, a model retrained in place)."""


@dataclass
class EvalConfig:
    """What to evaluate and how (defaults: the paper's protocol).

    model: model folder or Hub id.
    out: the results folder (samples.jsonl, summary.json, results.md); re-running with the
        same folder resumes, and refuses other settings.
    benchmarks: benchmark names: math500, minerva_math, olympiadbench, aime24, amc23,
        gsm8k, aime25, or NAME for a NAME/test.jsonl under data_dir.
    backend: vllm (what real evaluations run) or hf (transformers, for CPU and small runs).
    prompt: qwen-boxed (the paper's Qwen chat prompt), chat (the model's own template with
        the same instruction) or plain (a completion prompt for base models).
    data_dir: folder with NAME/test.jsonl files; empty: $DFTUNE_DATA_DIR, else the Hub.
    limit: the first N problems of each benchmark; 0: all.
    sampling: how completions are sampled (n, temperature, top_p, max_new_tokens, seed, stop).
    engine: backend options (tensor/data parallel size, max_model_len, memory, dtype, batch_size).
    stop_at_end_of_turn: for chat-format prompts (qwen-boxed, chat), also stop at the chat
        template's end-of-turn token(s), as Qwen's evaluation does.
    strip_think: grade only what follows </think> (a reasoning model's final answer).
    chunk: problems generated and graded between two appends to samples.jsonl.
    grade_workers: grader processes; 0: the CPU count.
    grade_timeout: math-verify's time limit per parse or comparison, in seconds.
    warn_failures: warn when more than this fraction of a benchmark's samples are grader
        failures (timeout, memory, parse error, crash).
    """

    model: str = ""
    out: str = ""
    benchmarks: list[str] = field(default_factory=lambda: list(PAPER_FIVE))
    backend: str = "vllm"
    prompt: str = "qwen-boxed"
    data_dir: str = ""
    limit: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    stop_at_end_of_turn: bool = True
    strip_think: bool = False
    chunk: int = 64
    grade_workers: int = 0
    grade_timeout: int = 5
    warn_failures: float = 0.01


# the settings a resumed evaluation must share with the stored one
CHECKED = ("grader", "model", "model_weights", "backend", "prompt", "sampling", "engine", "stop_at_end_of_turn",
           "strip_think")


def read_samples(path) -> list[dict]:
    """Every complete row of a samples.jsonl (``dftune.files.read_jsonl``: a torn final
    line is skipped, never cut off; a bad line before the end is an error)."""
    return read_jsonl(path)


def append_rows(path, rows: list[dict]) -> None:
    """Append rows as the file's one writer: a torn final line left by a crash is cut first."""
    repair_tail(path)
    append_jsonl(path, rows)


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
    if old is None:
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


def _generate(cfg: EvalConfig, todo, out_samples: Path, done: dict, backend, progress: bool) -> None:
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo) * cfg.sampling.n, desc="eval", unit="sample", dynamic_ncols=True)
    if backend is None:
        backend = make_backend(cfg.backend, cfg.model, cfg.engine, seed=cfg.sampling.seed)
    tokenizer = getattr(backend, "tok", None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    stops = end_of_turn_ids(tokenizer, cfg.prompt) if cfg.stop_at_end_of_turn else []
    repair_tail(out_samples)  # we own the file: cut a torn line a crash left, before appending
    for s in range(0, len(todo), cfg.chunk):
        chunk = todo[s:s + cfg.chunk]
        prompts = [build_prompt(p.question, cfg.prompt, tokenizer) for p in chunk]
        keys = [f"{p.benchmark}:{p.id}" for p in chunk]
        outs = backend.generate(prompts, keys, cfg.sampling, stop_token_ids=stops)
        items = [(c.text, p.golds) for p, cs in zip(chunk, outs) for c in cs]
        verdicts = iter(grade_batch(items, workers=cfg.grade_workers, timeout=cfg.grade_timeout,
                                    strip_think=cfg.strip_think))
        rows = []
        for p, prompt, cs in zip(chunk, prompts, outs):
            for j, c in enumerate(cs):
                v = next(verdicts)
                rows.append({"benchmark": p.benchmark, "id": p.id, "sample": j, "prompt": prompt, "completion": c.text,
                             "gold": p.golds, "extracted": v.extracted, "correct": v.correct, "status": v.status,
                             "reason": v.reason, "rule": v.rule, "num_tokens": c.num_tokens,
                             "finish_reason": c.finish_reason, "repetitive": is_repetitive(c.text)})
        append_jsonl(out_samples, rows)
        for r in rows:
            done.setdefault((r["benchmark"], r["id"]), {})[r["sample"]] = r
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()


def evaluate(cfg: EvalConfig, out_dir: str | Path | None = None, backend=None, progress: bool = True) -> dict:
    """Run the evaluation into ``out_dir`` (default ``cfg.out``); return the summary (also
    written to summary.json there)."""
    if not cfg.model:
        raise EvalError("model is empty: give a model folder or Hub id")
    if not (out_dir or cfg.out):
        raise EvalError("out is empty: give the results folder")
    out = Path(out_dir or cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # every benchmark is loaded (and its fields checked) before the model is
    problems, hashes = {}, {}
    for b in cfg.benchmarks:
        full = load_benchmark(b, cfg.data_dir or None)
        hashes[b] = problems_hash(full)
        problems[b] = full[:cfg.limit] if cfg.limit else full
    settings = {"model": cfg.model, "model_weights": model_fingerprint(cfg.model), "backend": cfg.backend,
                "prompt": cfg.prompt, "sampling": asdict(cfg.sampling), "engine": asdict(cfg.engine),
                "stop_at_end_of_turn": cfg.stop_at_end_of_turn, "strip_think": cfg.strip_think,
                "grader": GRADER_VERSION, "benchmarks": hashes}
    settings = _check_settings(out, settings)
    write_json(out / "eval_config.json", {**settings, "config": asdict(cfg)})
    samples_path = out / "samples.jsonl"
    by_key = {(p.benchmark, p.id): p for b in cfg.benchmarks for p in problems[b]}
    done = _stored_rows(samples_path, by_key)
    n = cfg.sampling.n
    todo = [p for b in cfg.benchmarks for p in problems[b] if len(done.get((b, p.id), {})) < n]
    if todo:
        _generate(cfg, todo, samples_path, done, backend, progress)
    summary = summarize_rows(cfg, problems, done)
    for w in summary["warnings"]:
        log.warning(w)
    write_json(out / "summary.json", summary)
    write_text(out / "results.md", markdown_table(summary))
    return summary


def summarize_rows(cfg: EvalConfig, problems: dict, done: dict) -> dict:
    """summary.json: per benchmark the metrics, generation statistics and grader verdict
    counts; their means over benchmarks; warnings."""
    n = cfg.sampling.n
    primary = f"avg@{n}"
    summary = {"model": cfg.model, "prompt": cfg.prompt, "backend": cfg.backend, "sampling": asdict(cfg.sampling),
               "n": n, "primary": primary, "grader": GRADER_VERSION, "benchmarks": {}, "mean": {}, "warnings": [],
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    per_problem = []
    for b in cfg.benchmarks:
        rows = {p.id: [done[(b, p.id)][j] for j in range(n)] for p in problems[b]}
        majority = majority_correct(rows, workers=cfg.grade_workers, timeout=cfg.grade_timeout)
        m = summarize({i: [r["correct"] for r in rs] for i, rs in rows.items()}, ks=sorted({1, 4, 8, 16, n}),
                      majority=majority)
        flat = [r for rs in rows.values() for r in rs]
        m.update(generation_stats(flat))
        counts = failure_counts(r.get("status", "ok") for r in flat)
        failed = sum(counts[f] for f in FAILURES)
        m["grader"] = {**counts, "failures": failed, "failure_rate": failed / max(len(flat), 1)}
        if m["grader"]["failure_rate"] > cfg.warn_failures:
            summary["warnings"].append(
                f"{b}: the grader failed on {failed} of {len(flat)} samples ("
                + ", ".join(f"{counts[f]} {f}" for f in FAILURES if counts[f]) + "); those count as incorrect")
        summary["benchmarks"][b] = m
        per_problem.append([sum(r["correct"] for r in rs) / n for rs in rows.values()])
    means = [m[primary] for m in summary["benchmarks"].values() if primary in m]
    if means:
        summary["mean"] = {primary: sum(means) / len(means),
                           "ci95": interval(bootstrap_means([p for p in per_problem if p])),
                           f"maj@{n}": sum(m[f"maj@{n}"] for m in summary["benchmarks"].values()) / len(means)}
    return summary


def _pct(x) -> str:
    return f"{100 * x:.2f}"


def markdown_table(summary: dict) -> str:
    """results.md: one row per benchmark and the mean; then warnings and grader verdicts."""
    n = summary["sampling"]["n"]
    ks = sorted({k for k in (1, 4, 8, 16, n) if k <= n})
    head = (["benchmark", "problems", f"avg@{n}", "95% CI", "std"] + [f"pass@{k}" for k in ks]
            + [f"maj@{n}", "first sample", "mean tokens", "truncated", "repetitive", "grader failures"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b, m in summary["benchmarks"].items():
        if f"avg@{n}" not in m:  # a benchmark with no problems
            continue
        ci = m.get("ci95", [0.0, 0.0])
        g = m.get("grader", {})
        cells = [b, str(m["problems"]), _pct(m[f"avg@{n}"]), f"{_pct(ci[0])}-{_pct(ci[1])}", _pct(m["std"])]
        cells += [_pct(m[f"pass@{k}"]) for k in ks]
        cells += [_pct(m.get(f"maj@{n}", 0.0)), _pct(m["first_sample"]), f"{m.get('mean_tokens', 0):.0f}",
                  _pct(m.get("truncated", 0.0)), _pct(m.get("repetitive", 0.0)), str(g.get("failures", 0))]
        lines.append("| " + " | ".join(cells) + " |")
    mean = summary.get("mean", {})
    if f"avg@{n}" in mean:
        ci = mean["ci95"]
        cells = ["**mean**", "", f"**{_pct(mean[f'avg@{n}'])}**", f"{_pct(ci[0])}-{_pct(ci[1])}"]
        cells += [""] * (1 + len(ks)) + [_pct(mean[f"maj@{n}"])] + [""] * 5
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    text += (f"\nAccuracy in %. avg@{n}: mean over the {n} samples of every problem (the paper's number); 95% CI: "
             "bootstrap over problems; std: spread of the per-sample-index accuracies; truncated: samples that hit "
             "the token budget; repetitive: samples stuck in a loop.\n")
    if summary.get("warnings"):
        text += "\n**Warnings**\n\n" + "".join(f"- {w}\n" for w in summary["warnings"])
    text += "\nGrader verdicts per benchmark:\n\n| benchmark | " + " | ".join(s.replace("_", " ") for s in STATUSES)
    text += " |\n|" + "---|" * (len(STATUSES) + 1) + "\n"
    for b, m in summary["benchmarks"].items():
        text += f"| {b} | " + " | ".join(str(m.get("grader", {}).get(s, 0)) for s in STATUSES) + " |\n"
    return text


def check_periodic_eval(cfg: EvalConfig) -> None:
    """Refuse ``eval`` settings that periodic evaluation inside training cannot honour, before
    any training: it evaluates the live model, in the training process, with transformers."""
    from dftune.settings import ConfigError

    if cfg.model or cfg.out:
        raise ConfigError("eval.model / eval.out: periodic evaluation scores the model being trained and writes "
                          "eval_curve.jsonl in the run folder; leave them empty (dftune eval evaluates a saved model)")
    if cfg.backend != "hf":
        raise ConfigError(f"eval.backend={cfg.backend}: periodic evaluation generates with the live model in the "
                          "training process (hf); evaluate checkpoints with vLLM by dftune eval")
    if not cfg.benchmarks:
        raise ConfigError("eval.benchmarks: name at least one benchmark for the periodic evaluation")


def quick_eval(model, tokenizer, cfg: EvalConfig) -> dict:
    """A short evaluation of a live model: {benchmark: avg@n, ...}, with the settings of an
    ``EvalConfig`` (benchmarks, data_dir, limit, prompt, sampling, stop tokens, grading).

    Used by training every ``train.eval_every`` steps for learning curves (its ``eval`` section).
    """
    from dftune.eval.generate import HFBackend

    backend = HFBackend(model, tokenizer)
    stops = end_of_turn_ids(tokenizer, cfg.prompt) if cfg.stop_at_end_of_turn else []
    out = {}
    for b in cfg.benchmarks:
        problems = load_benchmark(b, cfg.data_dir or None, cfg.limit or None)
        outs = backend.generate([build_prompt(p.question, cfg.prompt, tokenizer) for p in problems],
                                [f"{b}:{p.id}" for p in problems], cfg.sampling, stop_token_ids=stops)
        verdicts = grade_batch([(c.text, p.golds) for p, cs in zip(problems, outs) for c in cs],
                               workers=cfg.grade_workers, timeout=cfg.grade_timeout, strip_think=cfg.strip_think)
        out[b] = sum(v.correct for v in verdicts) / max(len(verdicts), 1)
    return out
