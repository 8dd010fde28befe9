"""The `paper` grading protocol against the DFT paper's harness itself (its verdicts on 380
cases, tests/data/paper_grader_cases.jsonl; how they were produced: tests/data/README.md),
its pieces, and its bounds."""

import json
import os
import time
from pathlib import Path

import pytest

from dftune.eval.benchmarks import to_problem
from dftune.eval.grade import grade_batch, grade_one
from dftune.eval.paper_answer import normalize, paper_answer, paper_gold, read_answer
from dftune.eval.paper_equal import equal
from dftune.eval.paper_grade import grade_paper, is_empty_gold
from dftune.eval.paper_python import parse_python

TABLE = [json.loads(line) for line in (Path(__file__).parent / "data" / "paper_grader_cases.jsonl").open()]
# Where dftune disagrees with the harness on purpose (listed in docs/design.md, "The paper's grader").
KNOWN = {
    262: "empty gold: the harness matches it with an empty box",
    263: "empty gold: the harness matches it with an empty \\text{} box",
    264: "empty gold: the harness's multiple-choice rule keeps only A-E of '5', leaving '' = ''",
}
MATH_VERIFY_AGREES = 276  # docs/design.md states it: the default grader on the same table


def _item(row):
    problem = to_problem(row["benchmark"], row["record"], 0, f"case {row['id']}")
    return row["completion"], problem.golds, row["benchmark"]


@pytest.mark.parametrize("row", TABLE, ids=[f"{r['id']}-{r['topic'].replace(' ', '_')}" for r in TABLE])
def test_the_harness_table(row):
    if row["id"] in KNOWN:
        pytest.xfail(KNOWN[row["id"]])
    completion, golds, benchmark = _item(row)
    v = grade_paper(completion, golds, benchmark, timeout=30)
    assert v.correct is row["harness"]["correct"], (v, row["harness"])
    if row["harness"]["pred"] is not None:  # the same answer read, and the same gold
        assert paper_answer(completion, paper_gold(golds, benchmark), benchmark)[0] == row["harness"]["pred"]
    assert paper_gold(golds, benchmark) == row["harness"]["gt"]


def test_agreement_through_the_worker_pool():
    items = [_item(r) for r in TABLE]
    verdicts = grade_batch(items, protocol="paper", workers=2, timeout=10)
    differ = {r["id"] for v, r in zip(verdicts, TABLE) if v.correct != r["harness"]["correct"]}
    assert differ == set(KNOWN)
    assert 1 - len(differ) / len(TABLE) >= 0.99
    assert {v.status for v in verdicts} <= {"ok", "no_answer"}
    # the default grader (math-verify) on the same table
    mv = grade_batch(items, workers=2)
    assert sum(v.correct == r["harness"]["correct"] for v, r in zip(mv, TABLE)) == MATH_VERIFY_AGREES


PIECES = [
    # (benchmark, gold, completion, expected): the behaviours the harness is known for
    ("math500", "5", "First \\boxed{3}. Wait, recheck: \\boxed{5}", True),  # the last box, alone
    ("math500", "5", "\\boxed{5} or \\boxed{6}", False),
    ("olympiadbench", "0.5", "\\boxed{50}", True),  # the percentage rule
    ("olympiadbench", "0.5", "\\boxed{5000}", False),
    ("olympiadbench", "50", "\\boxed{0.5}", True),
    ("olympiadbench", "1", "\\boxed{1.0001}", True),  # relative tolerance 1e-4
    ("olympiadbench", "1", "\\boxed{1.001}", False),
    ("math500", "[0,3)", "\\boxed{(0,3]}", True),  # interval brackets ignored
    ("math500", "(1,2)", "\\boxed{(2,1)}", False),  # tuples in order
    ("aime24", "025", "\\boxed{25}", True),
    ("math500", "45^\\circ", "\\boxed{45}", True),
    ("math500", "15", "\\boxed{15 \\text{ cm}}", True),  # a trailing \text{} is a unit
    ("math500", "15", "\\boxed{15\\text{ cm}^2}", False),  # ... only when trailing
    ("math500", "15", "\\boxed{15 meters}", True),  # unit words
    ("minerva_math", "5", "\\boxed{5 m}", False),  # minerva keeps unit words
    ("gsm8k", "18", "so she makes 9 * 2 = 18 dollars", True),  # the last number
    ("math500", "7", "The answer is 7.\nThat took 3 steps.", False),  # "the answer is": to the end
    ("minerva_math", "2.5", "The final answer is $2.5$. I hope it is correct. \\boxed{3}", True),
]


