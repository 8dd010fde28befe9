"""The paper's answers and golds: how the DFT paper's evaluation harness reads them.

The harness is the DFT repository's ``math_evaluation/`` (yongliang-wu/DFT, a fork of
QwenLM/Qwen2.5-Math's ``evaluation/``). This module re-implements, from its behaviour
(tested against the harness's own verdicts in tests/data/paper_grader_cases.jsonl), what
it reads of a completion and of a gold; ``paper_equal`` compares the two. Nothing here
executes text; everything is string handling, linear or near-linear in its input.

The harness's reading of a completion, in order:

- the completion is right-stripped and cut before the first of its stop strings
  (``HARNESS_STOP_STRINGS``, each cut also stripping the result); an empty completion, or
  the word "error", has no answer;
- the answer is the text of the first "final answer is $...$. I hope" (the Minerva
  layout); else what follows the LAST occurrence of the letters "boxed" (brace-matched
  when a brace follows, else up to the next "$"); else what follows the last "he answer
  is", else the last "final answer is" (to the end of the text); else the last number;
- the answer is normalised twice (``normalize``, the harness's string normaliser: units,
  ``\\text``, degrees, dollars, percent signs, spaces, ``\\frac12`` spelling, a short
  "x =" prefix...), without the unit list for minerva_math;
- for a gold that is one of the letters A-E, an answer that is not is read again as a
  multiple-choice letter; for a gold made only of those letters (the empty gold too),
  the answer keeps only its letters A-E.

Golds (``paper_gold``): the harness normalises them per benchmark; OlympiadBench's
multi-answer golds are one string, the parts joined by commas, compared as one answer.
"""

from __future__ import annotations

import re
from functools import lru_cache

from dftune.eval.scan import MAX_ANSWER_CHARS


class AnswerTooLong(ValueError):
    """An extracted answer over ``MAX_ANSWER_CHARS`` (refused before it is normalised: some
    of the normaliser's patterns are quadratic in the length)."""

# The harness passes these to vLLM as stop strings, for every prompt style it has, and cuts
# a completion at the first one it holds. vLLM matches them in the text it returns, without
# special tokens: a special token stops generation only through a stop token id.
HARNESS_STOP_STRINGS = ("</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>",
                        "<\uff5cend\u2581of\u2581sentence\uff5c>")
CHOICES = ("A", "B", "C", "D", "E")
# benchmarks whose answers keep their unit words (the harness's STRIP_EXCEPTIONS)
KEEP_UNITS = ("minerva_math", "carp_en")

# The harness's unit words (from MathQA), removed where they stand as words, in this order,
# then each with an "s"; a protocol fact, kept as the harness has them (a few are regex
# patterns: "." matches any character there).
_UNITS = [
    "east", "degree", "mph", "kmph", "ft", "m sqaure", " m east", "sq m", "deg", "mile", "q .", "monkey", "prime",
    "ratio", "profit of rs", "rd", "o", "gm", "p . m", "lb", "tile", "per", "dm", "lt", "gain", "ab", "way", "west",
    "a .", "b .", "c .", "d .", "e .", "f .", "g .", "h .", "t", "a", "h", "no change", "men", "soldier", "pie", "bc",
    "excess", "st", "inches", "noon", "percent", "by", "gal", "kmh", "c", "acre", "rise", "a . m", "th",
    "\u03c0 r 2", "sq", "mark", "l", "toy", "coin", "sq . m", "gallon", "\u00b0 f", "profit", "minw", "yr", "women",
    "feet", "am", "pm", "hr", "cu cm", "square", "v \u00e2 \u20ac \u2122", "are", "rupee", "rounds", "cubic", "cc",
    "mtr", "s", "ohm", "number", "kmph", "day", "hour", "minute", "min", "second", "man", "woman", "sec", "cube",
    "mt", "sq inch", "mp", "\u220f cm \u00b3", "hectare", "more", "sec", "unit", "cu . m", "cm 2", "rs .", "rs", "kg",
    "g", "month", "km", "m", "cm", "mm", "apple", "liter", "loss", "yard", "pure", "year", "increase", "decrease",
    "d", "less", "Surface", "litre", "pi sq m", "s .", "metre", "meter", "inch",
]
_UNIT_PATTERNS = [re.compile(r"(^|\W)" + u + r"($|\W)") for u in _UNITS + [u + "s" for u in _UNITS]]
# any of them, anywhere: a text it does not match is left alone by every one (the usual case)
_ANY_UNIT = re.compile(r"(^|\W)(?:" + "|".join(_UNITS + [u + "s" for u in _UNITS]) + r")($|\W)")
_DROPPED = ("x=", "y=", "z=", "x\\in", "y\\in", "z\\in", "x\\to", "y\\to", "z\\to")


