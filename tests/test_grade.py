"""The grader: tables of (gold, completion, expected verdict), adversarial outputs included."""

import os
import time

import pytest

from dftune.eval.grade import (
    FAILURES,
    STATUSES,
    GraderStartError,
    boxed_contents,
    defuse,
    extract_answer,
    failure_counts,
    grade_batch,
    grade_one,
    split_top_level,
    strip_thinking,
)

B = "The answer is \\boxed{%s}."

CASES = [
    # the Qwen2.5-Math grader's known false positives: judged correctly here
    ("0.5", B % "50", False),
    ("1", B % "1.0001", False),
    ("[0,3)", B % "(0,3]", False),
    # equivalences it gets right, and we too
    ("\\frac{1}{2}", B % "0.5", True),
    ("27", B % "27.0", True),
    ("025", B % "25", True),
    ("10\\%", B % "10", True),
    ("(1,2)", B % "(1, 2)", True),
    ("[0,3)", B % "[0,3)", True),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", B % "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("3\\sqrt{2}", B % "\\sqrt{18}", True),
    ("x^2+2x", B % "x(x+2)", True),
    ("\\frac{\\pi}{2}", B % "\\frac{\\pi}{2}", True),
    ("18", "She makes 9 * 2 = 18 dollars. \\fbox{18}", True),
    ("18", "so she makes $18 every day.", True),  # a bare number (with a currency sign)
    ("7", "Therefore, the answer is 7.", True),
    # the LAST box counts ...
    ("7", "\\boxed{6}.\n\nWait, that used the wrong formula. Starting again from the definition, we get \\boxed{7}", True),
    ("7", "\\boxed{7}.\n\nWait, that used the wrong formula. Starting again from the definition, we get \\boxed{6}", False),
    # ... but boxes close together are one answer (math-verify's rule; was: the last box)
    ("7", "\\boxed{6} or \\boxed{7}", False),
    ("\\frac{3}{4}", B % "\\frac{3}{4", True),  # unclosed box: read as text (was: no answer)
    ("5", "I don't know.", False),
    ("5", "", False),
]


@pytest.mark.parametrize("gold, completion, expected", CASES)
def test_table(gold, completion, expected):
    assert grade_one(completion, [gold]).correct is expected


# The misreadings that motivated reading answers with math-verify (our old rules read the
# first ones as 00, 2, 1234, 01, one part, 5 and 2010).
REGRESSIONS = [
    ("12:00", "The meeting starts at $12:00$.", True),
    ("12:00", "It ends at $1:00$.", False),
    ("\\frac{1+\\sqrt{5}}{2}", "Hence $x = \\frac{1+\\sqrt5}{2}$", True),
    ("2", "Hence $x = \\frac{1+\\sqrt5}{2}$", False),
    ("\\{1,2,3,4\\}", "the union is ${1,3} \\cup {2,4}$", True),
    ("1", "so the set is $-[0,1)$", False),
    ("10455", ("There are \\boxed{5} cases, each counted separately with care and then summed up at the end.\n"
               "The final answer is $10,455$."), True),
    ("204", "Thus the total is $180 + 24 = 204$. -sepehr2010", True),
]


@pytest.mark.parametrize("gold, completion, expected", REGRESSIONS)
def test_regressions(gold, completion, expected):
    assert grade_one(completion, [gold]).correct is expected


