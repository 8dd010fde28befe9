"""Qwen2.5-0.5B's exact architecture (random weights, built offline, real ChatML ids) through
the path users run: `dftune train` in bf16-mixed with DFT, saved, reloaded in vLLM, generating.
Minutes on a CPU: marked slow (`pytest -m slow`). Measured on the 2-core dev VM: training
2 steps ~50 s at ~11 GiB peak RSS; vLLM start-up ~2 min."""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

GENERATE = """
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], dtype="bfloat16", gpu_memory_utilization=0.2, max_model_len=512, seed=0)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=16, stop_token_ids=json.loads(sys.argv[2]), seed=1)
    prompt = "<|im_start|>user\\nWhat is 2 plus 2?<|im_end|>\\n<|im_start|>assistant\\n"
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    print("RESULT " + json.dumps([[len(c.token_ids), c.finish_reason] for c in out.outputs]), flush=True)
"""


def test_qwen2_5_0_5b_shape_trains_bf16_mixed_and_serves_in_vllm(tmp_path, shared_data):
    pytest.importorskip("vllm")
    from transformers import AutoConfig

    from dftune.tiny import QWEN_SPECIALS, build_qwen_tokenizer, qwen2_5_0_5b

    rows = [json.loads(x) for x in (shared_data / "train" / "gsm8k_train.jsonl").read_text().splitlines()[:16]]
    tok = build_qwen_tokenizer([r["question"] + " " + r["answer"] for r in rows] * 3, 400)
    base = tmp_path / "base"
    qwen2_5_0_5b().to(torch.bfloat16).save_pretrained(base)
    tok.save_pretrained(base)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = tmp_path / "run"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dftune.cli", "train", f"model.name_or_path={base}", f"data.path={data}",
                        "data.max_length=256", "train.objective=dft", "train.precision=bf16-mixed",
                        "train.global_batch=4", "train.micro_batch=2", "train.max_steps=2", f"train.out={out}", "train.lr=1e-5"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=1800)
    seconds, peak = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"\nQwen2.5-0.5B shape, 2 bf16-mixed DFT steps: {seconds:.0f} s, peak RSS {peak:.1f} GiB")
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2] and all(x["grad_norm"] > 0 for x in log)
    final = out / "final"
    assert AutoConfig.from_pretrained(final).dtype == torch.bfloat16  # saved as the base was stored
    assert (final / "model.safetensors").stat().st_size < 1.2e9  # bf16, tied head stored once

    stops = [QWEN_SPECIALS["<|im_end|>"], QWEN_SPECIALS["<|endoftext|>"]]
    script = tmp_path / "generate.py"
    script.write_text(GENERATE)
    r = subprocess.run([sys.executable, str(script), str(final), json.dumps(stops)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # vLLM logs to stdout too (also after our line, at shutdown): read the marked line
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    outs = json.loads(line.removeprefix("RESULT "))
    assert len(outs) == 2 and all(0 < n <= 16 and reason in ("stop", "length") for n, reason in outs)
