"""A synthetic math task family: multi-step arithmetic word problems with step-by-step
solutions ending in \\boxed{answer}, deterministic from a seed.

Difficulty knobs: the number of steps, the size of the numbers, the operations. The
splits used by the testbed are in ``SPLITS``: an in-distribution one (what fine-tuning
demonstrates and what is tested in distribution) and out-of-distribution ones (an
operation the demonstrations lack, longer chains).

    rows = generate(TaskSpec(steps=(2, 3), max_number=30), n=100, seed=0)
    rows[0] == {"id": ..., "problem": "...", "solution": "... \\boxed{17}.", "answer": "17",
                "steps": [[5, "+", 3, 8], ...]}

Two surface forms of the same arithmetic: ``solution`` is the demonstrations' form
("Ava starts with 5 pens.\n5 + 3 = 8.\nThe answer is \\boxed{8}." after a chat prompt,
then the end of text), and ``notes_document(row)`` writes the same problem and computation
as a plain-text note ("Problem: ...\nWork: Ava has 5 pens.\n5 + 3 = 8.\nResult: 8") with
no box, no chat template and no end-of-text token: what the testbed's weak-prior base is
pretrained on. It knows the arithmetic, not the demonstrations' layout or when to stop.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena", "Milo", "Nora"]
ITEMS = ["apples", "coins", "books", "stamps", "marbles", "shells", "cards", "pens", "stickers", "eggs"]
VERBS = {
    "+": ["buys {n} more", "finds {n} more", "gets {n} more", "is given {n} more"],
    "-": ["gives away {n}", "loses {n}", "sells {n}", "uses {n}"],
    "*": ["multiplies the pile by {n}", "ends up with {n} times as many"],
}


@dataclass(frozen=True)
class TaskSpec:
    """steps: (min, max) operations; max_number: bound on the start and the operands;
    ops: the operations used; max_factor: bound on multipliers; max_value: bound on every
    intermediate value (an operation that would pass it is replaced by a subtraction)."""

    steps: tuple[int, int] = (2, 3)
    max_number: int = 30
    ops: str = "+-*"
    max_factor: int = 3
    max_value: int = 10**6


# Small numbers (operands up to 9, every value up to 19) keep the arithmetic learnable by a
# 4-layer, 64-wide model in a few CPU minutes; larger ones need far more pretraining.
SPLITS = {
    "train_narrow": TaskSpec(steps=(2, 3), max_number=9, ops="+-", max_value=19),  # what fine-tuning demonstrates
    "id": TaskSpec(steps=(2, 3), max_number=9, ops="+-", max_value=19),  # tested in distribution
    "ood_ops": TaskSpec(steps=(2, 3), max_number=9, ops="+-*", max_value=19),  # an operation the demonstrations lack
    "ood_steps": TaskSpec(steps=(4, 5), max_number=9, ops="+-", max_value=19),  # longer chains
}
PRETRAIN_MIX = [  # the broader mixture the bases are pretrained on (covers every split)
    TaskSpec(steps=(1, 5), max_number=9, ops="+-*", max_value=19),
]


def make_problem(spec: TaskSpec, rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(1, spec.max_number)
    sentences = [f"{name} has {value} {item}."]
    lines = [f"{name} starts with {value} {item}."]
    steps = []
    for _ in range(rng.randint(*spec.steps)):
        op = rng.choice(spec.ops)
        if op == "+" and value >= spec.max_value or op == "*" and value * 2 > spec.max_value:
            op = "-"
        if op == "-" and value == 0:
            op = "+"
        if op == "+":
            n = rng.randint(1, min(spec.max_number, spec.max_value - value))
            new = value + n
        elif op == "-":
            n = rng.randint(1, min(value, spec.max_number))
            new = value - n
        else:
            n = rng.randint(2, max(2, min(spec.max_factor, spec.max_value // max(value, 1))))
            new = value * n
        sentences.append(f"Then {name} {rng.choice(VERBS[op]).format(n=n)}.")
        lines.append(f"{value} {op} {n} = {new}.")
        steps.append([value, op, n, new])
        value = new
    sentences.append(f"How many {item} does {name} have now?")
    lines.append(f"The answer is \\boxed{{{value}}}.")
    return {"problem": " ".join(sentences), "solution": "\n".join(lines), "answer": str(value), "steps": steps}


def generate(spec: TaskSpec, n: int, seed: int, prefix: str = "p") -> list[dict]:
    """``n`` problems, the same for the same (spec, n, seed)."""
    rng = random.Random(f"{seed}-{sorted(asdict(spec).items())}")
    return [{"id": f"{prefix}{i}", **make_problem(spec, rng)} for i in range(n)]


_STEP = re.compile(r"^(\d+) ([+\-*]) (\d+) = (\d+)\.$")


def check_solution(row: dict) -> bool:
    """Every step's arithmetic is right and the boxed answer is the last result (no eval)."""
    lines = row["solution"].split("\n")
    value = int(re.search(r"starts with (\d+)", lines[0]).group(1))
    for line in lines[1:-1]:
        m = _STEP.match(line)
        if not m or int(m.group(1)) != value:
            return False
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        if c != {"+": a + b, "-": a - b, "*": a * b}[op]:
            return False
        value = c
    return lines[-1] == f"The answer is \\boxed{{{value}}}." and row["answer"] == str(value)


