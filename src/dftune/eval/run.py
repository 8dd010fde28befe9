"""Evaluation runs: sample, grade, and write per-sample results, a summary and a table.

    dftune eval --model runs/dft/final --benchmarks math500,aime24 --n 16 --backend vllm --out evals/dft

The per-sample file (``samples.jsonl``) is appended one chunk of problems at a time,
each chunk in a single write followed by fsync; a re-run with the same --out skips every
problem whose samples are all there (a torn last line from a crash is ignored), so an
interrupted evaluation never regenerates finished samples.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dftune.eval.benchmarks import PAPER_FIVE, build_prompt, load_benchmark
from dftune.eval.generate import SamplingConfig, make_backend
from dftune.eval.grade import grade_batch
from dftune.eval.metrics import summarize


@dataclass
class EvalConfig:
    """What to evaluate and how (defaults: the paper's protocol)."""

    model: str = ""
    benchmarks: list[str] = field(default_factory=lambda: list(PAPER_FIVE))
    backend: str = "vllm"
    prompt: str = "qwen-boxed"
    data_dir: str | None = None
    limit: int | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    chunk: int = 64  # problems generated and graded between two appends to samples.jsonl
    grade_workers: int | None = None
    grade_timeout: int = 5
    engine: dict = field(default_factory=dict)  # backend options (tensor_parallel_size, batch_size, ...)


def read_samples(path: Path) -> list[dict]:
    """Complete lines of a samples.jsonl; a torn final line is dropped (and cut off)."""
    if not path.is_file():
        return []
    rows, good_bytes = [], 0
    with path.open("rb") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
                good_bytes += len(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
    if good_bytes != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good_bytes)
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with path.open("a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def evaluate(cfg: EvalConfig, out_dir: str | Path, backend=None, progress: bool = True) -> dict:
    """Run the evaluation; return the summary (also written to out_dir/summary.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # every benchmark is loaded (and its fields checked) before the model is
    problems = {b: load_benchmark(b, cfg.data_dir, cfg.limit) for b in cfg.benchmarks}
    settings = {k: v for k, v in asdict(cfg).items() if k != "engine"}
    settings_path = out / "eval_config.json"
    if settings_path.is_file():
        old = json.loads(settings_path.read_text())
        if {k: old.get(k) for k in ("model", "prompt", "sampling")} != {k: settings[k] for k in ("model", "prompt", "sampling")}:
            raise ValueError(f"{out} holds an evaluation with other settings (see {settings_path}); use another --out")
    _atomic_write(settings_path, json.dumps(settings, indent=1))
    samples_path = out / "samples.jsonl"
    done: dict[tuple, dict[int, dict]] = {}
    for r in read_samples(samples_path):
        done.setdefault((r["benchmark"], r["id"]), {})[r["sample"]] = r
    n = cfg.sampling.n
    todo = [p for b in cfg.benchmarks for p in problems[b] if len(done.get((b, p.id), {})) < n]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo) * n, desc="eval", unit="sample", dynamic_ncols=True)
    if todo:
        tokenizer = None
        if backend is None:
            backend = make_backend(cfg.backend, cfg.model, **cfg.engine)
        if cfg.prompt == "chat":
            tokenizer = getattr(backend, "tok", None)
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        for s in range(0, len(todo), cfg.chunk):
            chunk = todo[s:s + cfg.chunk]
            prompts = [build_prompt(p.question, cfg.prompt, tokenizer) for p in chunk]
            keys = [f"{p.benchmark}:{p.id}" for p in chunk]
            texts = backend.generate(prompts, keys, cfg.sampling)
            items = [(t, p.golds) for p, ts in zip(chunk, texts) for t in ts]
            verdicts = iter(grade_batch(items, workers=cfg.grade_workers, timeout=cfg.grade_timeout))
            rows = []
            for p, prompt, ts in zip(chunk, prompts, texts):
                for j, t in enumerate(ts):
                    v = next(verdicts)
                    rows.append({"benchmark": p.benchmark, "id": p.id, "sample": j, "prompt": prompt, "completion": t,
                                 "gold": p.golds, "extracted": v.extracted, "correct": v.correct, "reason": v.reason,
                                 "rule": v.rule})
            append_rows(samples_path, rows)
            for r in rows:
                done.setdefault((r["benchmark"], r["id"]), {})[r["sample"]] = r
            if bar is not None:
                bar.update(len(rows))
    if bar is not None:
        bar.close()
    summary = {"model": cfg.model, "prompt": cfg.prompt, "sampling": asdict(cfg.sampling), "benchmarks": {},
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for b in cfg.benchmarks:
        per = {p.id: [done[(b, p.id)][j]["correct"] for j in range(n)] for p in problems[b]}
        summary["benchmarks"][b] = summarize(per, ks=sorted({1, 4, 8, 16, n}))
    key = f"avg@{n}"
    vals = [m[key] for m in summary["benchmarks"].values() if key in m]
    summary["mean"] = {key: sum(vals) / len(vals) if vals else None}
    _atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    _atomic_write(out / "results.md", markdown_table(summary))
    return summary


def markdown_table(summary: dict) -> str:
    n = summary["sampling"]["n"]
    ks = sorted({k for k in (1, 4, 8, 16, n) if k <= n})
    head = ["benchmark", "problems", f"avg@{n}", "std"] + [f"pass@{k}" for k in ks] + ["first sample"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b, m in summary["benchmarks"].items():
        cells = [b, str(m["problems"]), f"{100 * m[f'avg@{n}']:.2f}", f"{100 * m['std']:.2f}"]
        cells += [f"{100 * m[f'pass@{k}']:.2f}" for k in ks] + [f"{100 * m['first_sample']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    mean = summary["mean"].get(f"avg@{n}")
    if mean is not None:
        lines.append("| **mean** | | " + f"**{100 * mean:.2f}** |" + " |" * (len(head) - 3))
    return "\n".join(lines) + "\n"


def quick_eval(model, tokenizer, *, benchmarks: list[str], limit: int = 32, n: int = 1, max_new_tokens: int = 512,
               data_dir: str | None = None, seed: int = 0, prompt: str = "qwen-boxed") -> dict:
    """A short evaluation of a live model (subset, few samples): {benchmark: avg@n, ...}.

    Used by training every ``train.eval_every`` steps for learning curves.
    """
    from dftune.eval.generate import HFBackend

    backend = HFBackend(model, tokenizer)
    out = {}
    for b in benchmarks:
        problems = load_benchmark(b, data_dir, limit)
        sc = SamplingConfig(n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
        texts = backend.generate([build_prompt(p.question, prompt, tokenizer) for p in problems],
                                 [f"{b}:{p.id}" for p in problems], sc)
        verdicts = grade_batch([(t, p.golds) for p, ts in zip(problems, texts) for t in ts])
        out[b] = sum(v.correct for v in verdicts) / max(len(verdicts), 1)
    return out
