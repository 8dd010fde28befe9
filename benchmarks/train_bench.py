"""Tokens/s and peak memory of `dftune train` (DFT) against TRL's SFTTrainer(loss_type="dft").

The same randomly initialised Qwen2-shaped model and the same pre-tokenised rows (input_ids
+ completion_mask) on both sides, at two sequence-length distributions:
- short: GSM8K rows through the chat template (~150-400 tokens);
- long: NuminaMath-CoT-shaped rows (prompt ~70, response ~380 tokens median, log-normal,
  a tail to max_length), token slices of real MATH text.
Each side runs at its settings: dftune padded (length-grouped) and packed (data.packing);
TRL padded, padding-free (flattened, no packing) and packed (packing_strategy="bfd", which
TRL runs padding-free); TRL's fastest is the reference. A step is ``--global-batch``
examples (dftune, TRL padded and padding-free) or, for TRL packed, as many packed rows as
carry the same number of tokens, so the optimizer's per-step cost weighs the same. Each
run is its own subprocess (its peak resident memory is its own), ``--threads`` torch
threads; the first step is not timed; tokens/s counts real (non-padding) input tokens; with
``--repeats`` every setting runs that many times, interleaved, and its fastest run counts
(the machine is shared). Prints the table and the ratios in one run.

    python benchmarks/train_bench.py                          # short and long, CPU defaults (~25 min)
    python benchmarks/train_bench.py --repeats 2 --steps 6    # the recorded figures
    python benchmarks/train_bench.py --device cuda --dists fixed --hidden 1536 --layers 28 --heads 12 \\
        --intermediate 8960 --seq 2048 --micro 4 --accum 4 --steps 6 --no-trl   # Qwen2.5-1.5B shape, GPU

``--dists fixed`` (the default when ``--seq`` is given): rows of exactly ``--seq`` tokens of
MATH text (a prompt of up to 64 tokens), nothing to pad or pack; dftune and TRL padded only.

Text: GSM8K and MATH from ``../shared/data/train`` (the recorded figures), or with
``--synthetic`` the project's own generated arithmetic word problems
(``dftune.testbed.tasks``), for a clone with nothing beside it (``gpu_check.py`` uses them:
speed does not depend on what the tokens say).

MFU (on CUDA): tokens/s x (6N + 12 L H T) / the GPU's dense bf16 peak, the standard model
FLOPs (Kaplan et al. 2020; PaLM's MFU): N the parameters that multiply activations, i.e.
every parameter except the input embedding (a lookup; the LM head counts, once if tied), L
layers, H the attention width (heads x head_dim), T the sequence length; the recomputation of
gradient checkpointing is not counted. N is counted from the model itself, so GQA's smaller
K/V projections are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "train"


def _sources(args, work: Path) -> tuple[Path, Path]:
    """(GSM8K-like, MATH-like) problem/solution files: the shared data, or generated ones."""
    if not args.synthetic:
        if not (DATA / "gsm8k_train.jsonl").is_file():
            raise SystemExit(f"{DATA}/gsm8k_train.jsonl not found; run with --synthetic (generated text)")
        return DATA / "gsm8k_train.jsonl", DATA / "math_train.jsonl"
    from dftune.testbed.tasks import TaskSpec, generate

    paths = work / "synthetic_short.jsonl", work / "synthetic_long.jsonl"
    for path, steps, seed in ((paths[0], (2, 3), 0), (paths[1], (6, 9), 1)):
        if not path.is_file():
            rows = generate(TaskSpec(steps=steps, max_number=99), n=3000, seed=seed)
            path.write_text("".join(json.dumps({"problem": r["problem"], "solution": r["solution"]}) + "\n"
                                    for r in rows))
    return paths


def _tokenizer(args, work: Path):
    from dftune.tiny import build_tokenizer, texts_from

    folder = work / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        short, long = _sources(args, work)
        texts = texts_from(str(short), 2000) + texts_from(str(long), 2000)
        build_tokenizer(texts, vocab_size=2000).save_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def build(args, work: Path, dist: str) -> int:
    """The model folder and the rows (rows.json: input_ids + completion_mask); returns max_length."""
    from dftune.config import DataConfig
    from dftune.data import build_dataset
    from dftune.tiny import build_model

    tok = _tokenizer(args, work)
    if not (work / "model" / "config.json").is_file():
        model = build_model(args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                            kv_heads=args.kv_heads, tie=args.tie, intermediate=args.intermediate, max_positions=4096,
                            arch="qwen2",
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model.save_pretrained(work / "model")
        tok.save_pretrained(work / "model")
    need = args.examples
    short_file, long_file = _sources(args, work)
    texts = [json.loads(x)["solution"] for x in long_file.read_text().splitlines()[:3000]]
    stream = [t for ids in tok(texts, add_special_tokens=False)["input_ids"] for t in ids]
    rng = random.Random(0)

    def piece(n):
        a = rng.randrange(len(stream) - n)
        return stream[a:a + n]

    rows = []
    if dist == "long":  # NuminaMath-shaped: log-normal prompt and response lengths, cut at max_length
        max_length = args.long_max_length
        while len(rows) < need:
            p = piece(max(4, int(rng.lognormvariate(0, 0.6) * 70)))
            r = piece(max(4, int(rng.lognormvariate(0, 0.7) * 380))) + [tok.eos_token_id]
            ids, mask = (p + r)[:max_length], ([0] * len(p) + [1] * len(r))[:max_length]
            if any(mask[1:]):
                rows.append({"input_ids": ids, "completion_mask": mask})
    elif dist == "fixed":  # every row exactly --seq tokens: a 64-token prompt, the rest response
        max_length = args.seq
        prompt = min(64, max_length // 4)
        rows = [{"input_ids": piece(max_length), "completion_mask": [0] * prompt + [1] * (max_length - prompt)}
                for _ in range(need)]
    else:  # short: real GSM8K rows through the chat template
        max_length = args.short_max_length
        exs, _ = build_dataset(DataConfig(path=str(short_file), max_length=max_length,
                                          select=f"first:{need}", cache=False), tok)
        rows = [{"input_ids": e.input_ids, "completion_mask": [int(x != -100) for x in e.labels]} for e in exs]
    (work / f"rows_{dist}.json").write_text(json.dumps(rows))
    (work / f"tokenized_{dist}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return max_length


def run_dftune(args, work: Path) -> dict:
    from dftune.batching import epoch_steps
    from dftune.config import Config, DataConfig, ModelConfig, TrainConfig
    from dftune.data import build_dataset
    from dftune.model import load_tokenizer
    from dftune.train import train

    data = work / f"tokenized_{args.dist}.jsonl"
    precision = {"auto": "auto", "fp32": "fp32", "bf16": "bf16-mixed"}[args.dtype]
    dcfg = DataConfig(path=str(data), max_length=args.max_length, packing=args.setting == "packed",
                      cache_dir=str(work / "cache"))
    cfg = Config(model=ModelConfig(name_or_path=str(work / "model"), gradient_checkpointing=args.grad_ckpt),
                 data=dcfg,
                 train=TrainConfig(objective="dft", global_batch=args.global_batch, micro_batch=args.micro,
                                   precision=precision, overwrite=True, max_steps=args.steps,
                                   out=str(work / "run_dftune"), log_every=1000, lr=1e-5))
    stamps = []
    train(cfg, on_step=lambda step, rec: stamps.append(time.perf_counter()))
    # the real tokens of each step: the step's examples (the same padded or packed)
    exs, _ = build_dataset(dcfg, load_tokenizer(cfg.model))
    steps = epoch_steps(exs, args.global_batch, 1, args.micro, cfg.train.seed, 0, dcfg)[:args.steps]
    tokens = [sum(int(exs.lengths[i]) for rank in s.rows for mb in rank for row in mb for i in row) for s in steps]
    return _result(args, stamps, tokens)


def run_trl(args, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = json.loads((work / f"rows_{args.dist}.json").read_text())
    stamps, seen = [], []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            seen.append(trainer._total_train_tokens)  # TRL's own count of real input tokens

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype if args.dtype != "auto" else ("bf16" if args.device == "cuda" else "fp32")]
    # fp32 weights with bf16 autocast (Trainer's bf16=True): the same mixed precision as dftune's
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(work / "model")
    setting = {"padded": {}, "padding_free": {"padding_free": True, "max_length": None},
               "packed": {"packing": True, "packing_strategy": "bfd"}}[args.setting]
    kw = {"max_length": args.max_length, **setting}
    accum = args.global_batch // args.micro
    if args.setting == "packed":  # packed rows carrying about the tokens of global_batch examples
        mean = sum(len(r["input_ids"]) for r in rows) / len(rows)
        accum = max(1, round(args.global_batch * mean / (args.micro * args.max_length)))
    cfg = SFTConfig(output_dir=str(work / "run_trl"), loss_type="dft", per_device_train_batch_size=args.micro,
                    gradient_accumulation_steps=accum, max_steps=args.steps, learning_rate=1e-5,
                    lr_scheduler_type="cosine", weight_decay=0.01, adam_beta2=0.95,
                    max_grad_norm=1.0, report_to="none", save_strategy="no", logging_steps=1000,
                    completion_only_loss=True, use_cpu=args.device == "cpu",
                    bf16=dt == torch.bfloat16, dataloader_num_workers=0, disable_tqdm=True,
                    gradient_checkpointing=args.grad_ckpt, **kw)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Stamp()])
    trainer.train()
    return _result(args, stamps, [b - a for a, b in zip([0] + seen[:-1], seen)])


def _result(args, stamps, tokens) -> dict:
    """Timed from the end of step 1 (warm-up, allocation) to the end of the last."""
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_s": sum(tokens[1:len(stamps)]) / (stamps[-1] - stamps[0]), "peak_bytes": peak,
            "tokens_per_step": sum(tokens[1:len(stamps)]) / max(1, len(stamps) - 1)}


def model_flops(model_dir: Path, seq: int) -> dict:
    """Training FLOPs per token, 6N + 12 L H T (the module docstring), from the model's config:
    the model is built on the meta device, so nothing is allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    n = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    if emb is not head:
        n -= emb.numel()  # the untied input embedding: a lookup, no matmul
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    attention = 12 * layers * width * seq
    return {"n": n, "layers": layers, "width": width, "seq": seq, "per_token": 6 * n + attention,
            "text": f"MFU = tokens/s x (6N + 12 L H T) / peak: N = {n / 1e9:.4g}B parameters without the input "
                    f"embedding (LM head counted), L = {layers}, H = {width}, T = {seq}: "
                    f"{(6 * n + attention) / 1e9:.2f} GFLOP/token"}