def with_wrong_last_step(row: dict, rng: random.Random) -> dict:
    """The row with its last step's result off by 1 to 3 (never below 0), and the boxed
    answer following it: a plausible wrong solution, as real demonstration sets contain
    (NuminaMath-CoT has wrong solutions). ``answer`` keeps the right value."""
    a, op, b, c = row["steps"][-1]
    wrong = c + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if c + d >= 0])
    lines = row["solution"].split("\n")
    lines[-2:] = [f"{a} {op} {b} = {wrong}.", f"The answer is \\boxed{{{wrong}}}."]
    return {**row, "solution": "\n".join(lines), "wrong": True}


# ---- the other surface form: plain-text notes ---------------------------------------------

NOTE_WORDS = {"+": "plus", "-": "minus", "*": "times"}
_WORD_OPS = {w: op for op, w in NOTE_WORDS.items()}
NOTATIONS = ("symbols", "words")


def notes_document(row: dict, notation: str = "symbols") -> str:
    """The problem and its computation as a plain-text note, ending after the result's line
    with a blank line and nothing else (no end-of-text token: a document continues), with no
    box, no chat template and no "The answer is".

    notation="symbols": the steps in the demonstrations' arithmetic ("5 + 3 = 8."), inside
    the notes' own wrapper ("Problem: ...", "Work: ...", "Result: 8"): the weak base then
    knows the computation's tokens and not the demonstrations' layout, chat turn, box or
    stop. notation="words": "5 plus 3 is 8" (the earlier weak base; the arithmetic has to
    transfer across notations). The start is restated ("Ava has 5 pens."), as the
    demonstrations restate it, and the operands come in the demonstrations' order.
    """
    if notation not in NOTATIONS:
        raise ValueError(f"notation must be one of {NOTATIONS}; got {notation!r}")
    start = row["problem"].split(".")[0]  # "Ava has 5 pens"
    if notation == "symbols":
        steps = [f"{a} {op} {b} = {c}" for a, op, b, c in row["steps"]]
    else:
        steps = [f"{a} {NOTE_WORDS[op]} {b} is {c}" for a, op, b, c in row["steps"]]
    work = ".\n".join([start] + steps)
    return f"Problem: {row['problem']}\nWork: {work}.\nResult: {row['answer']}\n\n"


_NOTE_STEP = {"symbols": re.compile(r"^(\d+) ([+\-*]) (\d+) = (\d+)$"),
              "words": re.compile(r"^(\d+) (plus|minus|times) (\d+) is (\d+)$")}


def check_notes(text: str, answer: str, notation: str = "symbols") -> bool:
    """A notes document (in ``notation``) whose arithmetic is right and whose result is
    ``answer``: parsed, never evaluated."""
    m = re.fullmatch(r"Problem: [^\n]*? has (\d+) [^\n]*\nWork: (.+)\.\nResult: (\d+)\n\n", text, re.DOTALL)
    if not m or m.group(3) != answer:
        return False
    value = int(m.group(1))
    start, *parts = m.group(2).split(".\n")
    if not re.fullmatch(rf"\w+ has {value} \w+", start):
        return False
    for part in parts:
        s = _NOTE_STEP[notation].match(part)
        if s is None:
            return False
        a, op, b, c = int(s.group(1)), _WORD_OPS.get(s.group(2), s.group(2)), int(s.group(3)), int(s.group(4))
        if a != value or c != {"+": a + b, "-": a - b, "*": a * b}[op]:
            return False
        value = c
    return str(value) == answer
