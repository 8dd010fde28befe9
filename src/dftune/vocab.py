"""Classes of vocabulary tokens: special/template, numbers, punctuation/whitespace, content.

DFT's weight is the token's own probability, so tokens a base model has never had to
predict (the end-of-turn token of a chat template, template markers, an answer layout)
start near p = 0 and get almost no gradient: the model never learns to stop. Objectives
with ``protect=special`` train those classes with NLL, and the probe reports statistics
per class. A class is a property of the token id, computed once per tokenizer:

    special  every id in ``all_special_ids``, every added token (chat-template markers such
             as <|im_start|>, <|im_end|>, <|eot_id|>, <think>), the token the chat template
             puts right after an assistant turn (end-of-turn), and ``extra_special`` strings;
    number   the decoded text is digits with number punctuation (" 12", "3", ".5", "1,0");
    punct    the decoded text is only whitespace, punctuation or symbols ("\\n\\n", ",", " $");
    content  everything else (words, word pieces, partial UTF-8 bytes).

    classes = token_classes(tokenizer, vocab_size=model.get_output_embeddings().weight.shape[0])
    token_loss(hidden, weight, labels, "dft:protect=special", token_class=classes)
"""

from __future__ import annotations

import unicodedata

import torch

CLASS_NAMES = ("content", "special", "number", "punct")
CLASS_IDS = {name: i for i, name in enumerate(CLASS_NAMES)}
CONTENT, SPECIAL, NUMBER, PUNCT = range(4)
_MARK = "\u2063dftune-turn\u2063"  # an assistant message no template rewrites


def _render(tokenizer, messages, **kw):
    return tokenizer.apply_chat_template(messages, tokenize=False, **kw)


# Qwen's evaluation stops chat-format prompts at these too, besides the model's EOS
QWEN_END_OF_TURN = ("<|im_end|>", "<|endoftext|>")


def end_of_turn_ids(tokenizer, prompt_style: str = "chat") -> list[int]:
    """The tokens that end a response, the one definition (generation stops at them, the
    probe and the analysis report their probability, ``protect=special`` trains them):
    EOS, then the special token the chat template writes right after an assistant message
    (<|im_end|>, <|eot_id|>, <end_of_turn>...), and for the paper's ``qwen-boxed`` prompt
    (Qwen's own chat format, whatever the tokenizer's template) Qwen's <|im_end|> and
    <|endoftext|> where the vocabulary has them as one token (Qwen's evaluation stops at both).

    Only a special or added token counts as the template's: a template that ends turns with
    plain text ("\\n\\n") adds nothing. Without a template (or one that fails to render),
    and for ``prompt_style`` plain (a completion prompt has no turns), EOS only.
    """
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if prompt_style == "plain":
        return ids
    marked = _added_or_special(tokenizer)
    if getattr(tokenizer, "chat_template", None):
        try:
            text = _render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARK}])
        except Exception:  # templates that demand a system turn, tools... : EOS is what we know
            text = ""
        if _MARK in text:
            after = text.split(_MARK, 1)[1]
            first = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
            if first and first[0] in marked:
                ids.append(int(first[0]))
    if prompt_style == "qwen-boxed":
        vocab = tokenizer.get_vocab()
        ids += [int(vocab[t]) for t in QWEN_END_OF_TURN if isinstance(vocab.get(t), int)]
    return list(dict.fromkeys(ids))


def _added_or_special(tokenizer) -> set[int]:
    out = {int(i) for i in tokenizer.all_special_ids}
    out |= {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    return out


def _text_class(text: str) -> int:
    core = text.strip()
    if not core:
        return PUNCT if text else CONTENT  # pure whitespace is layout; an empty decoding says nothing
    if "\ufffd" in core:  # a partial UTF-8 byte of a longer character
        return CONTENT
    if any(c.isdecimal() for c in core) and all(c.isdecimal() or c in ".,_" for c in core):
        return NUMBER
    if all(unicodedata.category(c)[0] in "PSZ" for c in core):
        return PUNCT
    return CONTENT


def token_classes(tokenizer, vocab_size: int | None = None, extra_special=()) -> torch.Tensor:
    """(V,) int64 class id of every token id (``CLASS_NAMES[i]`` names class i).

    vocab_size: the LM head's row count when it exceeds the tokenizer's (padded
    vocabularies); the extra ids are "content" (never targets). extra_special: strings
    whose tokens count as special too (a plain-text answer marker such as "####").
    """
    n = len(tokenizer)
    vocab = n if vocab_size is None else int(vocab_size)
    if vocab < n:
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer's {n} tokens")
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    classes = torch.tensor([_text_class(t) for t in texts] + [CONTENT] * (vocab - n), dtype=torch.long)
    special = _added_or_special(tokenizer) | set(end_of_turn_ids(tokenizer))
    for s in extra_special:
        special |= set(tokenizer(s, add_special_tokens=False)["input_ids"])
    special = [i for i in special if 0 <= i < vocab]
    classes[special] = SPECIAL
    return classes