def mfu(args, tps: float, flops: dict) -> float | None:
    """Model FLOPs utilisation over the GPU's dense bf16 peak (``--peak-tflops``)."""
    if args.device != "cuda":
        return None
    return tps * flops["per_token"] / args.peak_tflops / 1e12


RUNS = {  # distribution -> (trainer, setting) pairs
    "fixed": [("dftune", "padded"), ("trl", "padded")],
    "short": [("dftune", "padded"), ("dftune", "packed"), ("trl", "padded"), ("trl", "padding_free"), ("trl", "packed")],
}
RUNS["long"] = RUNS["short"]


def bench(args, dist: str) -> None:
    max_length = build(args, args.work, dist)
    res = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.device == "cpu" else None
    runs = [r for r in RUNS[dist] if not (r[0] == "trl" and args.no_trl)]
    for rep in range(args.repeats):
        for who, setting in runs if rep % 2 == 0 else runs[::-1]:  # interleaved: drift in load hits all alike
            cmd = [sys.executable, __file__, "--only", who, "--setting", setting, "--dist", dist,
                   "--max-length", str(max_length)] + sys.argv[1:]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"{who} {setting} failed:\n{out.stderr[-3000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if (who, setting) not in res or r["tokens_per_s"] > res[(who, setting)]["tokens_per_s"]:
                res[(who, setting)] = r
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} torch thread(s)"
    flops = model_flops(args.work / "model", max_length)
    print(f"\n# {dist}: DFT training, H={args.hidden} L={args.layers} V={args.vocab} max_length={max_length} "
          f"global_batch={args.global_batch} micro={args.micro}, {args.steps - 1} timed steps, best of {args.repeats}, {dev}")
    print(f"# {flops['text']}; peak {args.peak_tflops:g} TFLOPS")
    # the first four columns are what gpu_check.py reads from the "| dftune |" row
    print("| trainer | tokens/s | peak memory (MiB) | MFU | tokens/step |")
    print("|---|---|---|---|---|")
    for (who, setting), r in res.items():
        m = mfu(args, r["tokens_per_s"], flops)
        name = who if setting == "padded" else f"{who} {setting}"
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['peak_bytes'] / 2**20:.0f} | {'-' if m is None else f'{m:.1%}'} | "
              f"{r['tokens_per_step']:.0f} |")
    trl = {k: v for k, v in res.items() if k[0] == "trl"}
    ours = {k: v for k, v in res.items() if k[0] == "dftune"}
    if not trl or not ours:
        return
    tk, t = max(trl.items(), key=lambda kv: kv[1]["tokens_per_s"])
    for dk, d in ours.items():
        print(f"{dist}: dftune {dk[1]} vs TRL's fastest ({tk[1]}): speed {d['tokens_per_s'] / t['tokens_per_s']:.2f}x, "
              f"peak memory {d['peak_bytes'] / t['peak_bytes']:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dists", default="", help="short,long (default) or fixed (the default with --seq)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="dftune: precision auto/fp32/bf16-mixed; TRL: its bf16 flag (autocast, fp32 weights)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=0, help="grouped-query attention (0: as many as --heads)")
    ap.add_argument("--tie", action="store_true", help="tied input embedding and LM head (Qwen2.5-0.5B/1.5B)")
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--seq", type=int, default=0, help="fixed: every sequence this long")
    ap.add_argument("--short-max-length", type=int, default=512)
    ap.add_argument("--long-max-length", type=int, default=2048)
    ap.add_argument("--examples", type=int, default=400, help="rows made per distribution")
    ap.add_argument("--micro", type=int, default=2, help="sequences (packed: rows) per forward")
    ap.add_argument("--global-batch", type=int, default=16, help="examples per optimizer step")
    ap.add_argument("--accum", type=int, default=0, help="fixed: global batch = micro x accum")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run on CPU")
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting; the fastest counts")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "train_bench")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (both trainers)")
    ap.add_argument("--no-trl", action="store_true", help="dftune only (e.g. on a GPU image without TRL)")
    ap.add_argument("--synthetic", action="store_true",
                    help="generated word problems instead of ../shared/data/train (a clone with nothing beside it)")
    ap.add_argument("--only", choices=["dftune", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--setting", default="padded", help=argparse.SUPPRESS)
    ap.add_argument("--dist", default="", help=argparse.SUPPRESS)
    ap.add_argument("--max-length", type=int, default=0, help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args()
    if args.accum:
        args.global_batch = args.micro * args.accum
    if args.only:
        fn = run_dftune if args.only == "dftune" else run_trl
        print(json.dumps(fn(args, args.work)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    dists = args.dists or ("fixed" if args.seq else "short,long")
    for dist in dists.split(","):
        if dist == "fixed" and not args.seq:
            args.seq = 256
        bench(args, dist)


if __name__ == "__main__":
    main()
