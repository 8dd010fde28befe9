"""Our own scanning of completions, all linear in the text: boxed answers, thinking, and
the few constructs that make math-verify's regular expressions quadratic (``defuse``).

The grader (dftune.eval.grade) reads answers with math-verify; these helpers find the
boxes for multi-answer golds and fallbacks, and keep hostile text from costing seconds.
"""

from __future__ import annotations

import re

MAX_ANSWER_CHARS = 1_000  # a longer answer is refused (the grader's "too_long")


_BOX = re.compile(r"\\(?:boxed|fbox)")


def _closing_braces(text: str) -> dict[int, int]:
    """{position of '{': position of its matching '}'} for every balanced pair; one pass."""
    stack, pairs = [], {}
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            pairs[stack.pop()] = m.start()
    return pairs


def boxed_contents(text: str) -> list[str]:
    """Every ``\\boxed{...}`` / ``\\fbox{...}`` (and ``\\boxed 5``) in order, brace-matched.

    Linear in the text; an unbalanced box is skipped, a box inside a box is part of the
    outer one, and only the last 64 are kept (adversarial: thousands of boxes).
    """
    pairs, out, after = None, [], 0
    for m in _BOX.finditer(text):
        if m.start() < after:
            continue
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            if pairs is None:
                pairs = _closing_braces(text)
            close = pairs.get(j)
            if close is None:
                continue
            out.append(text[j + 1:close].strip())
            after = close + 1
        elif j > m.end():  # "\boxed 5": up to the next space or '$'
            word = re.match(r"[^\s$]+", text[j:j + MAX_ANSWER_CHARS + 1])
            if word:
                out.append(word.group())
                after = j + word.end()
    return out[-64:]


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


def strip_thinking(text: str) -> str:
    """The text after the last ``</think>``; a ``<think>`` never closed (the budget ran out
    while thinking) leaves only what came before it."""
    end = text.rfind("</think>")
    if end >= 0:
        return text[end + len("</think>"):]
    start = text.find("<think>")
    return text if start < 0 else text[:start]


def _drop_unclosed(text: str, opener: str, closer: str, same_line: bool) -> str:
    """Remove every ``opener`` with no ``closer`` after it (on its own line, if same_line)."""
    if opener not in text:
        return text
    seps = [opener, closer] + (["\n"] if same_line else [])
    out, closed = [], False  # scanning backwards: is there a closer between here and the end?
    for piece in reversed(re.split("(" + "|".join(map(re.escape, seps)) + ")", text)):
        if piece == closer:
            closed = True
        elif piece == "\n":
            closed = False
        elif piece == opener and not closed:
            continue
        out.append(piece)
    return "".join(reversed(out))


_DIGIT_RUN = re.compile(r"[\d\s.]{201,}")


def _shorten_run(m: re.Match) -> str:
    run = m.group()
    if not any(c.isspace() for c in run):  # digits and dots alone do not slow the regexes
        return run
    tail = run[-200:]
    cut = next((i for i, c in enumerate(tail) if c.isspace()), 0)
    return tail[cut:]  # from a whitespace, so no number is cut in two


def defuse(text: str) -> str:
    """The text with the constructs that make math-verify's regexes quadratic made inert.

    An unclosed ``\\boxed{`` loses its command (its content stays as text); an unclosed
    ``\\[`` / ``\\(`` is dropped; a run of over 200 digits, spaces and dots keeps its last
    200 characters. ``\\fbox`` is read as ``\\boxed``. Linear time; ordinary text is unchanged.
    """
    text = text.replace("\\fbox{", "\\boxed{")
    if "\\boxed" in text:
        pairs = _closing_braces(text)
        cut = [m.start() for m in re.finditer(r"\\boxed\{", text) if m.end() - 1 not in pairs]
        if cut:
            keep, prev = [], 0
            for s in cut:
                keep.append(text[prev:s])
                prev = s + len("\\boxed")
            text = "".join(keep) + text[prev:]
    text = _drop_unclosed(text, "\\[", "\\]", same_line=False)
    text = _drop_unclosed(text, "\\(", "\\)", same_line=True)
    return _DIGIT_RUN.sub(_shorten_run, text)


def is_empty_gold(golds) -> bool:
    """A gold with nothing in it: blank once ``$`` signs and ``\\text{}``-style wrappers go
    (both graders refuse to match it, even with an empty answer)."""
    golds = [golds] if isinstance(golds, str) else [str(g) for g in golds]
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", "".join(golds))
    return not text.replace("$", "").strip()
