"""Metrics over k samples per problem: avg@k (the paper's number), its spread, pass@k."""

from __future__ import annotations

import math
import statistics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), for n samples, c correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(correct: dict[str, list[bool]], ks=(1, 4, 8, 16)) -> dict:
    """correct[problem_id] = per-sample verdicts (same length k for every problem).

    avg@k: mean accuracy over all samples; std: standard deviation of the k per-sample-index
    accuracies (run-to-run spread); pass@j for each j <= k; first: accuracy of sample 0.
    """
    if not correct:
        return {"problems": 0}
    k = min(len(v) for v in correct.values())
    if k == 0 or any(len(v) != k for v in correct.values()):
        raise ValueError("every problem needs the same number of samples")
    runs = [sum(v[j] for v in correct.values()) / len(correct) for j in range(k)]
    out = {
        "problems": len(correct),
        "samples": k,
        f"avg@{k}": sum(runs) / k,
        "std": statistics.pstdev(runs) if k > 1 else 0.0,
        "first_sample": runs[0],
    }
    for j in ks:
        if j <= k:
            out[f"pass@{j}"] = sum(pass_at_k(k, sum(v), j) for v in correct.values()) / len(correct)
    return out
