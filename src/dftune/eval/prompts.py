"""Evaluation prompts: their text, where generation stops, and the BOS token, per prompt style.

    from dftune.eval.prompts import build_prompt, prompt_ids, stop_settings
    text = build_prompt("What is 1+1?", "llama-base-boxed")
    ids = prompt_ids(tokenizer, text)             # BOS once, when the tokenizer uses one
    token_ids, strings = stop_settings(tokenizer, "llama-base-boxed", "paper", "meta-llama/Llama-3.2-3B")

Styles. ``qwen-boxed``, ``llama-base-boxed`` and ``deepseek-math`` are the exact texts of
the paper's harness (its prompt templates of those names; which the paper used: Qwen
models qwen-boxed, LLaMA llama-base-boxed, DeepSeekMath deepseek-math). ``chat`` is the
model's own chat template around the same instruction; ``plain`` is the layout of training
with ``data.chat_template=plain`` ("User: ...\\n\\nAssistant:", the same text as
deepseek-math); ``auto`` picks one (``resolve_prompt``).

BOS. The harness hands vLLM prompt strings, which its tokenizer encodes with a BOS for
LLaMA and DeepSeek; a chat template's text may hold the BOS already, and encoding that
again gives two. Both backends here encode prompts with ``prompt_ids``: the text's own
tokens, then the BOS in front when the tokenizer adds one and the text does not start
with it. Exactly one BOS, or none for tokenizers without (Qwen).

Stops (``stop_settings``, the ``eval.stops`` policy), besides EOS, which always stops:

- ``end-of-turn`` (default): chat-format styles stop at ``dftune.vocab.end_of_turn_ids``
  (the chat template's end-of-turn token; for qwen-boxed also Qwen's ``<|im_end|>`` /
  ``<|endoftext|>`` where the vocabulary has them); the
  base-model styles stop at their own ends of turn (llama-base-boxed: ``<|eot_id|>``,
  ``<|end_of_text|>``), and at the harness's stop strings; plain also at "\\n\\nUser:" (a
  turn it invents).
- ``paper``: as the harness: its stop strings (``HARNESS_STOP_STRINGS``) for every style,
  and stop tokens ``<|im_end|>`` / ``<|endoftext|>`` only when the model's path contains
  "qwen2" (the harness's ids 151645 / 151643 are those tokens in Qwen2 vocabularies),
  ``<｜end▁of▁sentence｜>`` (its 100001) only when it contains "deepseek", else none. So
  a Qwen checkpoint saved as runs/dft/final is NOT stopped at ``<|im_end|>`` by the paper's
  harness: a special token is no stop string to vLLM, which matches strings in the text
  it returns, without special tokens; the model runs on to EOS.
- ``eos``: EOS only.
"""

from __future__ import annotations

from dftune.errors import UserError
from dftune.eval.paper_answer import HARNESS_STOP_STRINGS
from dftune.vocab import end_of_turn_ids

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPTS = ("qwen-boxed", "llama-base-boxed", "deepseek-math", "chat", "plain", "auto")
STOP_POLICIES = ("end-of-turn", "paper", "eos")
CHAT_STYLES = ("qwen-boxed", "chat")
_TEMPLATES = {
    "qwen-boxed": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                   "<|im_start|>assistant\n"),
    "llama-base-boxed": ("<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|end_of_text|>\n"
                         "<|start_header_id|>user<|end_header_id|>\n\n{user}<|end_of_text|>\n"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "deepseek-math": "User: {user}\n\nAssistant:",
    "plain": "User: {user}\n\nAssistant:",
}
QWEN2_STOPS = ("<|im_end|>", "<|endoftext|>")
DEEPSEEK_STOPS = ("<\uff5cend\u2581of\u2581sentence\uff5c>",)
LLAMA_TURN_ENDS = ("<|eot_id|>", "<|end_of_text|>")


class PromptError(UserError, ValueError):
    pass


def check_prompt_settings(prompt: str, stops: str, where: str = "eval") -> None:
    """A one-line error for an unknown prompt style or stop policy (before anything loads)."""
    if prompt not in PROMPTS:
        raise PromptError(f"{where}.prompt: unknown prompt style {prompt!r}; choose from {', '.join(PROMPTS)}")
    if stops not in STOP_POLICIES:
        raise PromptError(f"{where}.stops: unknown stop policy {stops!r}; choose from {', '.join(STOP_POLICIES)}")


