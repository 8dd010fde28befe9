"""Shared fixtures: tiny real HF models and tokenizers built offline, small data files."""

import json
import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SHARED = SHARED.resolve()

PROBLEMS = [
    {"problem": f"What is {a} plus {b}?", "solution": f"We add {a} and {b} to get {a + b}. So the answer is $\\boxed{{{a + b}}}$."}
    for a in range(1, 13) for b in range(2, 7)
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (head_dim 64) with a BPE tokenizer and a chat template."""
    from dftune.tiny import make_tiny

    texts = [r["problem"] + " " + r["solution"] for r in PROBLEMS] * 3
    texts += ["Please reason step by step, and put your final answer within \\boxed{}.", "You are a helpful assistant."]
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model", texts, vocab_size=320, hidden=64, layers=2, heads=1,
                     intermediate=128)


@pytest.fixture(scope="session")
def problems_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "problems.jsonl", PROBLEMS)


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED / "train").is_dir():
        pytest.skip(f"the shared data folder is absent ({SHARED})")
    return SHARED


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """The tokenised-data cache of every test (and of the processes they launch) in a
    temporary folder, not the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("data_cache")
    old = os.environ.get("DFTUNE_CACHE_DIR")
    os.environ["DFTUNE_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("DFTUNE_CACHE_DIR", None)
    else:
        os.environ["DFTUNE_CACHE_DIR"] = old


CHATTY_QUESTIONS = [(f"What is {a} plus {b}?", a + b) for a, b in [(2, 3), (4, 1), (3, 3), (5, 2)]]
CHATTY_AFTER = "\n<|im_start|>user\nAnd now? The answer is \\boxed{99}.<|im_end|>"  # the invented turn


def chatty_answer(total: int) -> str:
    return f"We add them to get {total}. The answer is \\boxed{{{total}}}."


@pytest.fixture(scope="session")
def chatty_dir(tmp_path_factory) -> Path:
    """A tiny Llama that writes its answer, <|im_end|>, an invented turn with another boxed
    answer, then EOS (<|endoftext|>, as Qwen base models), saved like any model folder."""
    import torch

    from dftune.eval.prompts import build_prompt
    from dftune.tiny import build_model, build_tokenizer

    prompts = [build_prompt(q, "qwen-boxed") for q, _ in CHATTY_QUESTIONS]
    texts = [p + chatty_answer(t) + "<|im_end|>" + CHATTY_AFTER + "<|endoftext|>"
             for p, (_, t) in zip(prompts, CHATTY_QUESTIONS)]
    tok = build_tokenizer(texts * 4, vocab_size=300)
    model = build_model(len(tok), hidden=64, layers=2, heads=1, intermediate=128, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(300):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05, loss.item()
    out = tmp_path_factory.mktemp("chatty") / "model"
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
