"""Grading model answers with math-verify's extraction and comparison, in bounded workers.

What is read: math-verify's own extraction (its LaTeX and expression configs and its
"final answer is" patterns; a ``\\boxed{}`` comes before everything except a "final
answer is ..." statement, and among those the last in the text wins). Only where
math-verify finds nothing do we fall back to our own rules (the last box, e.g. ``\\boxed 5``
or a box math-verify cannot parse; then "the answer is X"), and the verdict's ``rule``
says so. Multi-answer golds (OlympiadBench) try the last box split on commas, then the
last N boxes, in any order; then math-verify on the whole text against the set of golds.

Model output is untrusted input. Nothing here evals or execs it; only the last
``MAX_TEXT_CHARS`` of a completion are read, and before math-verify sees them the few
constructs that make its regular expressions quadratic (an unclosed ``\\boxed{``, ``\\[``
or ``\\(``; very long runs of digits and spaces) are defused in linear time. An answer
longer than ``MAX_ANSWER_CHARS`` is refused; each worker runs under an address-space
limit, and one that outlives its hard deadline is killed and replaced (math-verify's own
timeouts use SIGALRM, which only works in a process's main thread, hence processes).
Every failure is a Verdict with a machine-readable ``status``, never an exception or a
hang in the caller; workers that cannot start are one clear error, at once.

    from dftune.eval.grade import grade_batch
    verdicts = grade_batch([("... so the answer is \\boxed{1/2}.", ["\\frac{1}{2}"])])

A gold that is empty (blank once ``$`` signs and ``\\text{}`` wrappers go) matches nothing,
an empty box included. ``grade_batch(..., protocol="paper")`` grades instead as the DFT
paper's harness does (``dftune.eval.paper_grade``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import lru_cache

from dftune.eval.pool import GraderStartError, run_tasks  # noqa: F401  (re-exported)
from dftune.eval.scan import (  # boxed_contents, split_top_level: also imported from here by others
    MAX_ANSWER_CHARS,
    boxed_contents,
    defuse,
    is_empty_gold,
    split_top_level,
    strip_thinking,
)

MAX_TEXT_CHARS = 20_000
# Bump when a change can flip verdicts: an evaluation refuses to mix rows of two versions.
GRADER_VERSION = "3"
PROTOCOLS = ("math-verify", "paper")
STATUSES = ("ok", "no_answer", "too_long", "timeout", "memory", "parse_error", "crash")
FAILURES = ("timeout", "memory", "parse_error", "crash")  # the grader failed, not the model


@dataclass
class Verdict:
    """One graded completion.

    correct: the answer equals the gold (every part, for multi-answer golds).
    status: ok (graded), no_answer, too_long (the model's answer is refused as too long),
        or a grader failure: timeout, memory, parse_error (an exception while parsing or
        comparing), crash (the worker died). A failure is always ``correct=False``.
    extracted: the answer read from the completion; None when there is none.
    reason: the same, for people ("match", "mismatch", "timeout (worker killed)", ...).
    rule: where the answer came from: math_verify (its extraction), boxed / answer_is
        (our fallbacks, only where math-verify found nothing), last_box_split /
        last_boxes (multi-answer golds), none.
    """

    correct: bool
    status: str
    extracted: str | None
    reason: str
    rule: str

    def to_dict(self) -> dict:
        return asdict(self)


def failure_counts(verdicts) -> dict[str, int]:
    """How many verdicts have each status (all of STATUSES, zeros included)."""
    counts = dict.fromkeys(STATUSES, 0)
    for v in verdicts:
        status = v.status if isinstance(v, Verdict) else v
        counts[status] = counts.get(status, 0) + 1
    return counts


_ANSWER_IS = re.compile(r"answer is[:\s]*([^\n]{1,200}?)(?:\.\s|\.?$|\n)", re.IGNORECASE)
# AMC/AIME answer styling: \textbf{(C)}, \text{(073)}. (Other text is left to math-verify,
# which reads \text{east} as one symbol; unwrapped, "east" would be the product e*a*s*t.)
_CHOICE = re.compile(r"\\(?:text|textbf|mathbf|mathrm)\{\(([A-E]|\d+)\)\}")


def _unwrap(answer: str) -> str:
    """'\\textbf{(C)}' -> 'C'; '(073)' -> '073' (AMC/AIME answer styling); else as is."""
    answer = _CHOICE.sub(r"\1", answer).strip().strip("$ ").strip()
    if re.fullmatch(r"\([A-E0-9]+\)", answer):
        answer = answer[1:-1]
    return answer


# ---- math-verify (in a worker) -------------------------------------------------------------


@lru_cache(maxsize=1)
def _configs():
    import math_verify.parser as mvp
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    # math-verify caches its LaTeX -> sympy parses, 20 of them; a benchmark's samples repeat
    # a few answers many times, and that parse is most of the grading time: keep 4,096
    if getattr(mvp.parse_latex_cached, "cache_info", None) and mvp.parse_latex_cached.cache_info().maxsize < 4096:
        mvp.parse_latex_cached = lru_cache(maxsize=4096)(mvp.parse_latex_cached.__wrapped__)

    # a gold given as text (a reference solution) is read box first; a completion with
    # math-verify's defaults, where a box and a "final answer is" statement share a rank
    gold = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    pred = (LatexExtractionConfig(), ExprExtractionConfig())
    return gold, pred


@lru_cache(maxsize=1)
def _mv():
    """math-verify's parse, verify and TimeoutException (imported once, on first use: it
    brings sympy, which takes a second to import)."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    return parse, verify, TimeoutException


