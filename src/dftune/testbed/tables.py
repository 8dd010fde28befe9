"""The testbed's summary tables, computed from the per-sample evaluation files.

Two kinds of interval, because they answer two questions:

- A cell (one prior, objective and split): the mean over training seeds of avg@n, with a
  95% Student-t interval over the seeds (mean ± t_{S-1} sd / sqrt(S)). It says how much
  the number moves with the training seed, on these fixed test problems (each seed's
  value includes its own sampling noise, n samples per problem at temperature 1).
- A difference to the baseline (DFT - NLL): seed s of both objectives is paired (the same
  base, the same data order, the same evaluation sampling seeds), and so is every test
  problem. The difference is the mean over seeds and problems of a[s, p] - b[s, p] (a[s,
  p]: the accuracy over the n samples of problem p by objective A's seed-s model). Its
  95% interval is a percentile bootstrap over seeds and problems together: each replicate
  draws S seeds and P problems with replacement, the same draws for A and B. So it covers
  both the training-seed variation and which problems the generator drew: an interval
  for the expected difference on this task. With 3 seeds the seed part is approximate
  (a bootstrap over 3 values understates their spread), which is why the per-seed
  differences are listed beside it, and the exact sign test over problems (A better /
  B better on the seed-pooled accuracy) is given too.

Every accuracy and difference is a fraction (0.315, not 31.5); markdown shows percent.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dftune.eval.compare import sign_test
from dftune.eval.metrics import accuracy_by_problem, interval
from dftune.files import read_json, read_jsonl

TABLES_SCHEMA = 1
# Student t's 97.5% quantile for 1..30 degrees of freedom (beyond: the normal's 1.96)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
CELL_INTERVAL = ("mean over training seeds of avg@n; 95% Student-t interval over the seeds (training-seed variation "
                 "on these fixed test problems)")
DIFF_INTERVAL = ("mean over seeds and problems of the paired difference (seed s with seed s, problem with problem); "
                 "95% percentile bootstrap over seeds and problems together (10,000 replicates)")


def seed_interval(values: list[float]) -> dict:
    """{"mean", "ci95": [lo, hi] or None (one seed), "values"} for per-seed values."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "ci95": None, "values": v.tolist()}
    t = T975[len(v) - 2] if len(v) - 1 <= len(T975) else 1.96
    half = t * float(v.std(ddof=1)) / math.sqrt(len(v))
    return {"mean": mean, "ci95": [mean - half, mean + half], "values": v.tolist()}


