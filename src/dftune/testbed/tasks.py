"""A synthetic math task family: multi-step arithmetic word problems with step-by-step
solutions ending in \\boxed{answer}, deterministic from a seed.

Difficulty knobs: the number of steps, the size of the numbers, the operations. The
splits used by the testbed are in ``SPLITS``: an in-distribution one (what fine-tuning
demonstrates and what is tested in distribution) and harder out-of-distribution ones
(more steps, larger numbers).

    rows = generate(TaskSpec(steps=(2, 3), max_number=30), n=100, seed=0)
    rows[0] == {"id": ..., "problem": "...", "solution": "... \\boxed{17}.", "answer": "17",
                "steps": [[5, "+", 3, 8], ...]}

Two surface forms of the same arithmetic: ``solution`` is the demonstrations' form
("5 + 3 = 8." lines, then "The answer is \\boxed{8}."), and ``notes_document(row)`` writes
the same problem and computation as a plain-text note ("Work: add 3 to 5, get 8; ...
Result: 8") with no box, no chat template and no end-of-text token: what the testbed's
weak-prior base is pretrained on. It knows the arithmetic, not the demonstrations' format
or when to stop.
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
    ops: the operations used; max_factor: bound on multipliers."""

    steps: tuple[int, int] = (2, 3)
    max_number: int = 30
    ops: str = "+-*"
    max_factor: int = 3


# Small numbers keep the arithmetic learnable by a 4-layer model in a few minutes of CPU.
SPLITS = {
    "train_narrow": TaskSpec(steps=(2, 3), max_number=9, ops="+-"),  # what fine-tuning demonstrates
    "id": TaskSpec(steps=(2, 3), max_number=9, ops="+-"),  # tested in distribution
    "ood_ops": TaskSpec(steps=(2, 3), max_number=9, ops="+-*"),  # an operation the demonstrations lack
    "ood_steps": TaskSpec(steps=(4, 5), max_number=9, ops="+-"),  # longer chains
    "ood_numbers": TaskSpec(steps=(2, 3), max_number=30, ops="+-"),  # larger numbers
}
PRETRAIN_MIX = [  # the broad mixture the base model is pretrained on
    TaskSpec(steps=(1, 5), max_number=9, ops="+-*"),
    TaskSpec(steps=(1, 3), max_number=30, ops="+-*"),
]


def make_problem(spec: TaskSpec, rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(1, spec.max_number)
    sentences = [f"{name} has {value} {item}."]
    lines = [f"{name} starts with {value} {item}."]
    steps = []
    for _ in range(rng.randint(*spec.steps)):
        op = rng.choice(spec.ops)
        if op == "-" and value == 0:
            op = "+"
        if op == "+":
            n = rng.randint(1, spec.max_number)
            new = value + n
        elif op == "-":
            n = rng.randint(1, min(value, spec.max_number))
            new = value - n
        else:
            n = rng.randint(2, spec.max_factor)
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


# ---- the other surface form: plain-text notes ---------------------------------------------

NOTE_VERBS = {"+": "add {b} to {a}", "-": "take {b} from {a}", "*": "multiply {a} by {b}"}


def notes_document(row: dict) -> str:
    """The problem and its computation as a plain-text note: other wording and notation than
    the demonstrations (no "=", no box, no "The answer is"), ending after the result's line
    with a blank line and nothing else (no end-of-text token: a document continues)."""
    work = "; ".join(f"{NOTE_VERBS[op].format(a=a, b=b)}, get {c}" for a, op, b, c in row["steps"])
    return f"Problem: {row['problem']}\nWork: {work}.\nResult: {row['answer']}\n\n"


_NOTE_STEP = re.compile(r"^(add|take|multiply) (\d+) (to|from|by) (\d+), get (\d+)$")
_NOTE_OPS = {("add", "to"): "+", ("take", "from"): "-", ("multiply", "by"): "*"}


def check_notes(text: str, answer: str) -> bool:
    """A notes document's arithmetic is right and its result is ``answer``: parsed, never evaluated."""
    m = re.fullmatch(r"Problem: [^\n]*? has (\d+) [^\n]*\nWork: ([^\n]+)\.\nResult: (\d+)\n\n", text)
    if not m or m.group(3) != answer:
        return False
    value = int(m.group(1))
    for part in m.group(2).split("; "):
        s = _NOTE_STEP.match(part)
        op = _NOTE_OPS.get((s.group(1), s.group(3))) if s else None
        if op is None:
            return False
        x, y, c = int(s.group(2)), int(s.group(4)), int(s.group(5))
        a, b = (x, y) if op == "*" else (y, x)  # "add B to A", "take B from A", "multiply A by B"
        if a != value or c != {"+": a + b, "-": a - b, "*": a * b}[op]:
            return False
        value = c
    return str(value) == answer