def _word_number(text: str) -> str:
    """Number words as digits ("five" -> "5", "two thirds" -> "2", "025" -> "25"), by the
    word2number package the harness uses; anything it refuses stays as it is."""
    from word2number import w2n

    try:
        return str(w2n.word_to_num(text))
    except Exception:  # w2n raises ValueError on text without number words, IndexError on some
        return text


def _frac_braces(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72}; a \\frac with fewer than two
    characters after it leaves the whole string as it was."""
    pieces = s.split("\\frac")
    out = pieces[0]
    for piece in pieces[1:]:
        out += "\\frac"
        if piece.startswith("{"):
            out += piece
        elif len(piece) < 2:
            return s
        elif piece[1] == "{":
            out += "{" + piece[0] + "}" + piece[1:]
        else:
            out += "{" + piece[0] + "}{" + piece[1] + "}" + piece[2:]
    return out


def _slash_fraction(s: str) -> str:
    """'3/4' -> '\\frac{3}{4}' when both sides are plain integers (or hold a sqrt) written
    exactly as Python writes them; else unchanged."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    a, b = parts
    try:
        a = a if "sqrt" in a else int(a)
        b = b if "sqrt" in b else int(b)
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def normalize(text, keep_units: bool = False) -> str:
    """An answer or gold as the harness normalises it before comparing (its string
    normaliser, step by step; the order matters)."""
    return _normalize(str(text), keep_units)


