"""The paper's math benchmarks (and two extras) as (id, question, gold answers), plus prompts.

Data come from a local folder holding ``NAME/test.jsonl`` (``--data-dir`` or the
``DFTUNE_DATA_DIR`` environment variable), or from the Hugging Face Hub for users with
internet (``HUB`` below; needs ``dftune[hub]``). The local files are the paper's (the
Qwen2.5-Math evaluation data); the Hub copies name some fields differently, and each
loader reads whichever layout a record has (see ``to_problem``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dftune.errors import UserError
from dftune.eval.grade import boxed_contents, split_top_level
from dftune.eval.prompts import INSTRUCTION, PROMPTS, build_prompt  # noqa: F401  (their home: prompts.py)
from dftune.records import gsm8k_final

PAPER_FIVE = ("math500", "minerva_math", "olympiadbench", "aime24", "amc23")
BENCHMARKS = PAPER_FIVE + ("gsm8k", "aime25")
# Hub copies: (repository, config, split), and the fields each has (from its dataset card
# and viewer), where they differ from the paper's local files:
#   HuggingFaceH4/MATH-500   problem, solution, answer, subject, level, unique_id (as local)
#   math-ai/minervamath      question, answer (local: problem, solution with a \boxed{} answer)
#   math-ai/olympiadbench    question, final_answer (list), is_multiple_answer, context, ... (as local)
#   math-ai/aime24           id, problem, solution (the answer alone, possibly boxed), url
#                            (local: problem, solution (the full solution), answer)
#   math-ai/amc23            id, question, answer, url (local also has problem)
#   math-ai/aime25           id, problem, answer (local: question, answer)
#   openai/gsm8k (main)      question, answer ("... #### 72") (as local)
HUB = {
    "math500": ("HuggingFaceH4/MATH-500", "", "test"),
    "aime24": ("math-ai/aime24", "", "test"),
    "amc23": ("math-ai/amc23", "", "test"),
    "aime25": ("math-ai/aime25", "", "test"),
    "minerva_math": ("math-ai/minervamath", "", "test"),
    "olympiadbench": ("math-ai/olympiadbench", "", "test"),
    "gsm8k": ("openai/gsm8k", "main", "test"),
}


class BenchmarkError(UserError, ValueError):
    pass


@dataclass
class Problem:
    benchmark: str
    id: str
    question: str
    golds: list[str]  # every part must match (OlympiadBench multi-answer records)


def _field(rec: dict, key: str, where: str):
    if key not in rec or rec[key] is None:
        raise BenchmarkError(f"{where}: missing field {key!r}")
    return rec[key]


def _number(x) -> str:
    """27.0 -> '27'; 2.5 -> '2.5'; '025' stays (math-verify reads it as 25)."""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x).strip()


def _question(rec: dict, where: str) -> str:
    return (rec.get("problem") or _field(rec, "question", where)).strip()


def to_problem(name: str, rec: dict, index: int, where: str) -> Problem:
    """One record of benchmark ``name`` as a Problem, in the local or the Hub layout; a
    missing field is a clear error naming the file, row and field."""
    rid = str(rec.get("id", rec.get("unique_id", rec.get("idx", index))))
    if name == "math500":
        return Problem(name, rid, _question(rec, where), [str(_field(rec, "answer", where))])
    if name == "minerva_math":
        if rec.get("solution") is None and rec.get("answer") is not None:  # Hub: question, answer
            return Problem(name, rid, _question(rec, where), [str(rec["answer"]).strip()])
        if rec.get("solution") is None:
            raise BenchmarkError(f"{where}: missing field 'solution' (with a \\boxed{{}} answer) or 'answer'")
        boxes = boxed_contents(rec["solution"])
        if not boxes:
            raise BenchmarkError(f"{where}: field 'solution' has no \\boxed{{}} answer")
        return Problem(name, rid, _question(rec, where), [boxes[-1]])
    if name == "olympiadbench":
        finals = _field(rec, "final_answer", where)
        if not isinstance(finals, list) or not finals:
            raise BenchmarkError(f"{where}: field 'final_answer' must be a non-empty list")
        golds = [f.replace("$", "").strip() for f in finals]
        if rec.get("is_multiple_answer") and len(golds) == 1:  # "(1,2), (3,4)" in one string: every part
            golds = split_top_level(golds[0])
        question = _field(rec, "question", where).strip()
        if rec.get("context"):
            question = f"{rec['context'].strip()}\n\n{question}"
        return Problem(name, rid, question, golds)
    if name in ("aime24", "aime25", "amc23"):
        if rec.get("answer") is None and isinstance(rec.get("solution"), str):  # Hub aime24: the answer
            boxes = boxed_contents(rec["solution"])
            answer = boxes[-1] if boxes else rec["solution"].strip()
            if not boxes and len(answer) > 40:
                raise BenchmarkError(f"{where}: no field 'answer', and field 'solution' is neither an answer "
                                     "nor has a \\boxed{} one")
            return Problem(name, rid, _question(rec, where), [answer])
        return Problem(name, rid, _question(rec, where), [_number(_field(rec, "answer", where))])
    if name == "gsm8k":
        answer = _field(rec, "answer", where)
        final = gsm8k_final(answer)
        if not final:
            raise BenchmarkError(f"{where}: field 'answer' has no '#### N' final answer")
        return Problem(name, rid, _field(rec, "question", where).strip(), [final])
    # any other NAME/test.jsonl in the data folder: question (or problem) and answer fields
    question = (rec.get("question") or _field(rec, "problem", where)).strip()
    return Problem(name, rid, question, [_number(_field(rec, "answer", where))])


def data_dir(explicit: str | None = None) -> Path | None:
    d = explicit or os.environ.get("DFTUNE_DATA_DIR")
    return Path(d) if d else None


def problems_hash(problems: list[Problem]) -> str:
    """A content hash of what an evaluation uses of a benchmark: ids, questions, golds."""
    data = json.dumps([[p.id, p.question, p.golds] for p in problems], ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def load_benchmark(name: str, directory: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    """Problems of one benchmark (the first ``limit``; 0 or None: all), from a local folder or the Hub."""
    d = data_dir(str(directory) if directory else None)
    if name not in BENCHMARKS and (d is None or not (d / name / "test.jsonl").is_file()):
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}, or NAME/test.jsonl "
                             "(question/answer fields) under --data-dir")
    if d is not None:
        path = d / name / "test.jsonl"
        if not path.is_file():
            raise BenchmarkError(f"{path}: benchmark file not found (expected {name}/test.jsonl under {d})")
        rows = []
        with path.open() as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((f"{path}:{i}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise BenchmarkError(f"{path}, row {i}: not valid JSON ({e.msg})") from None
    else:
        try:
            import datasets
        except ImportError as e:
            raise BenchmarkError("no --data-dir / DFTUNE_DATA_DIR given, and 'datasets' is missing for the Hub") from e
        repo, config, split = HUB[name]
        ds = datasets.load_dataset(repo, config or None, split=split)
        rows = [(f"{repo} ({split}), row {i}", dict(r)) for i, r in enumerate(ds, 1)]
    problems, seen = [], {}
    for i, (where, rec) in enumerate(rows):
        p = to_problem(name, rec, i, where)
        if p.id in seen:  # results are stored and resumed by (benchmark, id)
            raise BenchmarkError(f"{where}: id {p.id!r} is already used by {seen[p.id]}")
        seen[p.id] = where
        problems.append(p)
    return problems[:limit] if limit else problems