# Behaviour math-grading projects document (number formats, LaTeX environments, relations,
# sets, which statement is the answer), as our own cases.
BEHAVIOUR = [
    # numbers as people write them
    ("4125000", "In total, 4,125,000 people.", True),
    ("2000", "She needs 2 000 bricks.", True),
    ("350", "The price is $350.00.", True),
    ("0.25", "so $p = .25$", True),
    ("3.5", "The answer is 3,5.", True),
    ("12", "Final answer: the box holds 12 apples.", True),
    ("40", "The discount is 40%.", True),
    ("40\\%", "The discount is $40$ percent.", True),
    ("0.4", "The discount is 40%.", True),
    ("7", "ZX7Q", False),
    # LaTeX environments and styling
    ("6", "Therefore \\[ 6 \\]", True),
    ("6", "Therefore \\( 6 \\)", True),
    ("6", "We get $$6$$", True),
    ("\\frac{2}{3}", "$\\frac23$", True),
    ("\\frac{2}{3}", "$\\dfrac{2}{3}$", True),
    ("2\\sqrt{2}", "$\\sqrt8$", True),
    ("\\frac{2}{3}", "$\\left( \\frac{2}{3} \\right)$", True),
    ("15", "The area is $\\boxed{15\\text{ cm}^2}$.", True),
    ("45^\\circ", "The angle is $\\boxed{45^\\circ}$.", True),
    ("\\text{Tuesday}", "It happens on $\\boxed{\\text{Tuesday}}$.", True),
    ("C", "The answer is \\boxed{\\textbf{(C)}}", True),
    ("\\textbf{(C)}", "The answer is \\boxed{C}", True),
    ("\\text{east}", "so \\boxed{\\text{seat}}", False),  # words are not products of letters
    ("\\text{Evelyn}", "The answer is Evelyn.", True),
    # the last equals sign, relations, approximations
    ("9", "$y = 4 + 5 = 9$", True),
    ("x = 9", "$x = 9$", True),
    ("x \\le 4", "The solution is $4 \\geq x$.", True),
    ("x > 2", "The solution is $x < 2$.", False),
    ("\\frac{1}{3}", "$q = \\frac{1}{3} \\approx 0.333$", True),
    # sets, intervals, tuples
    ("(1, 5]", "$x \\in (1,5]$", True),
    ("(1, 5]", "$x \\in [1,5]$", False),
    ("\\{2, 3\\}", "The roots form $\\{3, 2\\}$.", True),
    ("(2, -1)", "The point is $(2, -1)$.", True),
    ("(2, -1)", "The point is $(-1, 2)$.", False),
    ("1 \\pm \\sqrt{3}", "$x = \\boxed{1 \\pm \\sqrt{3}}$", True),
    # symbolic equality
    ("\\frac{x+1}{2}", "$\\frac{x}{2} + \\frac{1}{2}$", True),
    ("2x + 2", "$2(x+1)$", True),
    ("x^2", "$x^3$", False),
    ("\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}", "$\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}$", True),
    ("\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}", "$\\begin{pmatrix} 3 \\\\ 1 \\end{pmatrix}$", False),
    # which statement counts: a box or a "final answer is", the later of the two; then "answer:"
    ("8", "Answer: 8", True),
    ("8", "First $x = 3$. The final answer is $8$. I hope it is correct.", True),
    ("8", "We find \\boxed{8}. Checking once more: $8 - 5 = 3$ and $3 + 5 = 8$, consistent.", True),
    ("8", "$\\boxed{3}$ apples went to Bob, so the final answer is $8$.", True),
    ("8", "Since $8 > 3$, the answer is \\boxed{3}.", False),
    # golds given as text (with $...$ or a box) are read like completions
    ("$\\frac{1}{2}$ of the cake", "$0.5$", True),
    ("The answer is $\\boxed{12}$.", "12", True),
    # a bare gold that is also a decimal-comma number accepts either reading
    ("1,22", "1.22", True),
    ("-2,1", "The roots are $x=-2$ and $x=1$, so \\boxed{1, -2}", True),
]


@pytest.mark.parametrize("gold, completion, expected", BEHAVIOUR)
def test_documented_behaviour(gold, completion, expected):
    assert grade_one(completion, [gold]).correct is expected


