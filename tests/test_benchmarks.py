"""Every benchmark file: reference solutions graded against their own gold answers."""

import json

import pytest

from dftune.data import gsm8k_boxed
from dftune.eval.benchmarks import BENCHMARKS, BenchmarkError, build_prompt, load_benchmark, to_problem
from dftune.eval.grade import grade_batch

# Minimum verification rates, and what is graded: each record's own reference solution
# where one ends in a final answer; for OlympiadBench (proofs without a boxed answer)
# and AMC23/AIME25 (no solutions), a completion that boxes the gold's own parts, which
# checks our gold parsing and the multi-answer rule.
EXPECTED = {"math500": 0.99, "minerva_math": 0.99, "aime24": 0.9, "gsm8k": 0.99,
            "olympiadbench": 0.97, "amc23": 1.0, "aime25": 1.0}


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
    assert build_prompt("Q", "plain").startswith("Question: Q\nPlease reason")
    with pytest.raises(BenchmarkError, match="chat template"):
        build_prompt("Q", "chat", None)
