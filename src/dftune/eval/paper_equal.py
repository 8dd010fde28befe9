"""The paper's equivalence of two answers: the harness's ``math_equal``, re-implemented from
its behaviour, without executing the answers.

Both sides are already normalised (``paper_answer``). In order, two answers are equal when:

1. they are the same text, case and surrounding spaces aside;
2. the gold is a letter A-E and the answer, read as a multiple-choice answer, is it;
3. both are numbers (commas dropped, so "1,22" is 122; "5%" is 0.05): then, and only then
   (a mismatch here is final), when the answer is within a relative 1e-4 of the gold, of the
   gold / 100 or of the gold x 100 (the percentage rule: 50 equals 0.5 and 5000);
4. (an empty answer is never equal);
5. they are the same text once every ``{ } ( )`` is dropped (and, where one is bracketed
   like the other or not at all, the outer ``[ ] ( )``): so interval brackets do not count;
6. both start with a bracket and end with one: split on commas, they have as many parts,
   equal in order (by these rules);
7. both are matrices with the same rows and cells, each cell equal;
8. both are one equation: left - right equal, or of opposite sign; or one is a short
   "x = ..." whose right side equals the other;
9. symbolically: read as LaTeX by sympy's own LaTeX grammar (the harness's first reader),
   else as a Python-syntax expression (read safely here: a small whitelist, never
   ``eval``; the harness used sympy's ``parse_expr``, which evaluates), else by
   latex2sympy2's grammar; then the same printed form, or ``equals``, or a zero difference
   after ``simplify``, or equations equal up to sign, or numerically within 1e-4, or
   matrices equal cell by cell rounded to 3 decimals.

Sympy work is unbounded in general: callers run this in the grader's worker processes,
under a time limit (``Deadline``) and an address-space limit.
"""

from __future__ import annotations

import math
import re
import signal
import threading
from functools import lru_cache

from dftune.eval.paper_answer import CHOICES


class Deadline(BaseException):
    """The comparison ran out of time. A BaseException, so that the ``except Exception``
    around each sympy step (sympy raises many things on odd input) never swallows it."""


