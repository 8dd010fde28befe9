"""maj@k: is the majority answer of a problem's k samples correct? (Equivalence: the grader's.)

For one problem, the correct samples form one cluster (each equals the gold). The
incorrect samples that have an answer are clustered among themselves with math-verify's
``verify`` on their extracted answers, in the grader's worker pool (bounded like grading;
a clustering that runs out of time falls back to exact string equality). Samples with no
answer, or whose grading failed, do not vote. maj@k is correct iff the largest cluster is
the correct one; a tie goes to the cluster whose first sample comes first.
"""

from __future__ import annotations

from dftune.eval.pool import run_tasks


def _cluster_task(answers: list[str], timeout: int) -> list[int]:
    """Cluster labels (0, 1, ...) of distinct answer strings, greedily against each
    cluster's first member."""
    from math_verify.errors import TimeoutException

    from dftune.eval.grade import _configs, _parse, _verify, defuse

    parsed = []
    for a in answers:
        try:
            parsed.append(tuple(_parse(defuse(f"${a}$"), _configs()[1], timeout)) or (a,))
        except (TimeoutException, Exception):
            parsed.append((a,))
    labels, firsts = [], []
    for i in range(len(answers)):
        for label, f in enumerate(firsts):
            if _verify(parsed[f], list(parsed[i]), timeout)[0]:
                labels.append(label)
                break
        else:
            firsts.append(i)
            labels.append(len(firsts) - 1)
    return labels


def _cluster_failed(answers: list[str], status: str) -> list[int]:
    """Exact (whitespace-normalised) string equality, when clustering ran out of time."""
    first: dict[str, int] = {}
    return [first.setdefault(" ".join(a.split()), len(first)) for a in answers]


def winner(clusters: list) -> object:
    """The largest cluster among per-sample cluster ids (None: the sample does not vote);
    ties go to the cluster seen first. None if no sample votes."""
    count: dict = {}
    for c in clusters:
        if c is not None:
            count[c] = count.get(c, 0) + 1
    return max(count, key=lambda c: count[c], default=None)  # dicts keep first-seen order; max keeps the first


def majority_correct(samples: dict, *, workers: int = 0, timeout: int = 5,
                     cluster: str = "dftune.eval.vote:_cluster_task") -> dict:
    """``samples[key]`` = one problem's rows (``correct``, ``status``, ``extracted``) in sample
    order; returns ``{key: majority answer is correct}``. cluster: the worker task that
    labels distinct wrong answers (math-verify's equivalence here; the paper grader's is
    ``dftune.eval.paper_grade:cluster_task``)."""
    distinct, tasks = {}, []
    for key, rows in samples.items():
        wrong = list(dict.fromkeys(r["extracted"] for r in rows if _votes(r) and not r["correct"]))
        distinct[key] = wrong
        if len(wrong) > 1:
            tasks.append(key)
    labels = run_tasks(cluster, [distinct[k] for k in tasks], fallback="dftune.eval.vote:_cluster_failed",
                       workers=workers, timeout=timeout)
    label_of = {k: dict(zip(distinct[k], lab)) for k, lab in zip(tasks, labels)}
    out = {}
    for key, rows in samples.items():
        ids = []
        for r in rows:
            if not _votes(r):
                ids.append(None)
            elif r["correct"]:
                ids.append("correct")
            else:
                ids.append(("wrong", label_of.get(key, {}).get(r["extracted"], 0)))
        out[key] = winner(ids) == "correct"
    return out


def _votes(row: dict) -> bool:
    return row.get("status", "ok") == "ok" and row.get("extracted") is not None