def _has(tok, token: str) -> bool:
    return isinstance(tok.get_vocab().get(token), int)


def resolve_prompt(style: str, tokenizer, chat_template: str = "") -> str:
    """The concrete style of ``style``. auto: the layout the model was trained on where a
    run says so (``chat_template`` "plain": plain), else the paper's prompt for the model's
    family, told by its vocabulary: LLaMA-3 (header tokens) llama-base-boxed, ChatML (Qwen)
    qwen-boxed, any other deepseek-math. chat needs a chat template: checked here, before any model loads."""
    if style == "auto":
        if chat_template == "plain":
            return "plain"
        if tokenizer is not None and _has(tokenizer, "<|start_header_id|>"):
            return "llama-base-boxed"
        if tokenizer is not None and _has(tokenizer, "<|im_start|>"):
            return "qwen-boxed"
        return "deepseek-math"
    if style == "chat" and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
        raise PromptError("prompt 'chat' needs a tokenizer with a chat template; use qwen-boxed, llama-base-boxed, "
                          "deepseek-math or plain")
    if style not in PROMPTS:
        raise PromptError(f"unknown prompt style {style!r}; choose from {', '.join(PROMPTS)}")
    return style


def build_prompt(question: str, style: str, tokenizer=None) -> str:
    """The prompt text for ``question`` (stripped, as the harness does) in ``style`` (not auto)."""
    user = f"{question.strip()}\n{INSTRUCTION}"
    if style == "chat":
        resolve_prompt(style, tokenizer)
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    if style not in _TEMPLATES:
        raise PromptError(f"unknown prompt style {style!r}; choose from {', '.join(PROMPTS[:-1])} (auto is resolved "
                          "first: resolve_prompt)")
    return _TEMPLATES[style].format(user=user)


def adds_bos(tok) -> bool:
    """Does the tokenizer put a BOS token in front of what it encodes?"""
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def prompt_ids(tok, text: str, bos: bool | None = None) -> list[int]:
    """The token ids of a prompt: its text's own tokens, with the tokenizer's BOS in front
    when it uses one (``bos``: ``adds_bos(tok)``, passed to avoid recomputing it) and the
    text does not already start with it."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if bos is None:
        bos = adds_bos(tok)
    if bos and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    return ids


def _ids(tok, tokens) -> list[int]:
    vocab = tok.get_vocab()
    return [vocab[t] for t in tokens if isinstance(vocab.get(t), int)]


def stop_settings(tok, style: str, policy: str, model_path: str = "") -> tuple[list[int], list[str]]:
    """(stop token ids besides EOS, stop strings) for prompts of ``style`` under ``policy``
    (see the module docstring); ``model_path`` matters only to the paper policy."""
    if policy == "eos":
        return [], []
    if policy == "paper":
        path = model_path.lower()
        tokens = QWEN2_STOPS if "qwen2" in path else DEEPSEEK_STOPS if "deepseek" in path else ()
        ids = [i for i in _ids(tok, tokens) if i != tok.eos_token_id]
        return sorted(set(ids)), list(HARNESS_STOP_STRINGS)
    if policy != "end-of-turn":
        raise PromptError(f"unknown stop policy {policy!r}; choose from {', '.join(STOP_POLICIES)}")
    if style in CHAT_STYLES:  # the one definition (dftune.vocab), less EOS, which always stops
        return [i for i in end_of_turn_ids(tok, style) if i != tok.eos_token_id], []
    ids = _ids(tok, LLAMA_TURN_ENDS + DEEPSEEK_STOPS) if style == "llama-base-boxed" else _ids(tok, DEEPSEEK_STOPS)
    strings = list(HARNESS_STOP_STRINGS) + (["\n\nUser:"] if style == "plain" else [])
    return sorted({i for i in ids if i != tok.eos_token_id}), strings


def stop_description(tok, token_ids: list[int], strings: list[str]) -> dict:
    """What an evaluation records of its stops: the tokens by name (comparable across
    tokenizers, unlike ids), and the strings."""
    return {"tokens": sorted(tok.convert_ids_to_tokens(i) for i in token_ids), "strings": list(strings)}