def test_the_tables_through_the_worker_pool():
    table = CASES + REGRESSIONS + BEHAVIOUR
    verdicts = grade_batch([(c, [g]) for g, c, _ in table], workers=2)
    assert [v.correct for v in verdicts] == [e for _, _, e in table]
    assert verdicts[0].reason == "mismatch" and verdicts[3].reason == "match"
    assert verdicts[len(CASES) - 1].status == "no_answer" and verdicts[len(CASES) - 1].reason == "no answer"  # "", "I don't know.", "ZX7Q"
    assert {v.status for v in verdicts} <= {"ok", "no_answer"}
    counts = failure_counts(verdicts)
    assert set(counts) == set(STATUSES) and sum(counts.values()) == len(table)
    assert counts["no_answer"] == 3 and all(counts[f] == 0 for f in FAILURES)


@pytest.mark.parametrize(
    "text, answer, rule",
    [
        ("so \\boxed{\\frac{1}{2}} and", "\\frac{1}{2}", "math_verify"),
        ("\\boxed{a}.\n\nThen, much later, after a long detour through the algebra of it all: \\boxed{d}", "d", "math_verify"),
        ("The answer is: $12$.", "12", "math_verify"),
        ("we get 1,234 apples", "1234", "math_verify"),
        ("The final answer is $x = 3$. I hope it is correct.", "x = 3", "math_verify"),
        ("The answer is Evelyn.", "Evelyn", "answer_is"),  # our fallback: math-verify finds nothing
        ("nothing here", None, "none"),
    ],
)
def test_extraction_rules(text, answer, rule):
    assert extract_answer(text) == (answer, rule)


def test_boxed_brace_matching():
    assert boxed_contents("\\boxed{\\{1,2\\}} \\boxed{x^{2}}") == ["\\{1,2\\}", "x^{2}"]
    assert boxed_contents("\\boxed{unclosed") == []
    assert boxed_contents("\\boxed{a \\boxed{b}} \\fbox{c} \\boxed 5$") == ["a \\boxed{b}", "c", "5"]
    assert boxed_contents("}{ \\boxed{1} \\boxed{") == ["1"]
    assert split_top_level("3, (1,2), \\{4, 5\\}") == ["3", "(1,2)", "\\{4, 5\\}"]


def test_extraction_is_linear_in_the_text():
    # 20,000 unbalanced \boxed{ took 3 s with the old scanner (quadratic). CPU time of this
    # process, not wall time: other processes on the machine do not count.
    for piece in ("\\boxed{", "}\\boxed{", "\\[", "\\(", "1 "):
        small, big = piece * 10_000, piece * 40_000
        t = time.process_time()
        boxed_contents(small), defuse(small)
        t_small = time.process_time() - t
        t = time.process_time()
        boxed_contents(big), defuse(big)
        t_big = time.process_time() - t
        assert t_big < 1.0 and t_big < 12 * t_small + 0.05, piece  # 4x the text: about 4x the time, not 16x
    t = time.process_time()
    v = grade_one("\\boxed{" * 20_000, ["4"])
    assert time.process_time() - t < 1.0 and v.status == "no_answer"


def test_defuse_leaves_ordinary_text_alone():
    text = "So \\[ x = 2 \\] and \\( y \\) give $\\boxed{\\frac{1}{2}}$ or 1 000 apples."
    assert defuse(text) == text
    assert defuse("\\boxed{1} \\boxed{2") == "\\boxed{1} {2"
    assert defuse("a \\[ b \\] c \\[ d") == "a \\[ b \\] c  d"
    assert defuse("\\( a\n\\) b") == " a\n\\) b"  # an inline \( closes on its own line
    assert defuse("12 " * 100 + "x") == (" 12" * 66) + " x"  # cut at a space, no number cut in two
    assert defuse("9" * 500) == "9" * 500


