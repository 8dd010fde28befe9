"""The ``dftune`` command. Each command is a plain function; its help shows a runnable example."""

from __future__ import annotations

import argparse
import sys


def cmd_train(args) -> None:
    """Fine-tune a causal LM with an objective from the registry.

    example: dftune train configs/tiny_cpu.yaml train.objective=dft train.max_steps=20
    multi-GPU: accelerate launch --num_processes 8 -m dftune.cli train configs/paper/qwen2.5-math-1.5b.yaml
    """
    from dftune.config import describe, load_config
    from dftune.train import train

    if args.show:
        print(describe())
        return
    cfg = load_config(args.config, args.overrides)
    if args.resume:
        cfg.train.resume = True
    final = train(cfg)
    print(f"final model: {final}")


def cmd_tiny_model(args) -> None:
    """Build a tiny random Llama and a BPE tokenizer (with a chat template) trained on a data file.

    example: dftune tiny-model out/tiny-base --data ../shared/data/train/gsm8k_train.jsonl
    """
    from dftune.tiny import make_tiny, texts_from

    path = make_tiny(args.out, texts_from(args.data, args.limit), vocab_size=args.vocab_size, seed=args.seed,
                     hidden=args.hidden, layers=args.layers, heads=args.heads, intermediate=args.hidden * 2)
    print(f"wrote {path}")


def cmd_eval(args) -> None:
    """Evaluate a model on the math benchmarks (the paper's protocol by default: avg@16, T=1.0).

    example: dftune eval --model runs/tiny-dft/final --benchmarks math500,gsm8k --limit 20 --n 4 \\
                 --max-new-tokens 256 --backend hf --data-dir ../shared/data/benchmarks --out evals/tiny
    paper:   dftune eval --model Qwen/Qwen2.5-Math-1.5B --backend vllm --out evals/base
    """
    from dftune.eval.generate import SamplingConfig
    from dftune.eval.run import EvalConfig, evaluate

    engine = {}
    if args.backend == "vllm":
        engine = {"tensor_parallel_size": args.tensor_parallel, "data_parallel_size": args.data_parallel,
                  "seed": args.seed}
        if args.max_model_len:
            engine["max_model_len"] = args.max_model_len
    else:
        engine = {"batch_size": args.batch_size}
    cfg = EvalConfig(
        model=args.model, benchmarks=[b.strip() for b in args.benchmarks.split(",") if b.strip()], backend=args.backend,
        prompt=args.prompt, data_dir=args.data_dir, limit=args.limit,
        sampling=SamplingConfig(n=args.n, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, seed=args.seed,
                                stop=[s for s in args.stop.split("|") if s] if args.stop else []),
        grade_workers=args.grade_workers, engine=engine,
    )
    from dftune.eval.run import markdown_table

    summary = evaluate(cfg, args.out)
    print(markdown_table(summary))
    print(f"per-sample results: {args.out}/samples.jsonl; summary: {args.out}/summary.json")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dftune", description="Dynamic Fine-Tuning and its family of objectives.")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name, fn):
        p = sub.add_parser(name, help=fn.__doc__.splitlines()[0], description=fn.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn)
        return p

    p = add("train", cmd_train)
    p.add_argument("config", nargs="?", help="YAML config (values only)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-5")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    p.add_argument("--show", action="store_true", help="print every config key with its meaning and default")

    p = add("eval", cmd_eval)
    p.add_argument("--model", required=True, help="model folder or Hub id")
    p.add_argument("--benchmarks", default="math500,minerva_math,olympiadbench,aime24,amc23",
                   help="comma-separated: math500, minerva_math, olympiadbench, aime24, amc23, gsm8k, aime25")
    p.add_argument("--out", required=True, help="results folder (re-running with the same folder resumes)")
    p.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    p.add_argument("--prompt", default="qwen-boxed", choices=["qwen-boxed", "chat", "plain"])
    p.add_argument("--data-dir", default=None, help="folder with NAME/test.jsonl (else $DFTUNE_DATA_DIR, else the Hub)")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--n", type=int, default=16, help="samples per problem")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", default="", help="stop strings separated by |")
    p.add_argument("--tensor-parallel", type=int, default=1, help="vLLM tensor_parallel_size")
    p.add_argument("--data-parallel", type=int, default=1, help="vLLM data_parallel_size")
    p.add_argument("--max-model-len", type=int, default=None, help="vLLM max_model_len")
    p.add_argument("--batch-size", type=int, default=16, help="hf backend: sequences per generate call")
    p.add_argument("--grade-workers", type=int, default=None, help="grader processes (default: CPU count)")

    p = add("tiny-model", cmd_tiny_model)
    p.add_argument("out")
    p.add_argument("--data", required=True, help="a data file whose text trains the tokenizer")
    p.add_argument("--limit", type=int, default=2000, help="records used for the tokenizer")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dftune.config import ConfigError
    from dftune.data import DataError
    from dftune.eval.benchmarks import BenchmarkError

    try:
        args.fn(args)
    except (ConfigError, DataError, BenchmarkError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
