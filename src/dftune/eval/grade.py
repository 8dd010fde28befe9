"""Grading model answers: extraction, then math-verify, in worker processes.

Model output is untrusted input. Nothing here evals or execs it; only the last
``MAX_TEXT_CHARS`` of a completion are read, an extracted answer longer than
``MAX_ANSWER_CHARS`` is refused, each worker runs under an address-space limit, and a
worker that outlives its hard deadline is killed and replaced (math-verify's own
timeouts use SIGALRM, which only works in a process's main thread, hence processes
rather than threads). A timeout, a parse failure or a crash is "incorrect" with its
reason: never an exception or a hang in the caller.

    from dftune.eval.grade import grade_batch
    verdicts = grade_batch([("... so the answer is \\boxed{1/2}.", ["\\frac{1}{2}"])])
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait

MAX_TEXT_CHARS = 20_000
MAX_ANSWER_CHARS = 1_000
BOX_COMMANDS = ("\\boxed", "\\fbox")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"answer is[:\s]*(.+?)(?:\.\s|\.?$|\n)", re.IGNORECASE)


@dataclass
class Verdict:
    correct: bool
    extracted: str | None
    reason: str  # "match", "mismatch", "no answer", "timeout", "parse error: ...", ...
    rule: str  # which extraction rule fired: boxed, answer_is, last_number, none

    def to_dict(self) -> dict:
        return asdict(self)


# ---- extraction (pure string scanning, linear time) ------------------------------------


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at text[start] == '{', and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None  # unbalanced


def boxed_contents(text: str) -> list[str]:
    """Every \\boxed{...} / \\fbox{...} (and "\\boxed 5") in order, brace-matched."""
    out, i = [], 0
    while True:
        hits = [(text.find(cmd, i), cmd) for cmd in BOX_COMMANDS]
        hits = [h for h in hits if h[0] >= 0]
        if not hits:
            return out
        pos, cmd = min(hits)
        j = pos + len(cmd)
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            got = _braced(text, j)
            if got is None:
                i = j + 1
                continue
            out.append(got[0].strip())
            i = got[1]
        elif j > pos + len(cmd):  # "\boxed 5": up to the next space or '$'
            m = re.match(r"[^\s$]+", text[j:])
            if m:
                out.append(m.group(0))
            i = j + 1
        else:
            i = j
        if len(out) > 64:  # adversarial: thousands of boxes
            return out[-64:]


def extract_answer(text: str) -> tuple[str | None, str]:
    """(answer, rule): the last box, else "the answer is ...", else the last number."""
    text = text[-MAX_TEXT_CHARS:]
    boxes = boxed_contents(text)
    if boxes:
        return boxes[-1], "boxed"
    found = _ANSWER_IS.findall(text)
    if found:
        return found[-1].strip().strip("$ "), "answer_is"
    nums = _NUMBER.findall(text)
    if nums:
        return nums[-1].replace(",", ""), "last_number"
    return None, "none"


def split_top_level(answer: str) -> list[str]:
    """'3, (1,2), 5' -> ['3', '(1,2)', '5']: commas outside brackets and braces."""
    parts, depth, cur = [], 0, []
    for c in answer:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


# ---- comparison (runs in a worker) -------------------------------------------------------


_WRAPPERS = re.compile(r"\\(?:textbf|mathbf|mathrm)\{([^{}]*)\}")


def _unwrap(answer: str) -> str:
    """'\\textbf{(C)}' -> '(C)' -> 'C'; '\\textbf{(073)}' -> '073' (AMC/AIME answer styling)."""
    answer = _WRAPPERS.sub(r"\1", answer).strip()
    if re.fullmatch(r"\([A-E0-9]+\)", answer):
        answer = answer[1:-1]
    return answer


def _equal(gold: str, answer: str, timeout: int) -> bool:
    from math_verify import parse, verify

    gold, answer = _unwrap(gold), _unwrap(answer)
    g = parse(f"${gold}$", parsing_timeout=timeout)
    a = parse(f"${answer}$", parsing_timeout=timeout)
    if not g or not a:
        return gold.strip() == answer.strip()
    return bool(verify(g, a, timeout_seconds=timeout))


def grade_one(completion: str, golds: list[str], timeout: int = 5) -> Verdict:
    """Grade one completion against its gold answer (all parts, for multi-answer golds).

    In-process; call it from a main thread (math-verify's timeouts use SIGALRM).
    """
    if not isinstance(completion, str):
        return Verdict(False, None, "not a string", "none")
    answer, rule = extract_answer(completion)
    if answer is None:
        return Verdict(False, None, "no answer", rule)
    if len(answer) > MAX_ANSWER_CHARS:
        return Verdict(False, answer[:80] + "...", "answer too long", rule)
    try:
        if len(golds) == 1:
            ok = _equal(golds[0], answer, timeout)
        else:  # every part must match: one box per part, or one box with commas
            boxes = boxed_contents(completion[-MAX_TEXT_CHARS:])
            parts = boxes if len(boxes) >= len(golds) and rule == "boxed" else split_top_level(answer)
            parts = parts[-len(golds):] if len(boxes) >= len(golds) else parts
            if len(parts) != len(golds):
                return Verdict(False, answer, f"expected {len(golds)} answers, got {len(parts)}", rule)
            remaining = list(parts)
            ok = True
            for g in golds:  # order-free matching
                hit = next((p for p in remaining if _equal(g, p, timeout)), None)
                if hit is None:
                    ok = False
                    break
                remaining.remove(hit)
    except MemoryError:
        return Verdict(False, answer, "memory limit", rule)
    except TimeoutError:
        return Verdict(False, answer, "timeout", rule)
    except Exception as e:  # sympy raises many things on hostile input
        return Verdict(False, answer, f"parse error: {type(e).__name__}", rule)
    return Verdict(ok, answer, "match" if ok else "mismatch", rule)


# ---- the worker pool -------------------------------------------------------------------------


def _worker(conn, memory_mb: int, timeout: int) -> None:
    if memory_mb:
        import resource

        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import math_verify  # noqa: F401  (import once, before the first task)

    conn.send(("ready", None))
    while True:
        task = conn.recv()
        if task is None:
            return
        idx, completion, golds = task
        try:
            conn.send((idx, grade_one(completion, golds, timeout).to_dict()))
        except MemoryError:
            conn.send((idx, Verdict(False, None, "memory limit", "none").to_dict()))


class _Worker:
    def __init__(self, ctx, memory_mb: int, timeout: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, memory_mb, timeout), daemon=True)
        self.proc.start()
        child.close()
        self.task = None  # (idx, started_at) while busy
        self.ready = False


def grade_batch(items, *, workers: int | None = None, timeout: int = 5, hard_timeout: float | None = None,
                memory_mb: int = 4096, progress=None) -> list[Verdict]:
    """Grade many (completion, golds) pairs in parallel; one Verdict per item, in order.

    timeout: math-verify's own per-call limit (seconds); hard_timeout: wall-clock limit per
    item after which its worker is killed (default 4 x timeout + 5); memory_mb: the
    address-space limit of each worker (0: none).
    """
    items = [(c, [golds] if isinstance(golds, str) else list(golds)) for c, golds in items]
    if not items:
        return []
    hard = hard_timeout or 4 * timeout + 5
    ctx = mp.get_context("spawn")  # never fork a process that may hold vLLM or CUDA threads
    n = max(1, min(workers or os.cpu_count() or 1, len(items)))
    pool = [_Worker(ctx, memory_mb, timeout) for _ in range(n)]
    results: list[Verdict | None] = [None] * len(items)
    todo = list(range(len(items)))[::-1]
    done, restarts = 0, 0
    try:
        while done < len(items):
            for w in pool:
                if w.ready and w.task is None and todo:
                    i = todo.pop()
                    w.conn.send((i, *items[i]))
                    w.task = (i, time.monotonic())
            for conn in wait([w.conn for w in pool], timeout=0.05):
                w = next(w for w in pool if w.conn is conn)
                try:
                    idx, verdict = conn.recv()
                except EOFError:  # the worker died (e.g. killed by the OS): replace it
                    idx = w.task[0] if w.task else None
                    restarts += 1
                    if restarts > 4 * n + len(items):
                        raise RuntimeError("grader workers keep dying at start-up (memory_mb too low?)") from None
                    pool[pool.index(w)] = _Worker(ctx, memory_mb, timeout)
                    if idx is not None:
                        results[idx] = Verdict(False, None, "grader crashed", "none")
                        done += 1
                    continue
                if idx == "ready":
                    w.ready = True
                    continue
                results[idx] = Verdict(**verdict)
                w.task = None
                done += 1
                if progress:
                    progress(1)
            now = time.monotonic()
            for k, w in enumerate(pool):
                if w.task and now - w.task[1] > hard:
                    idx = w.task[0]
                    w.proc.kill()
                    w.proc.join()
                    answer, rule = extract_answer(items[idx][0]) if isinstance(items[idx][0], str) else (None, "none")
                    results[idx] = Verdict(False, answer, "timeout (worker killed)", rule)
                    done += 1
                    if progress:
                        progress(1)
                    pool[k] = _Worker(ctx, memory_mb, timeout)
    finally:
        for w in pool:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            w.proc.join(timeout=1)
            if w.proc.is_alive():
                w.proc.kill()
    return results  # type: ignore[return-value]
