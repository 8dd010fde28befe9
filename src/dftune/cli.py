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

    try:
        args.fn(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
