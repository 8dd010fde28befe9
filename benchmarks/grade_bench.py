"""Answers graded per second: grade_batch (worker processes) against grading one by one
in-process, ours and math-verify's defaults used directly.

All golds of the paper's five benchmarks x 16 completions: the reference solution where
there is one, and perturbed versions (a wrong final box, a reformatted answer, no box, a
random box, no answer). Every completion is distinct (grade_batch grades identical items
once, which would flatter it). Ours and math-verify judge the same sub-sample one by one;
the script prints the rates, the ratios and how often the verdicts agree.

    python benchmarks/grade_bench.py --data-dir ../shared/data/benchmarks
    python benchmarks/grade_bench.py --copies 4      # a quicker, smaller run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from collections import Counter
from pathlib import Path

from dftune.eval.benchmarks import PAPER_FIVE, load_benchmark
from dftune.eval.grade import failure_counts, grade_batch, grade_one

ROOT = Path(__file__).resolve().parents[1]


def completions(problem, solution: str | None, copies: int, rng: random.Random) -> list[str]:
    gold = problem.golds[0]
    variants = [
        solution or f"So the answer is \\boxed{{{gold}}}.",
        f"Let me think step by step.\nTherefore the final answer is $\\boxed{{{gold}}}$.",
        f"... which gives \\boxed{{{gold}1}}.",  # wrong
        f"We conclude the answer is {gold}.",  # no box
        f"\\boxed{{{rng.randint(0, 999)}}}",
        "I am not sure.",
    ]
    return [variants[i % len(variants)] for i in range(copies)]


def tag(i: int) -> str:
    """A distinct trailing line of letters (no digits: nothing for the grader to read)."""
    s = ""
    while True:
        s, i = s + "abcdefghijklmnopqrstuvwxyz"[i % 26], i // 26
        if not i:
            return "\n" + s


def math_verify_default(completion: str, golds: list[str]) -> bool:
    from math_verify import parse, verify

    return bool(verify(parse(f"${golds[0]}$"), parse(completion)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "benchmarks"))
    ap.add_argument("--copies", type=int, default=16, help="completions per gold")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--serial-limit", type=int, default=2000, help="items graded one by one (extrapolated)")
    args = ap.parse_args()
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    rng = random.Random(0)
    items = []
    for name in PAPER_FIVE:
        path = Path(args.data_dir) / name / "test.jsonl"
        raw = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        for p, r in zip(load_benchmark(name, args.data_dir), raw):
            sol = r.get("solution") if isinstance(r.get("solution"), str) else None
            items += [(c, p.golds) for c in completions(p, sol, args.copies, rng)]
    items = [(c + tag(i), g) for i, (c, g) in enumerate(items)]
    rng.shuffle(items)
    assert len({(c, tuple(g)) for c, g in items}) == len(items)
    t = time.perf_counter()
    batch = grade_batch(items, workers=args.workers)
    t_batch = time.perf_counter() - t
    sub = items[: args.serial_limit]
    # math-verify first (grade_one enlarges math-verify's parse cache in this process), after
    # a warm-up on other items that fills the LaTeX parser's tables both then use
    single = [(c, g) for c, g in sub if len(g) == 1]  # math-verify alone has no multi-answer rule
    for c, g in items[-300:]:
        math_verify_default(c, g[:1])
    t = time.perf_counter()
    theirs = [math_verify_default(c, g) for c, g in single]
    t_theirs = time.perf_counter() - t
    t = time.perf_counter()
    serial = [grade_one(c, g) for c, g in sub]
    t_serial = time.perf_counter() - t
    ours_single = [v.correct for v, (_, g) in zip(serial, sub) if len(g) == 1]
    agree = sum(a.correct == b.correct for a, b in zip(batch, serial)) / len(sub)
    agree_mv = sum(a == b for a, b in zip(ours_single, theirs)) / len(single)
    rate_b, rate_s, rate_m = len(items) / t_batch, len(sub) / t_serial, len(single) / t_theirs
    print(f"# grading {len(items)} answers ({len(PAPER_FIVE)} benchmarks x {args.copies}), {os.cpu_count()} CPUs")
    print("| grader | answers/s |\n|---|---|")
    print(f"| dftune grade_batch ({args.workers} workers, start-up included) | {rate_b:.0f} |")
    print(f"| dftune grade_one, in-process, one by one ({len(sub)} items) | {rate_s:.0f} |")
    print(f"| math-verify parse + verify (defaults), in-process, one by one ({len(single)} items) | {rate_m:.0f} |")
    print(f"grade_batch / grade_one: {rate_b / rate_s:.2f}x; grade_one / math-verify: {rate_s / rate_m:.2f}x; "
          f"grade_batch / math-verify: {rate_b / rate_m:.2f}x")
    print(f"verdicts: batch and one-by-one agree on {agree:.1%}; dftune and math-verify on {agree_mv:.1%} of the "
          f"single-answer items; {sum(v.correct for v in batch) / len(batch):.1%} judged correct; statuses "
          f"{dict(Counter({k: v for k, v in failure_counts(batch).items() if v}))}")


if __name__ == "__main__":
    main()
