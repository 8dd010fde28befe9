"""Every benchmark file: reference solutions graded against their own gold answers."""

import json

import pytest

from dftune.eval import benchmarks
from dftune.eval.benchmarks import (
    BENCHMARKS,
    BenchmarkError,
    build_prompt,
    load_benchmark,
    problems_hash,
    to_problem,
)
from dftune.eval.grade import grade_batch
from dftune.records import gsm8k_boxed

# Minimum verification rates, and what is graded: each record's own reference solution
# where one ends in a final answer; for OlympiadBench (proofs without a boxed answer)
# and AMC23/AIME25 (no solutions), a completion that boxes the gold's own parts, which
# checks our gold parsing and the multi-answer rule.
# (The grader before math-verify's extraction: the same, except aime24 at 29/30.)
EXPECTED = {"math500": 1.0, "minerva_math": 1.0, "aime24": 1.0, "gsm8k": 1.0, "olympiadbench": 1.0, "amc23": 1.0,
            "aime25": 1.0}


def _reference_completions(name, rows, problems):
    if name in ("math500", "minerva_math", "aime24"):
        return [r["solution"] for r in rows]
    if name == "gsm8k":
        return [gsm8k_boxed(r["answer"]) for r in rows]
    if name == "olympiadbench":
        return [" and ".join(f"\\boxed{{{f.replace('$', '')}}}" for f in r["final_answer"]) for r in rows]
    return [f"So the answer is \\boxed{{{r['answer']}}}." for r in rows]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_reference_answers_verify(name, shared_data, capsys):
    d = shared_data / "benchmarks"
    problems = load_benchmark(name, d)
    rows = [json.loads(line) for line in (d / name / "test.jsonl").read_text().splitlines() if line.strip()]
    assert len(problems) == len(rows) > 0
    verdicts = grade_batch(list(zip(_reference_completions(name, rows, problems), [p.golds for p in problems])), workers=2)
    rate = sum(v.correct for v in verdicts) / len(verdicts)
    with capsys.disabled():
        print(f"\n{name}: {rate:.1%} of {len(verdicts)} reference answers verify")
    assert rate >= EXPECTED[name]


def test_gold_parsing_per_benchmark():
    assert to_problem("amc23", {"question": "q", "answer": 27.0}, 0, "x").golds == ["27"]
    assert to_problem("aime24", {"problem": "q", "answer": "025"}, 0, "x").golds == ["025"]
    assert to_problem("gsm8k", {"question": "q", "answer": "a\n#### 1,234"}, 0, "x").golds == ["1234"]
    p = to_problem("minerva_math", {"problem": "q", "solution": "\\boxed{1} then \\boxed{2 \\mathrm{~cm}}"}, 0, "x")
    assert p.golds == ["2 \\mathrm{~cm}"]
    p = to_problem("olympiadbench", {"question": "q", "final_answer": ["$(1,2), (3,4)$"], "is_multiple_answer": True,
                                     "context": "ctx"}, 0, "x")
    assert p.golds == ["(1,2)", "(3,4)"] and p.question.startswith("ctx")


@pytest.mark.parametrize(
    "name, rec, match",
    [("math500", {"problem": "q"}, "missing field 'answer'"),
     ("minerva_math", {"problem": "q", "solution": "no box"}, "no \\\\boxed"),
     ("gsm8k", {"question": "q", "answer": "12"}, "####"),
     ("olympiadbench", {"question": "q", "final_answer": []}, "non-empty list"),
     ("custom", {"question": "q"}, "missing field 'answer'")],
)
def test_bad_records(name, rec, match):
    with pytest.raises(BenchmarkError, match=match):
        to_problem(name, rec, 0, "file.jsonl:3")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(BenchmarkError, match="math500/test.jsonl"):
        load_benchmark("math500", tmp_path)
    with pytest.raises(BenchmarkError, match="unknown benchmark 'nope'"):
        load_benchmark("nope", tmp_path)


def test_duplicate_ids_are_a_clear_error(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "test.jsonl").write_text('{"id": "a", "question": "q", "answer": "1"}\n'
                                                 '{"id": "a", "question": "r", "answer": "2"}\n')
    with pytest.raises(BenchmarkError, match="test.jsonl:2: id 'a' is already used by .*test.jsonl:1"):
        load_benchmark("toy", tmp_path)


