"""Two evaluations of the same benchmarks, compared problem by problem.

    dftune compare evals/sft evals/dft --out evals/dft-vs-sft     # DFT - SFT: the reference first

Every paired difference dftune shows is "other - reference" with the reference named first
(here, and in the report: its baseline objective, its first evaluation folder). In the
schema below B is the reference: ``compare(a, b)`` is A - B, and the command line's
``compare REFERENCE OTHER`` is ``compare(OTHER, REFERENCE)``.

For each benchmark: each problem's accuracy over its n samples in A and in B, and the
mean difference A - B with a paired bootstrap over problems (95% interval and a two-sided
p-value) and a sign test over the problems where A and B differ. The mean over benchmarks
(the paper's headline number) gets the same paired bootstrap, each benchmark resampled
over its own problems. Both evaluations must cover the same problems with the same n, and
be alike: the same sampling settings (n, temperature, top_p, max_new_tokens, stop strings),
prompt, stops, primary grader and grader versions, think stripping, and benchmark content
(``LIKE_KEYS``); any difference stops the comparison with the differing keys named, unless
``force``, which compares anyway and records them (``differences``). The sampling seed
is not compared (two seeds are two draws of the same protocol). Both sides are scored by
the reference's primary grader (``grader``).

``compare`` returns a plain dict (the schema below, also written as compare.json) that the
HTML report renders; ``compare_markdown`` is the table (compare.md):

    {"a": {"path", "model"}, "b": {"path", "model"}, "metric": "avg@16", "n": 16,
     "grader": "math-verify", "reps": 10000, "seed": 0, "forced": false,
     "differences": [{"key", "a", "b"}],  # unlike settings, only with force
     "benchmarks": {NAME: {"problems", "a", "b", "diff", "ci95": [lo, hi], "p_bootstrap",
                           "sign_test": {"a_better", "b_better", "ties", "p"}}},
     "mean": {"a", "b", "diff", "ci95": [lo, hi], "p_bootstrap"}}

Accuracies and differences are fractions (0.315, not 31.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dftune.errors import UserError
from dftune.eval.metrics import accuracy_by_problem, avg_key, interval, samples_per_problem
from dftune.files import read_json, read_jsonl, write_json, write_text


@dataclass
class CompareConfig:
    """Settings of `dftune compare` (a paired comparison of two evaluations of the same problems)."""

    evals: list[str] = field(default_factory=list, metadata={"split": False})
    """The two evaluation folders, the reference first: the difference is the second minus the first
    (the report's direction too)."""
    out: str = ""
    """write compare.json and compare.md here; empty: print only."""
    reps: int = 10_000
    """paired-bootstrap resamples over problems."""
    seed: int = 0
    """the bootstrap's seed."""
    force: bool = False
    """compare evaluations whose settings differ (sampling, prompt, stops, grader, benchmark content); the
    differences are recorded in compare.json / compare.md."""


class CompareError(UserError, ValueError):
    """The two evaluations cannot be compared problem by problem."""


def _per_problem(folder: Path, grader: str = "") -> tuple[dict[str, dict[str, float]], int, dict]:
    """{benchmark: {problem id: accuracy over its n samples}} by ``grader`` (empty: the
    evaluation's primary grader), n, and the summary."""
    summary = read_json(folder / "summary.json")
    if summary is None:
        raise CompareError(f"{folder}: no summary.json (not a finished `dftune eval` folder)")
    n = samples_per_problem(summary)
    by_problem = accuracy_by_problem(read_jsonl(folder / "samples.jsonl"), summary, grader)
    acc = {}
    for b in summary["benchmarks"]:
        acc[b] = by_problem[b]
        if len(acc[b]) < summary["benchmarks"][b]["problems"]:
            raise CompareError(f"{folder}: samples.jsonl holds {len(acc[b])} problems of {b} with all {n} samples, "
                               f"its summary {summary['benchmarks'][b]['problems']}")
    return acc, n, summary


# the settings that must agree, as dotted keys of eval_config.json
LIKE_KEYS = ("sampling.n", "sampling.temperature", "sampling.top_p", "sampling.max_new_tokens", "sampling.stop",
             "prompt", "stops", "grader", "graders", "strip_think")


def settings_of(folder: Path) -> dict:
    """An evaluation's settings that change its numbers, flat (eval_config.json; an older
    folder lacks some, which then differ from a newer one's)."""
    cfg = read_json(folder / "eval_config.json") or {}
    flat = {}
    for key in LIKE_KEYS:
        value = cfg
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    for b, h in (cfg.get("benchmarks") or {}).items():
        flat[f"benchmarks.{b}"] = h
    return flat


def unlike(a: Path, b: Path, benchmarks) -> list[dict]:
    """The settings in which evaluations ``a`` and ``b`` differ (benchmarks: only those compared)."""
    sa, sb = settings_of(a), settings_of(b)
    keys = [k for k in dict.fromkeys(list(sa) + list(sb))
            if not k.startswith("benchmarks.") or k.split(".", 1)[1] in benchmarks]
    return [{"key": k, "a": sa.get(k), "b": sb.get(k)} for k in keys if sa.get(k) != sb.get(k)]


def sign_test(a_better: int, b_better: int) -> float:
    """Two-sided exact binomial (p = 1/2) p-value over the problems where A and B differ."""
    m = a_better + b_better
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(a_better, b_better) + 1))
    return min(1.0, 2 * tail / 2**m)