@lru_cache(maxsize=16384)
def _normalize(text: str, keep_units: bool) -> str:
    s = text.strip().replace("\n", "").rstrip(".")
    s = s.replace("\\!", "")
    s = re.sub(r"\\begin\{array\}\{.*?\}", r"\\begin{pmatrix}", s)
    s = re.sub(r"\\end\{array\}", r"\\end{pmatrix}", s).replace("bmatrix", "pmatrix")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\{", "{").replace("\\}", "}")
    cut = re.sub(r"\\text{.*?}$", "", s).strip()  # a trailing \text{...}: a unit
    if cut and cut != s:
        s = cut
    if not keep_units and _ANY_UNIT.search(s):
        for _ in range(2):
            for pattern in _UNIT_PATTERNS:
                cut = pattern.sub(r"\1\2", s)
                if cut:
                    s = cut
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\(", "").replace("\\)", "")
    s = _word_number(s)
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    for key in _DROPPED:
        s = s.replace(key, "")
    s = s.replace("\\emptyset", "{}").replace("(-\\infty,\\infty)", "\\mathbb{R}")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    s = s.replace("infinity", "\\infty")
    if "\\infty" not in s:
        s = s.replace("inf", "\\infty")
    s = s.replace("+\\inity", "\\infty")
    s = s.replace("and", "").replace("\\mathbf", "")
    s = re.sub(r"\\mbox{.*?}", "", s)
    if "j" in s and "i" not in s:
        s = s.replace("j", "i")
    s = re.sub(r"(\d+)\.0*([^\d])", r"\1\2", s)  # 2.0x -> 2x, 3.00 -> 3
    s = re.sub(r"(\d+)\.0*$", r"\1", s)
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 5" -> "5"
        s = sides[1]
    s = re.sub(r"\\sqrt(\w+)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    return _slash_fraction(_frac_braces(s))


def _braced(after: str) -> str:
    """What follows a "boxed": the brace-matched group (to the end if never closed), or,
    without a brace, everything up to the next '$'."""
    if not after.startswith("{"):
        return after.split("$")[0].strip()
    depth, end = 1, len(after)
    for i in range(1, len(after)):
        c = after[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                end = i
                break
    return after[1:end]


def _last_number(text: str) -> str:
    found = re.findall(r"-?\d*\.?\d+", text.replace(",", ""))
    return found[-1] if found else ""


def read_answer(text: str, keep_units: bool = False) -> tuple[str, str]:
    """(answer, rule): the harness's extraction and its first normalisation."""
    text = text.replace("\u043a\u0438", "")
    if "final answer is $" in text and "$. I hope" in text:
        answer, rule = text.split("final answer is $", 1)[1].split("$. I hope", 1)[0].strip(), "final_answer_is"
    elif "boxed" in text:
        after = text.split("boxed")[-1]
        if not after:
            return "", "boxed"
        answer, rule = _braced(after), "boxed"
    elif "he answer is" in text:
        answer, rule = text.split("he answer is")[-1].strip(), "answer_is"
    elif "final answer is" in text:
        answer, rule = text.split("final answer is")[-1].strip(), "answer_is"
    elif "\u7b54\u6848\u662f" in text:  # "the answer is", in Chinese
        answer, rule = text.split("\u7b54\u6848\u662f")[1].strip().split("\n\n")[0].strip(), "answer_is"
    else:
        answer, rule = _last_number(text), "last_number"
    if len(answer) > MAX_ANSWER_CHARS:
        raise AnswerTooLong(answer[:80])
    answer = re.sub(r"\n\s*", "", answer)
    if answer.startswith(":"):
        answer = answer[1:]
    if answer.endswith("."):
        answer = answer[:-1]
    if answer.endswith("/"):
        answer = answer[:-1]
    return normalize(answer, keep_units), rule


def cut_at_stops(completion: str) -> str:
    """The completion as the harness grades it: right-stripped, cut before each stop string
    it holds (the cut stripped)."""
    text = completion.rstrip()
    for stop in HARNESS_STOP_STRINGS:
        if stop in text:
            text = text.split(stop)[0].strip()
    return text


def _choice_from_text(text: str) -> str:
    """A multiple-choice letter read off a whole completion (for a gold that is a letter):
    after the last "answer is" / "choice is" the first letter A-E, else the last one."""
    text = text.strip("\n")
    triggers = ("choice is", "answer is")
    if any(text.count(t) > 1 for t in triggers):  # several worked examples: the first one
        text = text.split("\n\n")[0]
    parts = re.split("|".join(triggers), text)
    flagged = len(parts) > 1
    if flagged:
        text = parts[-1]
    text = text.strip("\n").rstrip(".").rstrip("/").strip(" ").lstrip(":")
    letters = re.findall(r"\b(A|B|C|D|E)\b", text.upper()) or [text.strip().strip(".")]
    pick = letters[0] if flagged else letters[-1]
    return pick.rstrip(".").rstrip("/")


def _letters_only(s: str) -> bool:
    return all(c in CHOICES for c in s)


def paper_answer(completion: str, gold: str, benchmark: str = "") -> tuple[str | None, str]:
    """(answer, rule) as the harness reads ``completion`` against the normalised ``gold``
    (``paper_gold``); answer None: no answer (an empty completion)."""
    text = cut_at_stops(completion)
    if not text or text == "error":
        return None, "none"
    keep = benchmark in KEEP_UNITS
    answer, rule = read_answer(text, keep)
    answer = normalize(answer, keep)
    if gold in CHOICES and answer not in CHOICES:
        return _choice_from_text(text), "choice"
    if _letters_only(gold) and not _letters_only(answer):
        return "".join(c for c in answer if c in CHOICES), "choice"
    return answer, rule


def paper_gold(golds, benchmark: str = "") -> str:
    """The gold as the harness compares it, from dftune's gold list for ``benchmark``.

    math500: the answer read as the harness reads its reference solution's last box (it
    grades math500 as "math_oai"); minerva_math: the same with units kept and \\neq, \\leq,
    \\geq spelled short; every other benchmark: the answer normalised twice (OlympiadBench's
    multi-answer golds joined by commas into the one string the harness compares).
    """
    golds = [golds] if isinstance(golds, str) else [str(g) for g in golds]
    if benchmark == "math500":
        return read_answer("\\boxed{" + golds[0] + "}")[0]
    if benchmark in KEEP_UNITS:
        gold = read_answer("\\boxed{" + golds[0] + "}", keep_units=True)[0]
        return gold.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    return normalize(normalize(",".join(golds)))
