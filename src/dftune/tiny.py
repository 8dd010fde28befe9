"""Tiny, real Hugging Face models built offline: a BPE tokenizer with a chat template,
trained on the data at hand, and a randomly initialised Llama saved with save_pretrained.

Tests use them (nothing is downloaded) and so does the tiny CPU config; the folder they
write loads with AutoModelForCausalLM / AutoTokenizer / vLLM like any other.

    dftune tiny-model out/tiny --data ../shared/data/train/gsm8k_train.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def build_tokenizer(texts, vocab_size: int = 512, split_digits: bool = False):
    """A byte-level BPE tokenizer (PreTrainedTokenizerFast) with a Qwen-style chat template.

    split_digits: one token per digit (as Qwen and LLaMA-3 tokenizers do), which small
    models need to learn arithmetic.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                        if split_digits else byte_level)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<pad>", bos_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(vocab_size: int, *, hidden: int = 128, layers: int = 2, heads: int = 2, intermediate: int = 256,
                max_positions: int = 2048, seed: int = 0, arch: str = "llama", eos_token_id: int = 0, pad_token_id=None,
                kv_heads: int = 0, tie: bool = False):
    """A randomly initialised causal LM (llama or qwen2). head_dim = hidden / heads (vLLM's
    CPU attention needs >= 32); kv_heads < heads for grouped-query attention; tie: share
    the embedding and LM-head weights (Qwen2.5-0.5B/1.5B, Llama-3.2 do)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = cls(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, intermediate_size=intermediate, max_position_embeddings=max_positions,
        tie_word_embeddings=tie, eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def texts_from(path: str, limit: int = 2000) -> list[str]:
    """Every string field of the first ``limit`` records of a data file, for the tokenizer."""
    from dftune.records import read_records

    out = []
    for _, rec in read_records(path)[:limit]:
        out += [v for v in rec.values() if isinstance(v, str)]
    return out


def make_tiny(out_dir: str | Path, texts, *, vocab_size: int = 512, seed: int = 0, split_digits: bool = False,
              **model_kw) -> Path:
    """Write a tokenizer and a random model to ``out_dir``; return the folder."""
    out = Path(out_dir)
    tok = build_tokenizer(texts, vocab_size, split_digits=split_digits)
    model = build_model(len(tok), seed=seed, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **model_kw)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@dataclass
class TinyConfig:
    """Settings of `dftune tiny-model` (a tiny random Llama and a BPE tokenizer, offline)."""

    out: str = ""
    """the folder to write (model + tokenizer, loadable by transformers and vLLM)."""
    data: str = ""
    """a data file whose text trains the tokenizer."""
    limit: int = 2000
    """records of it used for the tokenizer."""
    vocab_size: int = 512
    """the BPE vocabulary (plus 4 special tokens)."""
    hidden: int = 128
    """The model's width (head_dim = hidden / heads; vLLM on CPU needs head_dim >= 32)."""
    layers: int = 2
    """The model's depth."""
    heads: int = 2
    """Attention heads."""
    seed: int = 0
    """the initialisation."""


def make_tiny_from(cfg: TinyConfig) -> Path:
    from dftune.paths import data_problem
    from dftune.settings import Problems

    p = Problems()
    p.nonempty("out", cfg.out, "the folder to write")
    p.add(data_problem("data", cfg.data))
    for key in ("limit", "vocab_size", "hidden", "layers", "heads"):
        p.at_least(key, getattr(cfg, key), 1)
    p.check(cfg.heads < 1 or cfg.hidden % cfg.heads == 0,
            f"hidden: {cfg.hidden} is not a multiple of heads {cfg.heads}")
    p.raise_all()
    return make_tiny(cfg.out, texts_from(cfg.data, cfg.limit), vocab_size=cfg.vocab_size, seed=cfg.seed,
                     hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, intermediate=2 * cfg.hidden)


# ---- a real model shape with a real chat format -------------------------------------------

QWEN_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


def build_qwen_tokenizer(texts, base_vocab: int = 512):
    """A byte-level BPE tokenizer whose special tokens sit at Qwen2.5's ids (<|endoftext|>
    151643, <|im_start|> 151644, <|im_end|> 151645), with the ChatML template: the ids and
    layout real Qwen checkpoints use, built offline. Ids between the BPE vocabulary and
    151643 are unreachable fillers."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    small = build_tokenizer(texts, base_vocab, split_digits=True).backend_tokenizer
    spec = json.loads(small.to_str())["model"]
    vocab = {t: i for t, i in spec["vocab"].items() if t not in SPECIALS}
    vocab = {t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}  # contiguous from 0
    for i in range(len(vocab), QWEN_SPECIALS["<|endoftext|>"]):
        vocab[f"<|filler_{i}|>"] = i
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(QWEN_SPECIALS))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  bos_token=None, additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    assert [tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS] == list(QWEN_SPECIALS.values())
    tok.chat_template = CHAT_TEMPLATE
    return tok


LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_llama3_tokenizer(texts, vocab_size: int = 512):
    """A byte-level BPE tokenizer shaped like LLaMA-3's: it puts ``<|begin_of_text|>`` (BOS)
    in front of what it encodes, ends text with ``<|end_of_text|>`` (EOS), has the header and
    ``<|eot_id|>`` tokens, and a chat template that writes the BOS itself (as LLaMA-3's does)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tk = build_tokenizer(texts, vocab_size, split_digits=True).backend_tokenizer
    tk.add_special_tokens(specials)
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                      special_tokens=[("<|begin_of_text|>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  pad_token="<pad>", additional_special_tokens=specials[2:])
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    return tok


def qwen2_5_0_5b(seed: int = 0):
    """A randomly initialised model with Qwen2.5-0.5B's exact architecture: 24 layers,
    H=896, 14 heads, 2 KV heads, intermediate 4864, V=151,936, tied embeddings."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                         bos_token_id=151643, eos_token_id=151643, dtype="bfloat16")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.dtype = torch.bfloat16  # stored in bf16, as the released checkpoint is
    return model