def _paired(diffs: list[np.ndarray], reps: int, seed: int) -> tuple[list[float], float]:
    """95% interval and two-sided p-value of the mean (over groups) of mean paired differences."""
    rng = np.random.default_rng(seed)
    boot = np.zeros(reps)
    for d in diffs:
        boot += d[rng.integers(0, len(d), size=(reps, len(d)))].mean(axis=1)  # (reps,)
    boot /= len(diffs)
    observed = float(np.mean([d.mean() for d in diffs]))
    # the null distribution: the replicates shifted to mean 0
    p = (1 + np.sum(np.abs(boot - boot.mean()) >= abs(observed) - 1e-12)) / (reps + 1)
    return interval(boot), float(min(1.0, p))


def _shown(v) -> str:
    return "(absent)" if v is None else repr(v)


def compare(a: str | Path, b: str | Path, *, reps: int = 10_000, seed: int = 0, force: bool = False) -> dict:
    """Compare evaluation folders ``a`` and ``b`` (see the module docstring for the schema)."""
    a, b = Path(a), Path(b)
    # the reference's (b's) primary grader scores both sides (they differ only under --force)
    acc_b, n_b, sum_b = _per_problem(b)
    grader = sum_b.get("grader") if sum_b.get("grader") in ("math-verify", "paper") else ""
    acc_a, n_a, sum_a = _per_problem(a, grader)
    if set(acc_a) != set(acc_b):
        raise CompareError(f"{a} covers benchmarks {sorted(acc_a)} and {b} covers {sorted(acc_b)}; "
                           "compare evaluations of the same benchmarks")
    differences = unlike(a, b, acc_a)
    if differences and not force:
        listed = "; ".join(f"{d['key']} (A {_shown(d['a'])}, B {_shown(d['b'])})" for d in differences)
        raise CompareError(f"{a} and {b} are unlike evaluations: {listed}; evaluate them alike, or compare anyway "
                           "with --force (the differences are recorded)")
    if n_a != n_b:
        raise CompareError(f"{a} has {n_a} samples per problem and {b} has {n_b}; compare evaluations with the same n")
    out = {"a": {"path": str(a), "model": sum_a.get("model", "")}, "b": {"path": str(b), "model": sum_b.get("model", "")},
           "metric": avg_key(n_a), "n": n_a, "grader": grader or "math-verify", "reps": reps, "seed": seed,
           "forced": bool(differences), "differences": differences, "benchmarks": {}, "mean": {}}
    diffs = []
    for k, name in enumerate(sorted(acc_a, key=list(sum_a["benchmarks"]).index)):
        pa, pb = acc_a[name], acc_b[name]
        if set(pa) != set(pb):
            only = sorted(set(pa) ^ set(pb))[:5]
            raise CompareError(f"{name}: {a} and {b} cover different problems (e.g. ids {only}); "
                               "compare evaluations of the same problems")
        ids = sorted(pa)
        d = np.array([pa[i] - pb[i] for i in ids])
        ci, p = _paired([d], reps, seed + k)
        wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
        out["benchmarks"][name] = {
            "problems": len(ids), "a": float(np.mean([pa[i] for i in ids])), "b": float(np.mean([pb[i] for i in ids])),
            "diff": float(d.mean()), "ci95": ci, "p_bootstrap": p,
            "sign_test": {"a_better": wins, "b_better": losses, "ties": len(ids) - wins - losses,
                          "p": sign_test(wins, losses)},
        }
        diffs.append(d)
    rows = out["benchmarks"].values()
    ci, p = _paired(diffs, reps, seed + len(diffs))
    out["mean"] = {"a": float(np.mean([r["a"] for r in rows])), "b": float(np.mean([r["b"] for r in rows])),
                   "diff": float(np.mean([r["diff"] for r in rows])), "ci95": ci, "p_bootstrap": p}
    return out


