"""The ``paper`` grading protocol: one verdict per completion as the DFT paper's harness
gives it (``paper_answer`` reads, ``paper_equal`` compares), in the grader's bounded workers.

    from dftune.eval.grade import grade_batch
    grade_batch([("First \\\\boxed{3}. Wait: \\\\boxed{5}", ["5"], "math500")], protocol="paper")

Where this differs from the harness on purpose: a gold that is empty (blank once ``$``
and ``\\text{}`` wrappers are removed) matches nothing; an extracted answer over
``MAX_ANSWER_CHARS`` (1,000) is ``too_long``; a comparison that outlives the time limit is a
``timeout`` (the harness: 3 s per comparison, then False). Every disagreement with the
harness's own verdicts on the case table is listed in docs/design.md.
"""

from __future__ import annotations

from functools import lru_cache

from dftune.eval.scan import is_empty_gold

# Bump when a change can flip verdicts: an evaluation refuses to mix rows of two versions.
PAPER_GRADER_VERSION = "1"


@lru_cache(maxsize=8192)
def _equal(answer: str, gold: str) -> bool:
    from dftune.eval.paper_equal import equal

    return equal(answer, gold)


def grade_paper(completion, golds, benchmark: str = "", timeout: float = 5):
    """One completion against its gold(s) by the paper's protocol; a ``Verdict``.

    In-process; the time limit (SIGALRM) applies only in a process's main thread.
    """
    from dftune.eval.grade import Verdict
    from dftune.eval.paper_answer import AnswerTooLong, paper_answer, paper_gold
    from dftune.eval.paper_equal import Deadline, deadline, warm

    if not isinstance(completion, str):
        return Verdict(False, "no_answer", None, "not a string", "none")
    if is_empty_gold(golds):
        return Verdict(False, "ok", None, "empty gold", "none")
    warm()  # imports: outside the time limit
    try:
        with deadline(timeout):
            gold = paper_gold(golds, benchmark)
            answer, rule = paper_answer(completion, gold, benchmark)
            if answer is None or (not answer and gold):
                return Verdict(False, "no_answer", answer, "no answer", rule)
            ok = _equal(answer, gold)
    except AnswerTooLong as e:
        return Verdict(False, "too_long", str(e) + "...", "answer too long", "none")
    except Deadline:
        return Verdict(False, "timeout", None, "timeout", "none")
    except MemoryError:
        return Verdict(False, "memory", None, "memory limit", "none")
    except RecursionError:
        return Verdict(False, "parse_error", None, "parse error: RecursionError", "none")
    return Verdict(ok, "ok", answer, "match" if ok else "mismatch", rule)


def grade_task(payload, timeout: int) -> dict:
    """A worker task: payload (completion, golds, benchmark)."""
    completion, golds, benchmark = payload
    return grade_paper(completion, golds, benchmark, timeout).to_dict()


def grade_failed(payload, status: str) -> dict:
    """The verdict of an item whose worker was killed or died."""
    from dftune.eval.grade import Verdict

    reason = {"timeout": "timeout (worker killed)", "crash": "grader crashed"}.get(status, status)
    return Verdict(False, status, None, reason, "none").to_dict()


def cluster_task(answers: list[str], timeout: int) -> list[int]:
    """Cluster labels of distinct (normalised) answers by the paper's equality, greedily
    against each cluster's first member (maj@n under the paper grader)."""
    from dftune.eval.paper_equal import Deadline, deadline, warm

    warm()
    labels, firsts = [], []
    for a in answers:
        for label, f in enumerate(firsts):
            try:
                with deadline(timeout):
                    same = _equal(a, answers[f])
            except Deadline:
                same = a == answers[f]
            if same:
                labels.append(label)
                break
        else:
            firsts.append(len(labels))
            labels.append(len(firsts) - 1)
    return labels
