"""Peak memory and seconds to build the paper's training set shape, before and after.

Synthetic rows with NuminaMath-CoT's shape (``problem`` / ``solution``; prompt and response
lengths drawn log-normally around NuminaMath's, a long tail past 2,048 tokens), cut from
real MATH text and tokenised by a BPE tokenizer trained on it. Each measurement runs in a
fresh process: "before" is the code of BEFORE_REF (examples as lists of Python ints),
exported from git into a temporary folder; "after" is this checkout, without the cache
(one process, and the automatic worker count), then with the cache (written, then hit).
Memory: the peak of the summed proportional set size (PSS) of the process and its workers,
sampled every 20 ms, minus what the process held before building (imports, tokenizer).
Prints the ratios, in one run.

    python benchmarks/data_bench.py                   # 20,000 rows (a few minutes)
    python benchmarks/data_bench.py --rows 100000     # the paper's 100K rows
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT.parent / "shared" / "data" / "train" / "math_train.jsonl"
BEFORE_REF = "7d6a22a"  # the last commit that held examples as lists of Python ints
# NuminaMath-CoT, Qwen2.5 tokenizer, approximate: problem median ~70 tokens, solution median
# ~380 (mean ~470), about 1% of rows past 2,048 tokens
PROMPT_MEDIAN, PROMPT_SIGMA = 70, 0.6
SOLUTION_MEDIAN, SOLUTION_SIGMA = 380, 0.7


def make_data(args, work: Path) -> tuple[Path, Path]:
    """The tokenizer folder and the synthetic JSONL (made once per size and seed)."""
    from dftune.tiny import build_tokenizer

    tok_dir, data = work / "tokenizer", work / f"numina_like_{args.rows}_{args.seed}.jsonl"
    texts = [v for line in MATH.read_text().splitlines() for v in json.loads(line).values() if isinstance(v, str)]
    if not (tok_dir / "tokenizer.json").is_file():
        build_tokenizer(texts, vocab_size=8000).save_pretrained(tok_dir)
    if data.is_file():
        return tok_dir, data
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    stream = [t for ids in tok(texts[:6000], add_special_tokens=False)["input_ids"] for t in ids]
    rng = random.Random(args.seed)

    def piece(median, sigma, lo, hi):
        n = min(hi, max(lo, int(rng.lognormvariate(0, sigma) * median)))
        a = rng.randrange(len(stream) - n)
        return stream[a:a + n]

    tmp = data.with_suffix(".tmp")
    with tmp.open("w") as f:
        for s in range(0, args.rows, 5000):
            n = min(5000, args.rows - s)
            probs = tok.batch_decode([piece(PROMPT_MEDIAN, PROMPT_SIGMA, 8, 1500) for _ in range(n)])
            sols = tok.batch_decode([piece(SOLUTION_MEDIAN, SOLUTION_SIGMA, 16, 5000) for _ in range(n)])
            f.write("".join(json.dumps({"source": "synthetic", "problem": p, "solution": q}) + "\n"
                            for p, q in zip(probs, sols)))
    tmp.rename(data)
    return tok_dir, data


class PeakMemory:
    """Peak memory of this process plus its workers, sampled every 20 ms: the sum of their
    proportional set sizes (PSS: a page shared by k processes counts 1/k in each), so forked
    workers' shared pages are counted once."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        total = 0
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                total += p.memory_full_info().pss
            except Exception:  # noqa: BLE001  (a worker that just exited)
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def measure(args) -> dict:
    """One build in this process (the code on PYTHONPATH: before or after)."""
    import dataclasses

    from transformers import AutoTokenizer

    from dftune.config import DataConfig
    from dftune.data import build_dataset

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    kw = dict(path=args.data, max_length=2048, format="problem_solution")
    kw.update(cache=args.mode.startswith("cache"), workers=int(args.workers), cache_dir=args.cache_dir)
    cfg = DataConfig(**{k: v for k, v in kw.items() if k in fields})
    with PeakMemory() as mem:
        base = mem.now()
        t0 = time.perf_counter()
        exs, summary = build_dataset(cfg, tok)
        seconds = time.perf_counter() - t0
        held = mem.now() - base
    peak = max(mem.peak, base + held)
    tokens = int(exs.offsets[-1]) if hasattr(exs, "offsets") else sum(len(e.input_ids) for e in exs)
    return {"seconds": seconds, "peak_mib": (peak - base) / 2**20, "held_mib": held / 2**20, "base_mib": base / 2**20,
            "examples": len(exs), "tokens": tokens, "summary": str(summary).split("; cache")[0]}


def export_before(ref: str, folder: Path) -> Path:
    src = folder / "before"
    src.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    return src / "src"


def run(mode: str, src: Path, args, tok_dir: Path, data: Path, cache_dir: Path, workers: int = 1) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--measure", mode, "--tokenizer", str(tok_dir), "--data", str(data),
           "--cache-dir", str(cache_dir), "--workers", str(workers)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--before-ref", default=BEFORE_REF, help="the git commit measured as 'before'")
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "data_bench")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--workers", default="1", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        args.mode = args.measure
        print(json.dumps(measure(args)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    tok_dir, data = make_data(args, args.work)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before_src, after_src, cache = export_before(args.before_ref, tmp), ROOT / "src", tmp / "cache"
        res = {
            f"before ({args.before_ref}: lists of ints)": run("before", before_src, args, tok_dir, data, cache),
            "after, no cache, 1 process": run("plain", after_src, args, tok_dir, data, cache),
            "after, no cache, automatic workers": run("plain", after_src, args, tok_dir, data, cache, workers=0),
            "after, cache written (miss)": run("cache-miss", after_src, args, tok_dir, data, cache),
            "after, cache hit": run("cache-hit", after_src, args, tok_dir, data, cache),
        }
    first = next(iter(res.values()))
    print(f"# Building {args.rows:,} NuminaMath-shaped rows ({first['examples']:,} kept, {first['tokens']:,} tokens), "
          f"max_length 2048; {os.cpu_count()} CPUs; {first['summary']}")
    print("| build | seconds | peak memory (MiB) | held after (MiB) | time vs before | peak vs before |")
    print("|---|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | {r['held_mib']:.0f} | "
              f"{r['seconds'] / first['seconds']:.2f}x | {r['peak_mib'] / first['peak_mib']:.3f}x |")
    keys = [k for k in res if k.startswith("after")]
    same = {(res[k]["examples"], res[k]["tokens"]) for k in res}
    print(f"same examples and tokens everywhere: {len(same) == 1}; peak memory after/before: "
          + ", ".join(f"{res[k]['peak_mib'] / first['peak_mib']:.3f}x" for k in keys[:2]))


if __name__ == "__main__":
    main()