def _signed(x: float) -> str:
    return f"{100 * x:+.2f}"


def compare_markdown(result: dict) -> str:
    """compare.md: per benchmark A, B, A - B with its 95% interval, and the two p-values."""
    metric = result["metric"]
    lines = [(f"A = {result['a']['path']} ({result['a']['model']}), B = {result['b']['path']} ({result['b']['model']}), "
              f"the reference; {metric} in % by the {result.get('grader', 'math-verify')} grader, A - B with a paired "
              f"bootstrap over problems ({result['reps']} resamples)."), ""]
    if result.get("differences"):
        lines += ["**Unlike evaluations, compared with --force.** Their settings differ in:", ""]
        lines += [f"- {d['key']}: A {_shown(d['a'])}, B {_shown(d['b'])}" for d in result["differences"]]
        lines += [""]
    lines += [(f"| benchmark | problems | A {metric} | B {metric} | A - B | 95% CI | p (bootstrap) | "
               "A better / B better / tied | p (sign test) |"), "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["benchmarks"].items():
        st = r["sign_test"]
        lines.append(f"| {name} | {r['problems']} | {100 * r['a']:.2f} | {100 * r['b']:.2f} | {_signed(r['diff'])} | "
                     f"{_signed(r['ci95'][0])} to {_signed(r['ci95'][1])} | {r['p_bootstrap']:.3g} | "
                     f"{st['a_better']} / {st['b_better']} / {st['ties']} | {st['p']:.3g} |")
    m = result["mean"]
    lines.append(f"| **mean** | | {100 * m['a']:.2f} | {100 * m['b']:.2f} | **{_signed(m['diff'])}** | "
                 f"{_signed(m['ci95'][0])} to {_signed(m['ci95'][1])} | {m['p_bootstrap']:.3g} | | |")
    half = (m["ci95"][1] - m["ci95"][0]) / 2
    lines += ["", f"A - B = {_signed(m['diff'])} ± {100 * half:.2f} points (mean over benchmarks, 95% CI half-width)."]
    return "\n".join(lines) + "\n"


def write_compare(a: str | Path, b: str | Path, out: str | Path, **kw) -> dict:
    """compare() written to out/compare.json and out/compare.md; returns the dict."""
    result = compare(a, b, **kw)
    write_json(Path(out) / "compare.json", result)
    write_text(Path(out) / "compare.md", compare_markdown(result))
    return result


def run_compare(cfg: CompareConfig) -> dict:
    """`dftune compare REFERENCE OTHER`: OTHER - REFERENCE, printed as a table and written when
    ``out`` is set."""
    if len(cfg.evals) != 2:
        raise CompareError(f"compare needs exactly two evaluation folders (REFERENCE OTHER); got {len(cfg.evals)}")
    reference, other = cfg.evals
    if cfg.out:
        return write_compare(other, reference, cfg.out, reps=cfg.reps, seed=cfg.seed, force=cfg.force)
    return compare(other, reference, reps=cfg.reps, seed=cfg.seed, force=cfg.force)