def _parse(text: str, config, timeout: int) -> list:
    return _mv()[0](text, config, parsing_timeout=timeout, raise_on_error=True)


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout: int) -> tuple:
    """A gold answer ('\\frac{1}{2}', or a text with $...$ / \\boxed{}) as math-verify objects.

    A gold that starts with $, \\[ or \\( or holds a \\boxed{} is read as text, like a
    completion; any other as LaTeX (stray $ removed). A LaTeX gold that is also a
    decimal-comma number in text ('1,22': the list {1, 22} in LaTeX, 1.22 in text)
    accepts either reading.
    """
    if gold.lstrip().startswith(("$", "\\[", "\\(")) or "\\boxed" in gold:
        return tuple(_parse(defuse(gold), _configs()[0], timeout)) or (gold.strip(),)
    latex = re.sub(r"(?<!\\)\$", "", _unwrap(gold))  # a stray $ inside a LaTeX answer is noise
    read = tuple(_parse(defuse(f"${latex}$"), _configs()[0], timeout))
    if re.fullmatch(r"-?\d+,\d+", gold.strip()) and read and type(read[0]).__name__ == "FiniteSet":
        read += tuple(_parse(gold.strip(), _configs()[1], timeout))
    return read or (gold.strip(),)


def _shown(parsed: list) -> str:
    """The extracted answer as text: math-verify's matched string, else the object."""
    return parsed[-1] if len(parsed) > 1 and isinstance(parsed[-1], str) else str(parsed[0])


_VERIFIED: dict = {}  # (gold, pred, timeout) -> _verify's result: answers repeat across samples


def _verify(gold: tuple, pred: list, timeout: int) -> tuple[bool, str]:
    """Any (gold, pred) pair equal? And, if none was, the failure: '' when the answer was
    judged, "timeout"/"memory" if any pair ran out, "parse_error" if every pair raised."""
    key = (gold, tuple(pred), timeout)
    try:
        return _VERIFIED[key]
    except TypeError:  # an unhashable object (a mutable matrix): no caching
        return _verify_pairs(gold, pred, timeout)
    except KeyError:
        pass
    if len(_VERIFIED) > 8192:
        _VERIFIED.clear()
    _VERIFIED[key] = result = _verify_pairs(gold, pred, timeout)
    return result


def _verify_pairs(gold: tuple, pred: list, timeout: int) -> tuple[bool, str]:
    _, verify, TimeoutException = _mv()
    failure, errors, pairs = "", 0, 0
    for g in gold:
        for p in pred:
            pairs += 1
            try:
                if verify(g, p, timeout_seconds=timeout, raise_on_error=True):
                    return True, ""
            except TimeoutException:
                failure = "timeout"
            except MemoryError:
                failure = "memory"
            except Exception:  # sympy raises on hostile input (and on zoo vs zoo): that pair is no match
                errors += 1
    return False, failure or ("parse_error" if errors == pairs else "")