@pytest.mark.parametrize("benchmark, gold, completion, expected", PIECES)
def test_known_harness_behaviour(benchmark, gold, completion, expected):
    assert grade_paper(completion, [gold], benchmark).correct is expected


def test_olympiad_multi_answer_golds_are_one_ordered_string():
    rec = {"question": "Q", "final_answer": ["$69$,$84$"], "is_multiple_answer": True}
    golds = to_problem("olympiadbench", rec, 0, "t").golds
    assert golds == ["69", "84"] and paper_gold(golds, "olympiadbench") == "69,84"
    assert grade_paper("\\boxed{69, 84}", golds, "olympiadbench").correct
    assert not grade_paper("\\boxed{84, 69}", golds, "olympiadbench").correct  # 8469 != 6984
    assert not grade_paper("\\boxed{69} and \\boxed{84}", golds, "olympiadbench").correct  # the last box only
    assert grade_one("\\boxed{69} and \\boxed{84}", golds).correct  # math-verify: every part, any order


def test_pieces():
    assert read_answer("a \\boxed{x^{2}} b") == ("x^{2}", "boxed")
    assert read_answer("I boxed it: 5") == ("it:5", "boxed")  # the letters "boxed" anywhere
    assert normalize("\\dfrac{1}{2}") == "\\frac{1}{2}" and normalize("3/4") == "\\frac{3}{4}"
    assert normalize("x = 5") == "5" and normalize("\\$10.00") == "10" and normalize("five") == "5"
    assert equal("1,22", "122") and not equal("2,1", "1,2")  # commas: thousands separators
    assert paper_gold(["\\text{east}"], "math500") == ""  # a harness quirk, kept (not an empty gold)
    assert is_empty_gold([""]) and is_empty_gold(["\\text{ }"]) and is_empty_gold(["$$"])
    assert not is_empty_gold(["\\text{east}"]) and not is_empty_gold(["0"])


def test_empty_golds_match_nothing_in_both_graders():
    for completion in ("\\boxed{}", "\\boxed{\\text{}}", "The answer is .", ""):
        for gold in ("", "\\text{}", " "):
            assert not grade_one(completion, [gold]).correct
            assert not grade_paper(completion, [gold], "math500").correct
    assert grade_one("\\boxed{}", [""]).reason == "empty gold"


def test_python_syntax_is_read_without_executing_it():
    assert parse_python("{1, 2}") == parse_python("{2, 1}")
    assert str(parse_python("x**2 + sqrt(2)")) == "x**2 + sqrt(2)"
    assert str(parse_python("2^3", xor_is_power=True)) == "8"
    for hostile in ("__import__('os').system('touch /tmp/dftune_paper_pwned')", "open('/etc/passwd')",
                    "(lambda: 1)()", "x.__class__", "eval('1')", "S('1')", "[c for c in 'ab']"):
        with pytest.raises((ValueError, SyntaxError)):
            parse_python(hostile)


ADVERSARIAL = [
    "\\boxed{__import__('os').system('touch /tmp/dftune_paper_pwned')}",
    "The answer is eval(\"__import__('os').system('touch /tmp/dftune_paper_pwned')\")",
    "\\boxed{10^{10^{10^{10^{10}}}}}",
    "\\boxed{(10^{6})!}",
    "\\boxed{" * 20_000,
    "x" * 2_000_000 + " \\boxed{4}",
    "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",
    "\\boxed{" + "9" * 5000 + "}",
    "the answer is " + "1 + " * 2000 + "1",
]


def test_adversarial_outputs_are_bounded_and_never_executed():
    t = time.monotonic()
    verdicts = grade_batch([(c, ["4"], "math500") for c in ADVERSARIAL], protocol="paper", workers=2, timeout=2)
    assert time.monotonic() - t < 120
    assert [v.correct for v in verdicts] == [False] * 5 + [True] + [False] * 3
    assert verdicts[7].status == "too_long"
    assert all(v.status in ("ok", "no_answer", "too_long", "timeout", "memory", "parse_error") for v in verdicts)
    assert not os.path.exists("/tmp/dftune_paper_pwned")
