"""The grader: a table of (gold, completion, expected verdict), adversarial outputs included."""

import time

import pytest

from dftune.eval.grade import boxed_contents, extract_answer, grade_batch, grade_one

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
    ("18", "so she makes $18 every day.", True),  # last-number fallback
    ("7", "Therefore, the answer is 7.", True),  # "the answer is" fallback
    ("7", "\\boxed{6} no wait \\boxed{7}", True),  # the LAST box counts
    ("7", "\\boxed{7} no wait \\boxed{6}", False),
    ("\\frac{3}{4}", B % "\\frac{3}{4", False),  # unbalanced braces: no box, falls back
    ("5", "I don't know.", False),
    ("5", "", False),
]


@pytest.mark.parametrize("gold, completion, expected", CASES)
def test_table(gold, completion, expected):
    assert grade_one(completion, [gold]).correct is expected


def test_the_whole_table_through_the_worker_pool():
    verdicts = grade_batch([(c, [g]) for g, c, _ in CASES], workers=2)
    assert [v.correct for v in verdicts] == [e for _, _, e in CASES]
    assert verdicts[0].reason == "mismatch" and verdicts[3].reason == "match"
    assert verdicts[-1].reason == "no answer"


@pytest.mark.parametrize(
    "text, answer, rule",
    [
        ("so \\boxed{\\frac{1}{2}} and", "\\frac{1}{2}", "boxed"),
        ("\\boxed{a{b}c} \\boxed{d}", "d", "boxed"),
        ("\\boxed 5$ done", "5", "boxed"),
        ("The answer is: $12$.", "12", "answer_is"),
        ("we get 1,234 apples", "1234", "last_number"),
        ("nothing here", None, "none"),
    ],
)
def test_extraction_rules(text, answer, rule):
    assert extract_answer(text) == (answer, rule)


def test_boxed_brace_matching():
    assert boxed_contents("\\boxed{\\{1,2\\}} \\boxed{x^{2}}") == ["\\{1,2\\}", "x^{2}"]
    assert boxed_contents("\\boxed{unclosed") == []


def test_multi_answer_golds_need_every_part():
    golds = ["3", "5"]
    assert grade_one("\\boxed{3} and \\boxed{5}", golds).correct
    assert grade_one("\\boxed{5, 3}", golds).correct  # order-free
    assert not grade_one("\\boxed{3}", golds).correct
    assert not grade_one("\\boxed{3, 4}", golds).correct


ADVERSARIAL = [
    "\\boxed{" + "9" * 5000 + "}",  # a huge number: refused as too long
    "\\boxed{10^{10^{10^{10^{10}}}}}",  # a huge exponent
    "\\boxed{" * 20000,  # unbalanced braces, megabytes of them
    "x" * 3_000_000 + " \\boxed{4}",  # a megabyte output: only the tail is read
    "\\boxed{__import__('os').system('touch /tmp/dftune_pwned')}",  # never evaluated
    "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",  # deep nesting
    "\\boxed{\\frac{1}{0}}",
    "\\boxed{" + "+".join(["x"] * 400) + "}",
]


def test_adversarial_outputs_are_bounded_and_never_crash(tmp_path):
    items = [(c, ["4"]) for c in ADVERSARIAL]
    t = time.monotonic()
    verdicts = grade_batch(items, workers=2, timeout=2)
    assert time.monotonic() - t < 60
    assert len(verdicts) == len(items)
    assert verdicts[3].correct  # the megabyte output still ends in the right box
    assert [v.correct for i, v in enumerate(verdicts) if i != 3] == [False] * (len(items) - 1)
    assert verdicts[0].reason == "answer too long"
    import os

    assert not os.path.exists("/tmp/dftune_pwned")


def test_a_hung_worker_is_killed_and_the_batch_finishes():
    # (10^6)! takes sympy seconds; with math-verify's own limit set high, the hard deadline
    # (1 s) is what stops it: the worker is killed and replaced, the next item still graded
    items = [(B % "(10^{6})!", ["1"]), (B % "(10^{6})!", ["1"]), (B % "\\frac{1}{2}", ["0.5"])]
    t = time.monotonic()
    verdicts = grade_batch(items, workers=1, timeout=30, hard_timeout=1.0)
    assert [v.reason for v in verdicts] == ["timeout (worker killed)"] * 2 + ["match"]
    assert verdicts[0].extracted == "(10^{6})!" and time.monotonic() - t < 30
