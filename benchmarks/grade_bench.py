"""Answers graded per second: grade_batch (worker processes) vs one by one in-process.

All golds of the paper's five benchmarks x 16 completions: the reference solution where
there is one, and perturbed versions (a wrong final box, a reformatted answer, no box).
Both graders judge the same items; the script checks they agree and prints the ratio.

    python benchmarks/grade_bench.py --data-dir ../shared/data/benchmarks
    python benchmarks/grade_bench.py --copies 4      # a quicker, smaller run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from dftune.eval.benchmarks import PAPER_FIVE, load_benchmark
from dftune.eval.grade import grade_batch, grade_one

ROOT = Path(__file__).resolve().parents[1]


def completions(problem, solution: str | None, copies: int, rng: random.Random) -> list[str]:
    gold = problem.golds[0]
    variants = [
        solution or f"So the answer is \\boxed{{{gold}}}.",
        f"Let me think step by step.\nTherefore the final answer is $\\boxed{{{gold}}}$.",
        f"... which gives \\boxed{{{gold}1}}.",  # wrong
        f"We conclude the answer is {gold}.",  # no box: the "answer is" rule
        f"\\boxed{{{rng.randint(0, 999)}}}",
        "I am not sure.",
    ]
    return [variants[i % len(variants)] for i in range(copies)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "benchmarks"))
    ap.add_argument("--copies", type=int, default=16, help="completions per gold")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--serial-limit", type=int, default=2000, help="items graded one by one (extrapolated)")
    args = ap.parse_args()
    rng = random.Random(0)
    items = []
    for name in PAPER_FIVE:
        path = Path(args.data_dir) / name / "test.jsonl"
        raw = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        for p, r in zip(load_benchmark(name, args.data_dir), raw):
            sol = r.get("solution") if isinstance(r.get("solution"), str) else None
            items += [(c, p.golds) for c in completions(p, sol, args.copies, rng)]
    rng.shuffle(items)
    t = time.perf_counter()
    batch = grade_batch(items, workers=args.workers)
    t_batch = time.perf_counter() - t
    sub = items[: args.serial_limit]
    t = time.perf_counter()
    serial = [grade_one(c, g) for c, g in sub]
    t_serial = time.perf_counter() - t
    agree = sum(a.correct == b.correct for a, b in zip(batch, serial)) / len(sub)
    rate_b, rate_s = len(items) / t_batch, len(sub) / t_serial
    print(f"# grading {len(items)} answers ({len(PAPER_FIVE)} benchmarks x {args.copies}), {os.cpu_count()} CPUs")
    print(f"| grader | answers/s |\n|---|---|\n| grade_batch ({args.workers} workers, incl. start-up) | {rate_b:.0f} |")
    print(f"| grade_one, in-process, one by one ({len(sub)} items) | {rate_s:.0f} |")
    print(f"ratio: {rate_b / rate_s:.2f}x; verdicts agree on {agree:.1%} of the serially graded items; "
          f"{sum(v.correct for v in batch) / len(batch):.1%} judged correct")


if __name__ == "__main__":
    main()
