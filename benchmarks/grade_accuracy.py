"""Grader accuracy on math-verify's published test cases: ours (through grade_batch) against
math-verify used directly with its defaults, both scored against the expected verdicts.

The cases are the (gold, prediction, expected) rows of the parametrized tests in the
Math-Verify repository's tests/ folder, read at run time from a path you give (a checkout,
its tests/ folder, or a bare git mirror); nothing of it is stored in this project. Rows
whose test passes non-default comparison settings (strict=False, set-relation comparison,
another float precision) are left out: math-verify's defaults cannot be held to them.

    git clone https://github.com/huggingface/Math-Verify /tmp/Math-Verify
    python benchmarks/grade_accuracy.py --tests /tmp/Math-Verify
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from dftune.eval.grade import grade_batch

DEFAULTS = {"precision": 6, "strict": True, "allow_set_relation_comp": False}


def tests_folder(path: str) -> Path:
    """The tests/ folder of a checkout, the folder itself, or one extracted from a bare git mirror."""
    p = Path(path)
    for cand in (p / "tests", p):
        if any(cand.glob("test_*.py")):
            return cand
    if (p / "HEAD").is_file() and (p / "objects").is_dir():
        out = Path(tempfile.mkdtemp(prefix="math-verify-tests-"))
        archive = subprocess.run(["git", "--git-dir", str(p), "archive", "HEAD", "tests"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
        return out / "tests"
    raise SystemExit(f"{path}: no test_*.py files (give the Math-Verify checkout, its tests/ folder or a git mirror)")


def load_cases(folder: Path) -> tuple[list[tuple[str, str, str, bool]], int]:
    """(test, gold, prediction, expected) rows of every parametrize table with gold and pred
    columns, read as literals (nothing is executed); and how many were left out."""
    cases, left_out = [], 0
    for f in sorted(folder.glob("test_*.py")):
        for fn in ast.walk(ast.parse(f.read_text())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for dec in fn.decorator_list:
                if not (isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "parametrize"):
                    continue
                try:
                    names = [x.strip() for x in ast.literal_eval(dec.args[0]).split(",")]
                    rows = ast.literal_eval(dec.args[1])
                except (ValueError, SyntaxError, IndexError):
                    continue
                if not {"gold", "pred"} <= set(names):
                    continue
                for row in rows:
                    r = dict(zip(names, row))
                    if any(k in r and r[k] != v for k, v in DEFAULTS.items()):
                        left_out += 1
                        continue
                    cases.append((f"{f.stem}::{fn.name}", r["gold"], r["pred"], bool(r.get("expected", r.get("result")))))
    return cases, left_out


def math_verify_default(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    return bool(verify(parse(gold), parse(pred)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tests", required=True, help="Math-Verify checkout, its tests/ folder, or a bare git mirror")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--show", action="store_true", help="print every case where a grader disagrees with the table")
    args = ap.parse_args()
    cases, left_out = load_cases(tests_folder(args.tests))
    t = time.perf_counter()
    theirs = [math_verify_default(g, p) for _, g, p, _ in cases]
    t_theirs = time.perf_counter() - t
    t = time.perf_counter()
    ours = [v.correct for v in grade_batch([(p, [g]) for _, g, p, _ in cases], workers=args.workers)]
    t_ours = time.perf_counter() - t
    per = Counter()
    for (test, _, _, expected), a, b in zip(cases, theirs, ours):
        file = test.split("::")[0]
        per[file, "n"] += 1
        per[file, "theirs"] += a == expected
        per[file, "ours"] += b == expected
    files = sorted({f for f, _ in per})
    print(f"# {len(cases)} published cases ({left_out} left out: non-default comparison settings)\n")
    print("| test file | cases | math-verify defaults | dftune grade_batch |\n|---|---|---|---|")
    for f in files:
        print(f"| {f} | {per[f, 'n']} | {per[f, 'theirs']} | {per[f, 'ours']} |")
    tot_t, tot_o = sum(a == c[3] for a, c in zip(theirs, cases)), sum(b == c[3] for b, c in zip(ours, cases))
    print(f"| **all** | {len(cases)} | **{tot_t} ({tot_t / len(cases):.1%})** | **{tot_o} ({tot_o / len(cases):.1%})** |")
    print(f"\ntime: math-verify in-process {t_theirs:.1f} s; grade_batch ({args.workers} workers, start-up included) "
          f"{t_ours:.1f} s")
    if args.show:
        for (test, g, p, expected), a, b in zip(cases, theirs, ours):
            if a != expected or b != expected:
                print(f"\n{test}: expected {expected}, math-verify {a}, dftune {b}\n  gold: {g[:120]!r}\n  pred: {p[-160:]!r}")


if __name__ == "__main__":
    main()