def test_multi_answer_golds_need_every_part():
    golds = ["3", "5"]
    assert grade_one("\\boxed{3} and \\boxed{5}", golds).rule == "last_boxes"
    v = grade_one("\\boxed{5, 3}", golds)  # order-free, one box split on commas
    assert v.correct and v.rule == "last_box_split"
    assert not grade_one("\\boxed{3}", golds).correct
    assert not grade_one("\\boxed{3, 4}", golds).correct
    pairs = ["(2,2)", "(6,2)"]
    assert grade_one("The pairs are \\boxed{(2,2)} and \\boxed{(6,2)}.", pairs).correct
    assert grade_one("so \\boxed{(6,2), (2,2)}", pairs).correct
    assert not grade_one("so \\boxed{(6,2)}", pairs).correct
    # the last box split first, then the last N boxes: an early wrong box does not spoil it
    assert grade_one("\\boxed{9} ... finally \\boxed{3} and \\boxed{5}", golds).correct
    # no box at all: math-verify on the whole text against the set of golds
    assert grade_one("The solutions are $x = 3$ and $x = 5$.", golds).correct


def test_strip_think():
    assert strip_thinking("<think>maybe \\boxed{4}</think> so \\boxed{3}") == " so \\boxed{3}"
    assert strip_thinking("intro <think>never closed \\boxed{4}") == "intro "
    assert strip_thinking("no tags \\boxed{4}") == "no tags \\boxed{4}"
    text = "<think>the answer is \\boxed{4}"  # the budget ran out while thinking
    assert grade_one(text, ["4"]).correct
    assert grade_one(text, ["4"], strip_think=True).status == "no_answer"
    v = grade_batch([(text, ["4"]), ("<think>4?</think>\\boxed{5}", ["5"])], workers=1, strip_think=True)
    assert [x.correct for x in v] == [False, True]


ADVERSARIAL = [
    "\\boxed{" + "9" * 5000 + "}",  # a huge number: refused as too long
    "\\boxed{10^{10^{10^{10^{10}}}}}",  # a huge exponent
    "\\boxed{" * 20000,  # unbalanced braces, megabytes of them
    "x" * 3_000_000 + " \\boxed{4}",  # a megabyte output: only the tail is read
    "\\boxed{__import__('os').system('touch /tmp/dftune_pwned')}",  # never evaluated
    "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",  # deep nesting
    "\\boxed{\\frac{1}{0}}",
    "\\boxed{" + "+".join(["x"] * 400) + "}",
    "\\[" * 10_000,  # made math-verify's regexes quadratic (12 s)
    "\\(" * 10_000,
    "1 " * 10_000,
]


def test_adversarial_outputs_are_bounded_and_never_crash():
    items = [(c, ["4"]) for c in ADVERSARIAL]
    t = time.monotonic()
    verdicts = grade_batch(items, workers=2, timeout=2)
    assert time.monotonic() - t < 60
    assert len(verdicts) == len(items)
    assert verdicts[3].correct  # the megabyte output still ends in the right box
    assert [v.correct for i, v in enumerate(verdicts) if i != 3] == [False] * (len(items) - 1)
    assert verdicts[0].status == "too_long" and verdicts[0].reason == "answer too long"
    assert all(v.status in STATUSES for v in verdicts)
    assert not os.path.exists("/tmp/dftune_pwned")


def test_a_hung_worker_is_killed_and_the_batch_finishes():
    # (10^6)! takes sympy seconds; with math-verify's own limit set high, the hard deadline
    # (1 s) is what stops it: the worker is killed and replaced, the next item still graded
    items = [(B % "(10^{6})!", ["1"]), (B % "(10^{6})! ", ["1"]), (B % "\\frac{1}{2}", ["0.5"])]
    t = time.monotonic()
    verdicts = grade_batch(items, workers=1, timeout=30, hard_timeout=1.0)
    assert [v.reason for v in verdicts] == ["timeout (worker killed)"] * 2 + ["match"]
    assert [v.status for v in verdicts] == ["timeout", "timeout", "ok"]
    assert verdicts[0].extracted == "(10^{6})!" and time.monotonic() - t < 30
    assert failure_counts(verdicts)["timeout"] == 2


def test_workers_that_cannot_start_are_one_clear_error_at_once():
    t = time.monotonic()
    with pytest.raises(GraderStartError, match="memory_mb=30"):
        grade_batch([(B % "1", ["1"])] * 4, workers=2, memory_mb=30)  # too little to import sympy
    assert time.monotonic() - t < 30
