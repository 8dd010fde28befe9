"""Token classes from a real (tiny, offline) tokenizer: special, number, punct, content."""

import pytest
import torch
from transformers import AutoTokenizer

from dftune.data import PLAIN_TEMPLATE
from dftune.vocab import CLASS_IDS, CLASS_NAMES, CONTENT, NUMBER, PUNCT, SPECIAL, end_of_turn_ids, token_classes


@pytest.fixture
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def _one(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


CASES = [
    ("<|endoftext|>", SPECIAL), ("<|im_start|>", SPECIAL), ("<|im_end|>", SPECIAL), ("<pad>", SPECIAL),
    ("7", NUMBER), (" 12", NUMBER), ("13", NUMBER),
    (".", PUNCT), ("\n", PUNCT), ("{", PUNCT), (" $\\", PUNCT), ("}$.", PUNCT),
    ("We", CONTENT), (" add", CONTENT), ("boxed", CONTENT), (" answer", CONTENT),
]


@pytest.mark.parametrize("text, cls", CASES)
def test_token_classes_of_known_tokens(tok, text, cls):
    classes = token_classes(tok)
    assert classes.shape == (len(tok),) and classes.dtype == torch.long
    assert CLASS_NAMES[int(classes[_one(tok, text)])] == CLASS_NAMES[cls]


def test_every_class_is_present_and_specials_are_exactly_the_added_tokens(tok):
    classes = token_classes(tok)
    counts = torch.bincount(classes, minlength=4)
    assert all(counts > 0)
    assert set((classes == SPECIAL).nonzero().flatten().tolist()) == set(tok.all_special_ids)
    assert CLASS_IDS == {"content": 0, "special": 1, "number": 2, "punct": 3}


def test_end_of_turn_from_the_chat_template(tok):
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    assert end_of_turn_ids(tok) == [eos, im_end]
    tok.chat_template = PLAIN_TEMPLATE  # "Assistant: ...{eos}": the end of turn is EOS itself
    assert end_of_turn_ids(tok) == [eos]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}"  # plain-text separator: nothing added
    assert end_of_turn_ids(tok) == [eos]
    tok.chat_template = "{{ raise_exception('needs a system turn') }}"
    assert end_of_turn_ids(tok) == [eos]
    tok.chat_template = None
    assert end_of_turn_ids(tok) == [eos]


def test_padded_vocabulary_and_extra_special(tok):
    n = len(tok)
    classes = token_classes(tok, vocab_size=n + 8, extra_special=["#", " answer"])
    assert classes.shape == (n + 8,) and torch.all(classes[n:] == CONTENT)
    assert classes[_one(tok, "#")] == SPECIAL and classes[_one(tok, " answer")] == SPECIAL
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        token_classes(tok, vocab_size=n - 1)