def paired_difference(a: np.ndarray, b: np.ndarray, reps: int = 10_000, seed: int = 0) -> dict:
    """A - B from (S, P) per-seed, per-problem accuracies of two objectives (see the module
    docstring): diff, ci95 (bootstrap over seeds and problems), per_seed differences,
    seeds_better / seeds_worse, and the sign test over problems on the seed-pooled accuracy."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired_difference needs two (seeds, problems) arrays of one shape; got {a.shape}, {b.shape}")
    d = a - b  # (S, P)
    s, p = d.shape
    rng = np.random.default_rng(seed)
    ws = rng.multinomial(s, [1 / s] * s, size=reps) / s  # (reps, S) seed weights of each replicate
    wp = rng.multinomial(p, [1 / p] * p, size=reps) / p  # (reps, P) problem weights
    boot = ((ws @ d) * wp).sum(axis=1)  # (reps,) sum_s sum_p ws d wp
    per_seed = d.mean(axis=1)
    pooled = d.mean(axis=0)  # (P,) seed-pooled per-problem difference
    wins, losses = int((pooled > 0).sum()), int((pooled < 0).sum())
    return {"diff": float(d.mean()), "ci95": interval(boot), "per_seed": per_seed.tolist(),
            "seeds_better": int((per_seed > 0).sum()), "seeds_worse": int((per_seed < 0).sum()),
            "sign_test": {"a_better": wins, "b_better": losses, "ties": p - wins - losses, "p": sign_test(wins, losses)}}


def per_problem(folder: Path, benchmark: str) -> dict[str, float]:
    """{problem id: accuracy over its n samples} of one benchmark of an evaluation folder."""
    summary = read_json(folder / "summary.json")
    return accuracy_by_problem(read_jsonl(folder / "samples.jsonl"), summary)[benchmark]


def accuracy_matrix(folders: list[Path], benchmark: str) -> tuple[np.ndarray, list[str]]:
    """(seeds, problems) accuracies of one benchmark over the evaluation folders of the seeds."""
    rows = [per_problem(f, benchmark) for f in folders]
    ids = sorted(rows[0])
    for f, r in zip(folders, rows):
        if sorted(r) != ids:
            raise ValueError(f"{f}: {benchmark} covers other problems than {folders[0]}")
    return np.array([[r[i] for i in ids] for r in rows]), ids


def generation_summary(folders: list[Path]) -> dict:
    """How the samples end, pooled over the folders and their benchmarks: stop (EOS or
    end-of-turn before the token limit), truncated, mean tokens, repetitive, boxed (the
    completion holds a \\boxed{}: the demonstrations' answer format)."""
    rows = [r for f in folders for r in read_jsonl(f / "samples.jsonl")]
    if not rows:
        return {"samples": 0}
    def frac(pred) -> float:
        return sum(1 for r in rows if pred(r)) / len(rows)

    return {"samples": len(rows), "stop": frac(lambda r: r.get("finish_reason") == "stop"),
            "truncated": frac(lambda r: r.get("finish_reason") == "length"),
            "mean_tokens": sum(r.get("num_tokens", 0) for r in rows) / len(rows),
            "repetitive": frac(lambda r: bool(r.get("repetitive"))),
            "boxed": frac(lambda r: "\\boxed{" in r.get("completion", ""))}


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def fmt_cell(cell: dict) -> str:
    """'42.5 ± 3.1' (percent; the half-width of the 95% interval), or '42.5' for one value."""
    if cell.get("ci95") is None:
        return _pct(cell["mean"])
    return f"{_pct(cell['mean'])} ± {100 * (cell['ci95'][1] - cell['ci95'][0]) / 2:.1f}"


def fmt_p(cell: dict) -> str:
    """A probability (not percent) with its interval's half-width: '0.412 ± 0.031'."""
    if cell.get("mean") is None:
        return ""
    if cell.get("ci95") is None:
        return f"{cell['mean']:.3f}"
    return f"{cell['mean']:.3f} ± {(cell['ci95'][1] - cell['ci95'][0]) / 2:.3f}"


def fmt_diff(d: dict) -> str:
    """'+5.3 [+1.2, +9.0] (3/3)': percent points, 95% interval, seeds where A was better."""
    lo, hi = d["ci95"]
    seeds = len(d["per_seed"])
    return f"{100 * d['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] ({d['seeds_better']}/{seeds})"


def markdown(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def markdown_document(title: str, result: dict) -> str:
    """results.md: the report's tables (``result["tables"]``) as markdown, and the wall time."""
    out = [f"# {title}\n"]
    for tab in result["tables"]:
        out += [f"## {tab['title']}\n", markdown(tab["columns"], tab["rows"]), tab["note"] + "\n"]
    timing = result.get("timing") or {}
    if timing:
        load = timing.get("load_average_end")
        out.append(f"Wall time: {timing['total_s'] / 60:.1f} min with {timing['workers']} worker process(es)"
                   + (f"; load average (1, 5, 15 min) at the end: {', '.join(map(str, load))}" if load else "") + ".\n")
    return "\n".join(out)


# ---- the tables of a demo folder ----------------------------------------------------------


def _groups(points: list[dict], group: str) -> dict[tuple[str, str], dict[int, str]]:
    """{(group value, objective): {seed: point folder name}}, in the points' order."""
    out: dict[tuple[str, str], dict[int, str]] = {}
    for pt in points:
        v = pt["values"]
        out.setdefault((v[group], v["objective"]), {})[int(v["seed"])] = pt["name"]
    return out


def accuracy_tables(root: Path, points: list[dict], splits: list[str], group: str, baseline: str,
                    reps: int = 10_000) -> tuple[list[dict], list[dict]]:
    """(accuracy, vs_baseline) rows for every (group value, objective) and split, plus the
    pseudo-split "mean" (every split's problems together: the mean over splits, as they
    have equal sizes). accuracy: {group, objective, split, seeds, mean, ci95, values};
    vs_baseline: {group, objective, baseline, split, seeds, diff, ci95, per_seed,
    seeds_better, seeds_worse, sign_test} for objectives with the baseline's seeds."""
    groups = _groups(points, group)
    acc_rows, diff_rows = [], []
    matrices: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for (g, obj), seeds in groups.items():
        folders = [root / seeds[s] / "eval" for s in sorted(seeds)]
        per_split = {b: accuracy_matrix(folders, b)[0] for b in splits}
        per_split["mean"] = np.concatenate([per_split[b] for b in splits], axis=1)
        matrices[(g, obj)] = per_split
        for b, m in per_split.items():
            acc_rows.append({group: g, "objective": obj, "split": b, "seeds": len(seeds),
                             **seed_interval(m.mean(axis=1).tolist())})
    for (g, obj), seeds in groups.items():
        base_seeds = groups.get((g, baseline))
        if obj in (baseline, "base") or base_seeds is None:  # the untrained base has no training seeds to pair
            continue
        common = sorted(set(seeds) & set(base_seeds))
        if len(common) < 1 or len(common) < min(len(seeds), len(base_seeds)):
            continue
        ia = [sorted(seeds).index(s) for s in common]
        ib = [sorted(base_seeds).index(s) for s in common]
        for k, (b, m) in enumerate(matrices[(g, obj)].items()):
            d = paired_difference(m[ia], matrices[(g, baseline)][b][ib], reps=reps, seed=k)
            diff_rows.append({group: g, "objective": obj, "baseline": baseline, "split": b, "seeds": len(common), **d})
    return acc_rows, diff_rows


def curve_rows(root: Path, points: list[dict], group: str, benchmark: str = "id") -> list[dict]:
    """Learning curves: per (group value, objective) the periodic-evaluation accuracy of
    ``benchmark`` at each step, mean and 95% t-interval over seeds (eval_curve.jsonl of
    every seed; steps every seed has)."""
    out = []
    for (g, obj), seeds in _groups(points, group).items():
        curves = [{r["step"]: r[benchmark] for r in read_jsonl(root / seeds[s] / "eval_curve.jsonl") if benchmark in r}
                  for s in sorted(seeds)]
        if not all(curves):
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        cells = [seed_interval([c[st] for c in curves]) for st in steps]
        out.append({group: g, "objective": obj, "benchmark": benchmark, "seeds": len(curves), "steps": steps,
                    "mean": [c["mean"] for c in cells], "ci95": [c["ci95"] for c in cells],
                    "per_seed": [[c[st] for st in steps] for c in curves]})
    return out


def steps_to_reach(curves: list[dict], group: str, baseline: str) -> list[dict]:
    """Does an objective reach the baseline's final accuracy in fewer steps? Per (group value,
    objective): the baseline's final mean, the first step whose mean reaches it (None:
    never), and the objective's own final mean."""
    by = {(c[group], c["objective"]): c for c in curves}
    out = []
    for (g, obj), c in by.items():
        b = by.get((g, baseline))
        if obj == baseline or b is None:
            continue
        target = b["mean"][-1]
        first = next((st for st, m in zip(c["steps"], c["mean"]) if m >= target), None)
        out.append({group: g, "objective": obj, "baseline": baseline, "baseline_final": target,
                    "baseline_final_step": b["steps"][-1], "first_step_reaching": first, "final": c["mean"][-1]})
    return out


def probe_check(root: Path, points: list[dict], splits: list[str], group: str, recommended: dict[str, str],
                reps: int = 10_000) -> list[dict]:
    """The probe's recommendation tested against the outcome, per group value: the measured
    best fine-tuned objective (highest mean accuracy over every split), and the recommended
    one's paired difference to it ([95% bootstrap interval], ``paired_difference``). verdict:
    "best", "within noise" (the interval holds 0), "behind" (the interval is below 0), or
    "not trained" (the recommendation is not among the objectives run)."""
    groups = _groups(points, group)
    out = []
    for g, rec in recommended.items():
        arms = {obj: seeds for (gv, obj), seeds in groups.items() if gv == g and obj != "base"}
        if not arms:
            continue
        acc = {}
        for obj, seeds in arms.items():
            folders = [root / seeds[s] / "eval" for s in sorted(seeds)]
            acc[obj] = np.concatenate([accuracy_matrix(folders, b)[0] for b in splits], axis=1)
        best = max(acc, key=lambda o: acc[o].mean())
        row = {group: g, "recommended": rec, "best": best, "best_mean": float(acc[best].mean())}
        if rec not in acc:
            out.append({**row, "verdict": "not trained"})
            continue
        row["recommended_mean"] = float(acc[rec].mean())
        if rec == best:
            out.append({**row, "verdict": "best"})
            continue
        n = min(len(acc[rec]), len(acc[best]))
        d = paired_difference(acc[rec][:n], acc[best][:n], reps=reps)
        verdict = "behind" if d["ci95"][1] < 0 else "within noise"
        out.append({**row, "verdict": verdict, "diff": d["diff"], "ci95": d["ci95"]})
    return out