def test_custom_benchmark_folder(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "test.jsonl").write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n'
                                                 '{"id": "b", "problem": "2+2?", "answer": 4.0}\n')
    ps = load_benchmark("toy", tmp_path)
    assert [(p.id, p.question, p.golds) for p in ps] == [("a", "1+1?", ["2"]), ("b", "2+2?", ["4"])]


def test_prompts():
    p = build_prompt("What is 1+1?", "qwen-boxed")
    assert p == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 1+1?\n"
                 "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
                 "<|im_start|>assistant\n")
    assert build_prompt("  Q \n", "plain") == build_prompt("Q", "deepseek-math") == (
        "User: Q\nPlease reason step by step, and put your final answer within \\boxed{}.\n\nAssistant:")
    with pytest.raises(ValueError, match="chat template"):
        build_prompt("Q", "chat", None)


# One record per Hub copy, in that copy's own layout (see benchmarks.HUB), and the problem
# it must give.
HUB_RECORDS = [
    ("minerva_math", {"question": "How far?", "answer": "4.5 \\mathrm{~cm}"}, "How far?", ["4.5 \\mathrm{~cm}"]),
    ("aime24", {"id": 60, "problem": "Aya walks.", "solution": "204", "url": "u"}, "Aya walks.", ["204"]),
    ("aime24", {"id": 61, "problem": "Q", "solution": "\\boxed{025}", "url": "u"}, "Q", ["025"]),
    ("amc23", {"id": 0, "question": "Cities?", "answer": 27.0, "url": "u"}, "Cities?", ["27"]),
    ("aime25", {"id": "0", "problem": "Six points.", "answer": "468"}, "Six points.", ["468"]),
    ("olympiadbench", {"id": 1606, "question": "Xenia?", "final_answer": ["$2$"], "is_multiple_answer": False,
                       "context": None}, "Xenia?", ["2"]),
    ("math500", {"problem": "Convert.", "solution": "s", "answer": "\\frac{1}{2}", "unique_id": "t/1.json"},
     "Convert.", ["\\frac{1}{2}"]),
    ("gsm8k", {"question": "Ducks?", "answer": "16 - 3 = 13\n#### 13"}, "Ducks?", ["13"]),
]


@pytest.mark.parametrize("name, rec, question, golds", HUB_RECORDS)
def test_hub_layouts_map_to_problems(name, rec, question, golds, tmp_path):
    p = to_problem(name, rec, 0, "hub:1")
    assert (p.question, p.golds) == (question, golds)
    (tmp_path / name).mkdir()  # the same record in a local file in the Hub layout
    (tmp_path / name / "test.jsonl").write_text(json.dumps(rec) + "\n")
    [q] = load_benchmark(name, tmp_path)
    assert (q.question, q.golds) == (question, golds)


def test_hub_code_path_reads_a_folder_in_the_hub_layout(tmp_path, monkeypatch):
    pytest.importorskip("datasets", reason="the Hub path needs `datasets` (dftune[hub])")
    repo = tmp_path / "math-ai" / "minervamath"  # what `datasets` finds for the Hub id, as a local folder
    repo.mkdir(parents=True)
    (repo / "test.jsonl").write_text("".join(json.dumps({"question": f"Q{i}?", "answer": str(i)}) + "\n"
                                             for i in range(3)))
    monkeypatch.delenv("DFTUNE_DATA_DIR", raising=False)
    monkeypatch.setitem(benchmarks.HUB, "minerva_math", (str(repo), "", "test"))
    ps = load_benchmark("minerva_math", limit=2)
    assert [(p.question, p.golds) for p in ps] == [("Q0?", ["0"]), ("Q1?", ["1"])]
    with pytest.raises(BenchmarkError, match="row 1: missing field 'solution' .* or 'answer'"):
        to_problem("minerva_math", {"question": "Q"}, 0, f"{repo} (test), row 1")


def test_problems_hash_follows_the_content():
    a = [to_problem("aime25", {"question": "Q", "answer": "1"}, 0, "x")]
    b = [to_problem("aime25", {"question": "Q", "answer": "2"}, 0, "x")]
    assert problems_hash(a) == problems_hash(list(a)) != problems_hash(b)
