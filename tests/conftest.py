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