class deadline:
    """``with deadline(seconds):`` raises ``Deadline`` inside the block when time is up (by
    SIGALRM, so only in a process's main thread; elsewhere, or for 0 seconds, no limit)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.armed = seconds > 0 and threading.current_thread() is threading.main_thread()

    def _fire(self, signum, frame):
        raise Deadline()

    def __enter__(self):
        if self.armed:
            self.old = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)
        return False


# ---- numbers --------------------------------------------------------------------------------


def _number(s) -> float | None:
    """The harness's reading of a number: commas dropped, then Python's float(), else a
    trailing percent sign (or \\%) as a fraction; None when it is not a number."""
    s = str(s).replace(",", "")
    try:
        return float(s)
    except ValueError:
        pass
    if s.endswith("%"):
        s = s[:-1].removesuffix("\\")
        try:
            return float(s) / 100
        except ValueError:
            pass
    return None


def _close(a: float, b: float) -> bool:
    return math.isclose(b, a, rel_tol=1e-4)


def _choice(answer: str) -> str:
    """The last standalone letter A-E of an answer (its multiple-choice reading)."""
    answer = answer.strip("\n").rstrip(".").rstrip("/").strip(" ").lstrip(":")
    letters = re.findall(r"\b(A|B|C|D|E)\b", answer.upper())
    pick = letters[-1] if letters else answer.strip().strip(".")
    return pick.rstrip(".").rstrip("/")


def _to_pmatrix(gold: str) -> str:
    """A gold written as {a,b} rows, as the harness rewrites it to meet a pmatrix answer
    (its rewrite puts a single backslash between cells, kept as it is)."""
    rows = re.findall(r"\{.*,.*\}", gold.strip())
    return ", ".join("\\begin{pmatrix}" + m.strip("{}").replace(",", "\\") + "\\end{pmatrix}" for m in rows)


_MATRIX_STARTS = ("\\begin{pmatrix}", "\\begin{bmatrix}")
_MATRIX_ENDS = ("\\end{pmatrix}", "\\end{bmatrix}")
_BRACKETED = re.compile(r"(\(|\[).+(\)|\])")


def _matrix_rows(s: str) -> list[str]:
    inner = s[len("\\begin{pmatrix}"):-len("\\end{pmatrix}")]
    return [line.strip() for line in inner.split("\\\\") if line.strip()]


def _matrices_equal(answer: str, gold: str) -> bool:
    a_rows, g_rows = _matrix_rows(answer), _matrix_rows(gold)
    if len(a_rows) != len(g_rows):
        return False
    for a_row, g_row in zip(a_rows, g_rows):
        a_cells, g_cells = a_row.split("&"), g_row.split("&")
        if len(a_cells) != len(g_cells) or not all(equal(x, y) for x, y in zip(a_cells, g_cells)):
            return False
    return True


def equal(answer, gold) -> bool:
    """Is ``answer`` equal to ``gold`` by the harness's rules (both already normalised)?"""
    if answer is None or gold is None:
        return False
    answer, gold = str(answer), str(gold)
    if answer.strip().lower() == gold.strip().lower():
        return True
    if gold in CHOICES and _choice(answer) == gold:
        return True
    a, g = _number(answer), _number(gold)
    if a is not None and g is not None:  # numbers: decided here, equal or not
        try:
            return any(_close(a, x) for x in (g / 100, g, g * 100))
        except (OverflowError, ValueError):
            return False
    if not answer:
        return False
    answer, gold = answer.strip(), gold.strip()
    if "pmatrix" in answer and "pmatrix" not in gold:
        gold = _to_pmatrix(gold)
    a_str, g_str = answer, gold
    if (answer.startswith("[") and answer.endswith("]") and not gold.startswith("(")) or (
            answer.startswith("(") and answer.endswith(")") and not gold.startswith("[")):
        a_str, g_str = a_str.strip("[]()"), g_str.strip("[]()")
    for c in "{}()":
        a_str, g_str = a_str.replace(c, ""), g_str.replace(c, "")
    if a_str.lower() == g_str.lower():
        return True
    if _BRACKETED.match(answer) and _BRACKETED.match(gold):
        a_parts, g_parts = answer[1:-1].split(","), gold[1:-1].split(",")
        if len(a_parts) == len(g_parts) and all(equal(x, y) for x, y in zip(a_parts, g_parts)):
            return True
    if answer.startswith(_MATRIX_STARTS) and answer.endswith(_MATRIX_ENDS) and gold.startswith(_MATRIX_STARTS) \
            and gold.endswith(_MATRIX_ENDS) and _matrices_equal(answer, gold):
        return True
    if answer.count("=") == 1 and gold.count("=") == 1:
        left, right = answer.split("=")
        a_diff = f"{left.strip()} - ({right.strip()})"
        left, right = gold.split("=")
        g_diff = f"{left.strip()} - ({right.strip()})"
        if symbolic_equal(a_diff, g_diff) or symbolic_equal(f"-({a_diff})", g_diff):
            return True
    elif answer.count("=") == 1 and len(answer.split("=")[0].strip()) <= 2 and "=" not in gold:
        if equal(answer.split("=")[1], gold):
            return True
    elif gold.count("=") == 1 and len(gold.split("=")[0].strip()) <= 2 and "=" not in answer:
        if equal(answer, gold.split("=")[1]):
            return True
    return symbolic_equal(answer, gold)


# ---- symbolic -------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _latex_grammar():
    """sympy's ANTLR LaTeX lexer and parser (the grammar of sympy.parsing.latex.parse_latex),
    with the converter that turns a parse into sympy. sympy asks for the ANTLR runtime 4.11;
    math-verify needs 4.13, whose runtime reads the same serialised grammar, so the parse is
    driven here (without the runtime's version warning)."""
    import antlr4
    from sympy.parsing.latex import _parse_latex_antlr as converter
    from sympy.parsing.latex._antlr.latexlexer import LaTeXLexer
    from sympy.parsing.latex._antlr.latexparser import LaTeXParser

    class Lexer(LaTeXLexer):
        def checkVersion(self, toolVersion):  # noqa: N802, N803  (ANTLR's names)
            pass

    class Parser(LaTeXParser):
        def checkVersion(self, toolVersion):  # noqa: N802, N803
            pass

    return antlr4, Lexer, Parser, converter


@lru_cache(maxsize=1)
def warm() -> None:
    """Import what comparing needs (sympy, its LaTeX grammar, latex2sympy2, word2number):
    seconds on a first call, which must not count against a comparison's time limit."""
    import sympy  # noqa: F401
    import word2number  # noqa: F401
    from latex2sympy2_extended import latex2sympy  # noqa: F401

    from dftune.eval.paper_python import _names

    _latex_grammar()
    _names()


