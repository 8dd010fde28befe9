"""Memory per GPU under FSDP2 in bf16-mixed, for the paper's models: computed from their
shapes, and the gradient memory held between micro-batches measured (2 CPU processes).

    python benchmarks/fsdp_memory.py                  # the paper's five models on 8 GPUs (and 1, 4)
    python benchmarks/fsdp_memory.py --measure        # 2 gloo processes: gradient bytes between micro-batches

Per GPU, with W GPUs and P parameters (bf16-mixed: fp32 master weights, bf16 compute):
  states        fp32 master weights 4P/W + fp32 gradients 4P/W + AdamW's two fp32 moments 8P/W = 16P/W
  gathered      the root's bf16 parameters (input embedding, final norm, LM head), kept from
                forward to backward, + two decoder layers in bf16 (the one computing, the one
                prefetched): 2 x (root + 2 x layer)
  loss          the chunked loss's fp32 (V, H) LM-head gradient buffer and its bf16 copy handed to
                FSDP's gathered head: 6 V H (one GPU, no FSDP: the buffer becomes the fp32 gradient
                itself, already counted in the states)
  reference     a frozen reference (iw_sft, asft, psft, train.log_kl), sharded in bf16: 2P/W
                (one GPU, no FSDP: an fp32 copy, 4P)
  no reduction  what FSDP2's accumulation without reduction would add (``set_requires_gradient_sync
                (False)`` on all but the last micro-batch: every parameter's unsharded gradient,
                upcast to fp32): 4P. dftune reduces after every micro-batch instead (dist.grad_sync).
Not counted: activations (they scale with micro-batch x sequence x layers; gradient
checkpointing keeps one bf16 (B, T, H) tensor per layer), the CUDA context, allocator slack.
Parameter counts are exact: each model is built on the meta device from its shape.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
# The paper's models (their config.json): arch, hidden, layers, heads, kv heads, intermediate, vocab, tied
MODELS = {
    "Qwen2.5-Math-1.5B": ("qwen2", 1536, 28, 12, 2, 8960, 151936, True),
    "Qwen2.5-Math-7B": ("qwen2", 3584, 28, 28, 4, 18944, 152064, False),
    "LLaMA-3.2-3B": ("llama", 3072, 28, 24, 8, 8192, 128256, True),
    "LLaMA-3.1-8B": ("llama", 4096, 32, 32, 8, 14336, 128256, False),
    "DeepSeekMath-7B-Base": ("llama", 4096, 30, 32, 32, 11008, 102400, False),
}


def counts(arch, hidden, layers, heads, kv, inter, vocab, tie) -> dict:
    """Parameter counts of the whole model, one decoder layer, and the root (embedding, norm, head)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    config = cls(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                 num_key_value_heads=kv, intermediate_size=inter, tie_word_embeddings=tie)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    return {"P": total, "layer": layer, "root": total - layers * layer, "V": vocab, "H": hidden}


def per_gpu(c: dict, world: int) -> dict:
    p = c["P"]
    return {"states": 16 * p / world, "gathered": 2 * (c["root"] + 2 * c["layer"]),
            "loss": 6 * c["V"] * c["H"] if world > 1 else 0,
            # one GPU (no FSDP): the reference is an fp32 copy, read under autocast as the model is
            "reference": 2 * p / world if world > 1 else 4 * p, "no_reduction": 4 * p}


def table(worlds: list[int]) -> None:
    print("| model | parameters | GPUs | states 16P/W | gathered (bf16) | loss head grad | total | + reference | "
          "+ accumulation without reduction (4P) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, shape in MODELS.items():
        c = counts(*shape)
        for w in worlds:
            m = per_gpu(c, w)
            gathered = m["gathered"] if w > 1 else 0.0  # one GPU: nothing is sharded, nothing gathered
            total = m["states"] + gathered + m["loss"]
            print(f"| {name} | {c['P'] / 1e9:.2f}B | {w} | {m['states'] / GIB:.1f} GiB | {gathered / GIB:.1f} GiB | "
                  f"{m['loss'] / GIB:.1f} GiB | **{total / GIB:.1f} GiB** | +{m['reference'] / GIB:.1f} GiB | "
                  f"{'+' + format(m['no_reduction'] / GIB, '.1f') + ' GiB' if w > 1 else '-'} |")


# ---- the measurement: gradient bytes each process holds after a micro-batch that is not the last ----


def child() -> None:
    import torch.distributed as dist_

    from dftune import dist
    from dftune.model import CausalLMLoss
    from dftune.objective_spec import get_objective
    from dftune.tiny import build_model

    rt = dist.init_runtime()
    torch.manual_seed(0)
    model = build_model(32000, hidden=512, layers=4, heads=8, intermediate=1408, arch="qwen2")
    params = sum(p.numel() for p in model.parameters())
    module = dist.parallelize(CausalLMLoss(model, get_objective("dft")), model, rt, "fsdp", mixed_bf16=True)
    ids = torch.randint(0, 32000, (2, 64))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    out = {"rank": rt.rank, "world": rt.world, "parameters": params}
    for mode in ("dftune", "no_reduction"):
        if mode == "no_reduction":
            module.set_requires_gradient_sync(False)  # FSDP2's own accumulation
        with dist.grad_sync(module, False):  # a micro-batch that is not the step's last
            module(**batch, num_items=128).loss.backward()
        out[mode] = _gradient_bytes(module)
        module.set_requires_gradient_sync(True)
        module(**batch, num_items=128).loss.backward()  # the last micro-batch: everything reduced
        for p in module.parameters():
            p.grad = None
    dist_.barrier()
    print(json.dumps(out), flush=True)
    rt.close()


def _gradient_bytes(module) -> int:
    """Bytes of every gradient this process holds: the sharded ``.grad`` of each parameter and
    the unsharded ones FSDP2 keeps while it accumulates without reducing (its private state:
    ``FSDPParam.unsharded_accumulated_grad`` / the unsharded parameter's ``.grad``)."""
    total = sum(p.grad.to_local().nbytes for p in module.parameters() if p.grad is not None)
    for m in module.modules():
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        for group in getattr(state, "_fsdp_param_groups", None) or []:
            for fp in group.fsdp_params:
                acc = getattr(fp, "unsharded_accumulated_grad", None)
                raw = getattr(getattr(fp, "_unsharded_param", None), "grad", None)
                total += sum(t.nbytes for t in (acc, raw) if t is not None)
    return total


def measure() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                        __file__, "--child"], capture_output=True, text=True, env=env, timeout=900)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    rows = sorted((json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")), key=lambda d: d["rank"])
    p = rows[0]["parameters"]
    print(f"# 2 gloo processes, a Qwen2-shaped model of {p / 1e6:.1f}M parameters, bf16-mixed: gradient bytes held "
          f"after a micro-batch that is not the step's last (fp32: 4P = {4 * p / 2**20:.0f} MiB, 4P/2 = "
          f"{2 * p / 2**20:.0f} MiB)")
    print("| process | dftune (reduce every micro-batch) | FSDP2 accumulation without reduction | ratio |")
    print("|---|---|---|---|")
    for d in rows:
        print(f"| {d['rank']} | {d['dftune'] / 2**20:.0f} MiB | {d['no_reduction'] / 2**20:.0f} MiB | "
              f"{d['no_reduction'] / d['dftune']:.2f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,4,8", help="GPU counts for the table")
    ap.add_argument("--measure", action="store_true", help="measure the gradient memory with 2 CPU processes")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child()
    table([int(x) for x in a.gpus.split(",")])
    if a.measure:
        measure()


if __name__ == "__main__":
    main()
