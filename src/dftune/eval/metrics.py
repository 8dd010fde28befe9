"""Metrics over k samples per problem: avg@k (the paper's number) with a 95% confidence
interval, its spread over sample indices, unbiased pass@k, maj@k and the first sample;
and what the generations look like (length, truncation, repetition).

Confidence intervals are percentile bootstraps over problems (the source of sampling
error that matters when comparing models on a fixed benchmark), seeded, so the same
samples give the same interval.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

BOOTSTRAP_REPS = 2000


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), for n samples, c correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def bootstrap_means(groups: list[np.ndarray], reps: int = BOOTSTRAP_REPS, seed: int = 0) -> np.ndarray:
    """(reps,) bootstrap replicates of the mean over groups of each group's mean, every
    group resampled over its own items (problems) with replacement."""
    rng = np.random.default_rng(seed)
    total = np.zeros(reps)
    for values in groups:
        values = np.asarray(values, dtype=np.float64)
        idx = rng.integers(0, len(values), size=(reps, len(values)))  # (reps, problems)
        total += values[idx].mean(axis=1)
    return total / len(groups)


def interval(replicates: np.ndarray, level: float = 0.95) -> list[float]:
    """The percentile interval [lo, hi] of bootstrap replicates."""
    lo, hi = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def avg_key(n: int) -> str:
    """The paper's number for ``n`` samples per problem, by name: avg@n (built here only)."""
    return f"avg@{n}"


def samples_per_problem(summary: dict) -> int:
    """``n`` of an evaluation's summary.json, the one way to read it: its "n" (what
    ``summarize_rows`` writes), else its sampling settings' (files written before "n" was)."""
    return int(summary["n"] if "n" in summary else summary["sampling"]["n"])


def primary_metric(summary: dict) -> str:
    """The summary's primary metric key (avg@n)."""
    return summary.get("primary") or avg_key(samples_per_problem(summary))


def accuracy_by_problem(rows, summary: dict, grader: str = "") -> dict[str, dict[str, float]]:
    """{benchmark: {problem id: accuracy over its n samples}} from samples.jsonl rows; only
    problems with all n samples (the first row of each (problem, sample) counts). ``grader``
    (math-verify or paper): that grader's verdicts (a row's ``verdicts``); empty: the primary's."""
    n = samples_per_problem(summary)
    got: dict[str, dict[str, list]] = {b: {} for b in summary.get("benchmarks", {})}
    for r in rows:
        b, j = r.get("benchmark"), r.get("sample")
        if b in got and isinstance(j, int) and 0 <= j < n:
            slot = got[b].setdefault(str(r.get("id")), [None] * n)
            if slot[j] is None:
                slot[j] = bool(((r.get("verdicts") or {}).get(grader) or r).get("correct"))
    return {b: {i: sum(v) / n for i, v in ps.items() if None not in v} for b, ps in got.items()}


def summarize(correct: dict[str, list[bool]], ks=(1, 4, 8, 16), majority: dict[str, bool] | None = None,
              seed: int = 0) -> dict:
    """correct[problem_id] = per-sample verdicts (same length k for every problem).

    avg@k: mean accuracy over all samples; ci95: its 95% bootstrap interval over problems;
    std: standard deviation of the k per-sample-index accuracies (run-to-run spread);
    pass@j for each j <= k; first_sample: accuracy of sample 0; maj@k: accuracy of the
    majority answer, given ``majority[problem_id]`` (see dftune.eval.vote).
    """
    if not correct:
        return {"problems": 0}
    k = min(len(v) for v in correct.values())
    if k == 0 or any(len(v) != k for v in correct.values()):
        raise ValueError("every problem needs the same number of samples")
    runs = [sum(v[j] for v in correct.values()) / len(correct) for j in range(k)]
    per_problem = np.array([sum(v) / k for v in correct.values()])
    out = {
        "problems": len(correct),
        "samples": k,
        avg_key(k): sum(runs) / k,
        "ci95": interval(bootstrap_means([per_problem], seed=seed)),
        "std": statistics.pstdev(runs) if k > 1 else 0.0,
        "first_sample": runs[0],
    }
    for j in ks:
        if j <= k:
            out[f"pass@{j}"] = sum(pass_at_k(k, sum(v), j) for v in correct.values()) / len(correct)
    if majority is not None:
        out[f"maj@{k}"] = sum(bool(majority[p]) for p in correct) / len(correct)
    return out


def generation_stats(rows: list[dict]) -> dict:
    """mean_tokens (generated tokens per sample), truncated (fraction that hit the token
    budget: finish reason "length") and repetitive (fraction flagged as stuck in a loop)."""
    if not rows:
        return {}
    return {
        "mean_tokens": sum(r.get("num_tokens", 0) for r in rows) / len(rows),
        "truncated": sum(r.get("finish_reason") == "length" for r in rows) / len(rows),
        "repetitive": sum(bool(r.get("repetitive")) for r in rows) / len(rows),
    }