def _parse_latex(s: str):
    antlr4, Lexer, Parser, converter = _latex_grammar()
    errors = converter.MathErrorListener(s)
    lexer = Lexer(antlr4.InputStream(s))
    lexer.removeErrorListeners()
    lexer.addErrorListener(errors)
    parser = Parser(antlr4.CommonTokenStream(lexer))
    parser.removeErrorListeners()
    parser.addErrorListener(errors)
    relation = parser.math().relation()
    # the converter reads a derivative's numerator with the module's parse_latex, which
    # insists on ANTLR 4.11: this driver stands in for it while converting
    saved = converter.parse_latex
    converter.parse_latex = lambda text, *args, **kwargs: _parse_latex(text)
    try:
        return converter.convert_relation(relation)
    finally:
        converter.parse_latex = saved


_L2S_SPACES = ("\\quad", "\\qquad", "~", "\\,", "$", "\\displaystyle")
_OPEN, _CLOSE = "([{", ")]}"


def _top_level(text: str) -> tuple[list[str], bool]:
    """(items split at top-level commas/semicolons, whether a bracket group inside holds a
    comma that is not a function's argument list)."""
    items, depth, start, inner_comma, stack = [], 0, 0, False, []
    for i, c in enumerate(text):
        if c in _OPEN:
            depth += 1
            stack.append(i > 0 and text[i - 1].isalpha() and c == "(")  # f(x, y): arguments
        elif c in _CLOSE and depth:
            depth -= 1
            stack.pop()
        elif c in ",;":
            if depth == 0:
                items.append(text[start:i])
                start = i + 1
            elif not stack[-1]:
                inner_comma = True
    return items + [text[start:]], inner_comma


def _parse_latex2sympy(s: str):
    """The harness's third reader (its own latex2sympy2 grammar), approximated with
    latex2sympy2_extended within what that grammar reads: a list ``a, b`` / ``[a, b]`` /
    ``\\{a, b\\}`` is a Python list of its items; a parenthesised tuple, an interval, a union,
    or a non-ASCII character is refused (the harness's reader fails on them)."""
    from latex2sympy2_extended import latex2sympy

    if not s.isascii() or "\\cup" in s or "\\cap" in s:
        raise ValueError("not read by the harness's latex2sympy2")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for space in _L2S_SPACES:
        s = s.replace(space, " ")
    text = s.strip()
    for left, right in (("\\left[", "\\right]"), ("\\left\\{", "\\right\\}"), ("\\{", "\\}"), ("[", "]"), ("{", "}")):
        if text.startswith(left) and text.endswith(right):
            inner = text[len(left):-len(right)]
            items, _ = _top_level(inner)
            if len(items) > 1:
                return [_parse_latex2sympy(item) for item in items]
    items, inner_comma = _top_level(text)
    if len(items) > 1:
        return [_parse_latex2sympy(item) for item in items]
    if inner_comma:
        raise ValueError("a tuple or an interval: not read by the harness's latex2sympy2")
    return latex2sympy(text, normalization_config=None)


def _parse(s: str):
    """The first reading that succeeds: LaTeX, then Python syntax, then latex2sympy2; each
    tried on the text with double backslashes halved, then as it is. The text itself if
    none reads it."""
    from dftune.eval.paper_python import parse_python

    for reader in (_parse_latex, parse_python, _parse_latex2sympy):
        for text in (s.replace("\\\\", "\\"), s):
            try:
                return reader(text)
            except (Deadline, MemoryError):
                raise
            except Exception:  # noqa: BLE001  (a reader refusing a text, in any way, is "next reader")
                continue
    return s


def _sympified(x):
    """What sympy's ``sympify`` makes of a value (a text read as Python syntax with ^ as a
    power, safely); raises when it cannot."""
    if isinstance(x, str):
        from dftune.eval.paper_python import parse_python

        return parse_python(x, xor_is_power=True)
    import sympy

    return sympy.sympify(x)  # already sympy, or a tuple/list/set of it: no text is parsed


def _numeric(x) -> float:
    return float(_sympified(x).evalf())


def symbolic_equal(a: str, b: str) -> bool:
    """The harness's symbolic comparison of two answer texts (step 9 of ``equal``)."""
    a, b = _parse(a), _parse(b)
    checks = (
        lambda: str(a) == str(b) or a == b,
        lambda: a.equals(_sympified(b)) or _simplify(a - b) == 0,
        lambda: abs(a.lhs - a.rhs).equals(abs(b.lhs - b.rhs)),
        lambda: _close(_numeric(a), _numeric(b)),
        lambda: a.shape == b.shape and a.applyfunc(lambda x: round(x, 3)).equals(b.applyfunc(lambda x: round(x, 3))),
    )
    for check in checks:
        try:
            if check():
                return True
        except (Deadline, MemoryError):
            raise
        except Exception:  # noqa: BLE001  (sympy raises anything on odd input: that check says no)
            continue
    return False


def _simplify(x):
    from sympy import simplify

    return simplify(x)
