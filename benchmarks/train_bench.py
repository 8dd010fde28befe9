"""Tokens/s and peak memory of `dftune train` (DFT) against TRL's SFTTrainer(loss_type="dft").

Same model (a randomly initialised Qwen2-shaped model), same data (GSM8K rows cut to one
sequence length, so neither side pads), same micro-batch, accumulation and steps; each
trainer runs in its own subprocess so that peak memory is its own. Prints both and the
ratios, in one run.

    python benchmarks/train_bench.py                               # CPU defaults (a few minutes)
    python benchmarks/train_bench.py --device cuda --hidden 1536 --layers 28 --heads 12 \
        --intermediate 8960 --seq 2048 --micro 4 --accum 4 --steps 6   # a Qwen2.5-1.5B shape on a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "train" / "gsm8k_train.jsonl"


def build(args, work: Path):
    """Model folder + fixed-length examples (input_ids, labels) saved as JSON."""
    from dftune.config import DataConfig
    from dftune.data import build_dataset
    from dftune.tiny import build_model, build_tokenizer, texts_from

    tok = build_tokenizer(texts_from(str(args.data), 2000), vocab_size=2000)
    model = build_model(args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                        intermediate=args.intermediate, max_positions=max(4096, args.seq), arch="qwen2",
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    need = args.micro * args.accum * (args.steps + 1)
    exs, _ = build_dataset(DataConfig(path=str(args.data), max_length=args.seq, select=f"first:{need * 60}"), tok)
    exs = [e for e in exs if len(e.input_ids) == args.seq][:need]
    if len(exs) < need:
        raise SystemExit(f"only {len(exs)} examples reach {args.seq} tokens; lower --seq")
    rows = [{"input_ids": e.input_ids, "completion_mask": [int(x != -100) for x in e.labels]} for e in exs]
    (work / "rows.json").write_text(json.dumps(rows))


def run_dftune(args, work: Path) -> dict:
    from dftune.config import Config, DataConfig, ModelConfig, TrainConfig
    from dftune.train import train

    rows = json.loads((work / "rows.json").read_text())
    data = work / "tokenized.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    precision = {"auto": "auto", "fp32": "fp32", "bf16": "bf16-mixed"}[args.dtype]
    cfg = Config(model=ModelConfig(name_or_path=str(work / "model"), gradient_checkpointing=args.grad_ckpt),
                 data=DataConfig(path=str(data), max_length=args.seq),
                 train=TrainConfig(objective="dft", global_batch=args.micro * args.accum, micro_batch=args.micro,
                                   precision=precision, overwrite=True,
                                   max_steps=args.steps, out_dir=str(work / "run_dftune"), tensorboard=False,
                                   log_every=1000, lr=1e-5))
    stamps = []
    train(cfg, on_step=lambda step, rec: stamps.append(time.perf_counter()))
    return _result(args, stamps)


def run_trl(args, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = json.loads((work / "rows.json").read_text())
    stamps = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype if args.dtype != "auto" else ("bf16" if args.device == "cuda" else "fp32")]
    # fp32 weights with bf16 autocast (Trainer's bf16=True): the same mixed precision as dftune's
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(work / "model")
    cfg = SFTConfig(output_dir=str(work / "run_trl"), loss_type="dft", per_device_train_batch_size=args.micro,
                    gradient_accumulation_steps=args.accum, max_steps=args.steps, learning_rate=1e-5,
                    lr_scheduler_type="cosine", weight_decay=0.01, adam_beta2=0.95,
                    max_grad_norm=1.0, report_to="none", save_strategy="no", logging_steps=1000,
                    max_length=args.seq, completion_only_loss=True, use_cpu=args.device == "cpu",
                    bf16=dt == torch.bfloat16, dataloader_num_workers=0, disable_tqdm=True,
                    gradient_checkpointing=args.grad_ckpt)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Stamp()])
    trainer.train()
    return _result(args, stamps)


def _result(args, stamps) -> dict:
    steps = len(stamps) - 1  # the first step (warm-up, allocation) is not timed
    tokens = steps * args.micro * args.accum * args.seq
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_s": tokens / (stamps[-1] - stamps[0]), "peak_bytes": peak}


def mfu(args, tps: float) -> float | None:
    """Model FLOPs utilisation: 6 x params x tokens/s (+ attention) over the GPU's bf16 peak."""
    if args.device != "cuda":
        return None
    h, l, v, i = args.hidden, args.layers, args.vocab, args.intermediate
    params = l * (4 * h * h + 3 * h * i) + 2 * v * h
    flops_per_token = 6 * params + 12 * l * h * args.seq
    return tps * flops_per_token / args.peak_tflops / 1e12


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="dftune: precision auto/fp32/bf16-mixed; TRL: its bf16 flag (autocast, fp32 weights)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "train_bench")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (both trainers)")
    ap.add_argument("--no-trl", action="store_true", help="dftune only (e.g. on a GPU image without TRL)")
    ap.add_argument("--only", choices=["dftune", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        fn = run_dftune if args.only == "dftune" else run_trl
        print(json.dumps(fn(args, args.work)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    build(args, args.work)
    res = {}
    for who in ("dftune",) if args.no_trl else ("dftune", "trl"):
        cmd = [sys.executable, __file__, "--only", who] + [a for a in sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{who} failed:\n{out.stderr[-3000:]}")
            return
        res[who] = json.loads(out.stdout.strip().splitlines()[-1])
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# DFT training, H={args.hidden} L={args.layers} V={args.vocab} seq={args.seq} micro={args.micro} "
          f"accum={args.accum}, {args.steps - 1} timed steps, {dev}")
    print("| trainer | tokens/s | peak memory (MiB) | MFU |")
    print("|---|---|---|---|")
    for who, r in res.items():
        m = mfu(args, r["tokens_per_s"])
        print(f"| {who} | {r['tokens_per_s']:.0f} | {r['peak_bytes'] / 2**20:.0f} | {'-' if m is None else f'{m:.1%}'} |")
    if args.no_trl:
        return
    d, t = res["dftune"], res["trl"]
    print(f"speed ratio dftune/TRL: {d['tokens_per_s'] / t['tokens_per_s']:.2f}x; "
          f"memory ratio dftune/TRL: {d['peak_bytes'] / t['peak_bytes']:.2f}x")


if __name__ == "__main__":
    main()