def _plain(text: str) -> str:
    """'\\text{ Evelyn }' -> 'evelyn': for comparing answers that are words."""
    return re.sub(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}", r"\1", _unwrap(text)).replace(" ", "").lower()


def _equal(gold: str, answer: str, timeout: int) -> tuple[bool, str]:
    """One gold part against one answer string (multi-answer parts and fallbacks): the same
    as text (words, case aside), or equal by math-verify."""
    if _plain(gold) == _plain(answer):
        return True, ""
    pred = _parse(defuse(f"${_unwrap(answer)}$"), _configs()[1], timeout)
    if not pred:
        return False, ""
    return _verify(_parse_gold(gold, timeout), pred, timeout)


def _match_all(golds: list[str], parts: list[str], timeout: int) -> tuple[bool, str]:
    """Every gold equals a different part, in any order (bipartite matching)."""
    memo, failure = {}, ""

    def eq(i, j):
        nonlocal failure
        if (i, j) not in memo:
            memo[i, j], f = _equal(golds[i], parts[j], timeout)
            failure = failure or f
        return memo[i, j]

    owner: dict[int, int] = {}  # part -> gold

    def assign(i, seen):
        for j in range(len(parts)):
            if j not in seen and eq(i, j):
                seen.add(j)
                if j not in owner or assign(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    ok = all(assign(i, set()) for i in range(len(golds)))
    return ok, "" if ok else failure


def _fallback_answer(text: str) -> tuple[str | None, str]:
    boxes = boxed_contents(text)
    if boxes:
        return boxes[-1], "boxed"
    found = _ANSWER_IS.findall(text)
    if found:
        return found[-1].strip().strip("$ "), "answer_is"
    return None, "none"


def _verdict(ok: bool, failure: str, extracted: str | None, rule: str) -> Verdict:
    if ok:
        return Verdict(True, "ok", extracted, "match", rule)
    if failure:
        return Verdict(False, failure, extracted, failure.replace("_", " "), rule)
    return Verdict(False, "ok", extracted, "mismatch", rule)


def prepare(completion: str, strip_think: bool = False) -> str:
    """What the grader reads of a completion: the tail, thinking stripped if asked, and
    AMC/AIME answer styling (``\\textbf{(C)}``) reduced to the answer."""
    if strip_think:
        completion = strip_thinking(completion)
    return _CHOICE.sub(r"\1", completion[-MAX_TEXT_CHARS:])


def extract_answer(text: str, strip_think: bool = False, timeout: int = 5) -> tuple[str | None, str]:
    """(answer, rule) as the grader reads it from a completion (single-answer golds).

    In-process; call it from a main thread (math-verify's timeouts use SIGALRM).
    """
    text = prepare(text, strip_think)
    pred = _parse(defuse(text), _configs()[1], timeout)
    if pred:
        return _shown(pred), "math_verify"
    return _fallback_answer(text)


def _grade(text: str, golds: list[str], timeout: int) -> Verdict:
    boxes = boxed_contents(text)
    if boxes and len(boxes[-1]) > MAX_ANSWER_CHARS:
        return Verdict(False, "too_long", boxes[-1][:80] + "...", "answer too long", "boxed")
    if len(golds) > 1:
        tries = []
        if boxes and len(split_top_level(boxes[-1])) == len(golds):
            tries.append(("last_box_split", split_top_level(boxes[-1])))
        if len(boxes) >= len(golds):
            tries.append(("last_boxes", boxes[-len(golds):]))
        failure = ""
        for rule, parts in tries:
            ok, f = _match_all(golds, parts, timeout)
            if ok:
                return _verdict(True, "", ", ".join(parts), rule)
            failure = failure or f
        gold = "$" + ", ".join(golds) + "$"  # the whole text against the set
    else:
        gold, failure, tries = golds[0], "", []
    pred = _parse(defuse(text), _configs()[1], timeout)
    if pred:
        shown = _shown(pred)
        if len(shown) > MAX_ANSWER_CHARS:
            return Verdict(False, "too_long", shown[:80] + "...", "answer too long", "math_verify")
        ok, f = _verify(_parse_gold(gold, timeout), pred, timeout)
        if ok or not tries:
            return _verdict(ok, f or failure, shown, "math_verify")
    if tries:  # report the multi-answer reading that came closest
        rule, parts = tries[0]
        return _verdict(False, failure, ", ".join(parts), rule)
    answer, rule = _fallback_answer(text)
    if answer is None:
        return Verdict(False, "no_answer", None, "no answer", "none")
    ok, f = _equal(golds[0], answer, timeout)
    return _verdict(ok, f, answer, rule)


def grade_one(completion: str, golds: list[str], timeout: int = 5, strip_think: bool = False) -> Verdict:
    """Grade one completion against its gold answer (all parts, for multi-answer golds).

    In-process; call it from a main thread (math-verify's timeouts use SIGALRM).
    """
    TimeoutException = _mv()[2]
    if not isinstance(completion, str):
        return Verdict(False, "no_answer", None, "not a string", "none")
    golds = [golds] if isinstance(golds, str) else [str(g) for g in golds]
    if is_empty_gold(golds):
        return Verdict(False, "ok", None, "empty gold", "none")
    try:
        return _grade(prepare(completion, strip_think), golds, timeout)
    except TimeoutException:
        return Verdict(False, "timeout", None, "timeout", "none")
    except MemoryError:
        return Verdict(False, "memory", None, "memory limit", "none")
    except Exception as e:  # sympy raises many things on hostile input
        return Verdict(False, "parse_error", None, f"parse error: {type(e).__name__}", "none")


def _grade_task(payload, timeout: int) -> dict:
    completion, golds, strip_think = payload
    return grade_one(completion, golds, timeout, strip_think).to_dict()


def _grade_failed(payload, status: str) -> dict:
    """The verdict of an item whose worker was killed or died (no math-verify here)."""
    completion, _, strip_think = payload
    boxes = boxed_contents(prepare(completion, strip_think)) if isinstance(completion, str) else []
    reason = {"timeout": "timeout (worker killed)", "crash": "grader crashed"}.get(status, status)
    return Verdict(False, status, boxes[-1][:MAX_ANSWER_CHARS] if boxes else None, reason, "boxed" if boxes else "none").to_dict()


def grade_batch(items, *, protocol: str = "math-verify", workers: int = 0, timeout: int = 5,
                hard_timeout: float = 0, memory_mb: int = 4096, strip_think: bool = False, progress=None) -> list[Verdict]:
    """Grade many items in parallel; one Verdict per item, in order.

    items: (completion, golds) pairs, or (completion, golds, benchmark) triples (golds: a
    string or a list: every part must match); protocol: math-verify (the default, strict)
    or paper (the DFT paper's harness: ``dftune.eval.paper_grade``; its gold handling is
    benchmark-specific, math500 and minerva_math in particular); workers: grader processes
    (0: the CPU count); timeout: the time limit per parse or comparison (math-verify's
    own), per item (paper), in seconds; hard_timeout: wall-clock limit per item after which
    its worker is killed (0: 4 x timeout + 5); memory_mb: each worker's address-space limit
    (0: none); strip_think: grade only what follows ``</think>``. Identical items are graded
    once. Raises ``GraderStartError`` at once if the workers cannot start.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown grading protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    norm = []
    for item in items:
        completion, golds, benchmark = (tuple(item) + ("",))[:3]
        golds = (golds,) if isinstance(golds, str) else tuple(str(x) for x in golds)
        if strip_think and isinstance(completion, str):
            completion = strip_thinking(completion)
        norm.append((completion, golds, benchmark))
    unique = list(dict.fromkeys(norm))
    where = {item: i for i, item in enumerate(unique)}
    if protocol == "paper":
        fn, fallback = "dftune.eval.paper_grade:grade_task", "dftune.eval.paper_grade:grade_failed"
        payloads = [(c, list(g), b) for c, g, b in unique]
    else:
        fn, fallback = "dftune.eval.grade:_grade_task", "dftune.eval.grade:_grade_failed"
        payloads = [(c, list(g), False) for c, g, _ in unique]
    done = run_tasks(fn, payloads, fallback=fallback, workers=workers, timeout=timeout, hard_timeout=hard_timeout,
                     memory_mb=memory_mb, groups=[(g, b) for _, g, b in unique], progress=progress)
    results = [Verdict(**d) for d in done]
    return [results[where[item]] for item in norm]
