"""The ``dftune`` command. Each command is a plain function; its help shows a runnable example."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    from dftune.eval.generate import EngineConfig, SamplingConfig
    from dftune.eval.run import EvalConfig, evaluate

    cfg = EvalConfig(
        model=args.model, benchmarks=[b.strip() for b in args.benchmarks.split(",") if b.strip()], backend=args.backend,
        prompt=args.prompt, data_dir=args.data_dir or "", limit=args.limit or 0,
        sampling=SamplingConfig(n=args.n, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, seed=args.seed,
                                stop=[s for s in args.stop.split("|") if s] if args.stop else []),
        engine=EngineConfig(tensor_parallel_size=args.tensor_parallel, data_parallel_size=args.data_parallel,
                            max_model_len=args.max_model_len or 0, batch_size=args.batch_size, dtype=args.dtype),
        stop_at_end_of_turn=not args.no_end_of_turn_stop, strip_think=args.strip_think,
        grade_workers=args.grade_workers or 0, grade_timeout=args.grade_timeout,
    )
    from dftune.eval.run import markdown_table

    summary = evaluate(cfg, args.out)
    print(markdown_table(summary))
    print(f"per-sample results: {args.out}/samples.jsonl; summary: {args.out}/summary.json")


def cmd_compare(args) -> None:
    """Compare two evaluations problem by problem: A - B per benchmark with a paired bootstrap and a sign test.

    example: dftune compare evals/dft evals/sft --out evals/dft-vs-sft
    """
    from dftune.eval.compare import compare_markdown, write_compare

    result = write_compare(args.a, args.b, args.out, reps=args.reps, seed=args.seed)
    print(compare_markdown(result))
    print(f"wrote {args.out}/compare.json and {args.out}/compare.md")


def _analysis_examples(model_path: str, data: str, limit: int, max_length: int, fmt: str, chat_template: str):
    from dftune.config import DataConfig, ModelConfig
    from dftune.data import build_dataset
    from dftune.model import load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path=model_path))
    exs, summary = build_dataset(DataConfig(path=data, select=f"first:{limit}", max_length=max_length, format=fmt,
                                            chat_template=chat_template, on_bad_row="skip"), tok)
    return tok, exs


def cmd_analyze(args) -> None:
    """Token-probability analysis of one or more models on a data sample (response tokens only).

    example: dftune analyze token-probs --models base=out/tiny-base,dft=runs/tiny-dft/final --base base \\
                 --data ../shared/data/train/gsm8k_train.jsonl --limit 64 --out analysis/tiny
    """
    import torch
    from tqdm.auto import tqdm

    from dftune.analysis.tokens import (
        analyze,
        load_for_analysis,
        token_stats,
        write_json,
    )

    models = dict(item.split("=", 1) if "=" in item else (Path(item).name, item) for item in args.models.split(","))
    base = args.base or next(iter(models))
    if base not in models:
        raise SystemExit(f"--base {base!r} is not one of --models ({', '.join(models)})")
    tok, exs = _analysis_examples(models[base], args.data, args.limit, args.max_length, args.format, args.chat_template)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base_model = load_for_analysis(models[base], device)
    stats = {}
    for name, path in models.items():
        model = base_model if name == base else load_for_analysis(path, device)
        if model.get_output_embeddings().weight.shape[0] != base_model.get_output_embeddings().weight.shape[0]:
            raise SystemExit(f"{path}: vocabulary differs from the base model's; token statistics need one tokenizer")
        with tqdm(total=len(exs), desc=f"analyze {name}", unit="ex") as bar:
            stats[name] = token_stats(model, exs, tok.pad_token_id, base=None if name == base else base_model,
                                      batch_size=args.batch_size, progress=bar.update)
    result = analyze(stats, lambda t: tok.decode([t]), base=base)
    result["data"], result["examples"] = args.data, len(exs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "token_probs.json", result)
    for name, s in result["summary"].items():
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in s.items()))
    print(f"wrote {out / 'token_probs.json'}")


def cmd_probe(args) -> None:
    """Pre-flight probe: how strong is the base model's prior on this data, and which objective fits.

    example: dftune probe --model out/tiny-base --data ../shared/data/train/gsm8k_train.jsonl --limit 200
    """
    import torch

    from dftune.analysis.tokens import (
        load_for_analysis,
        recommend,
        summary,
        token_stats,
        write_json,
    )

    tok, exs = _analysis_examples(args.model, args.data, args.limit, args.max_length, args.format, args.chat_template)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    st = token_stats(load_for_analysis(args.model, device), exs, tok.pad_token_id, batch_size=args.batch_size)
    s = summary(st)
    rec = recommend(s)
    print(f"model {args.model} on {len(exs)} examples ({s['tokens']} response tokens):")
    print(f"  mean p {s['mean_prob']:.3f} | p<0.1 {s['frac_below_0.1']:.1%} | p>0.9 {s['frac_above_0.9']:.1%} | "
          f"entropy {s['mean_entropy']:.2f} nats | NLL {s['nll']:.3f}")
    print(f"recommended objective: {rec['objective']}\n  {rec['reasoning']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out), {"model": args.model, "data": args.data, "examples": len(exs), "stats": s,
                                    "recommendation": rec})


def cmd_report(args) -> None:
    """One self-contained HTML report comparing runs, evaluations, analyses, probes and sweeps.

    example: dftune report runs/tiny-dft analysis/tiny -o report.html
    """
    from dftune.analysis.report import write_report

    print(f"wrote {write_report(args.inputs, args.output, args.title)}")


def cmd_sweep(args) -> None:
    """Train (and evaluate) every point of a grid; skip finished points; one report for all.

    example: dftune sweep configs/tiny_cpu.yaml --grid train.objective=nll,dft train.lr=1e-4,1e-3 \\
                 --out sweeps/tiny --eval-benchmarks gsm8k --eval-limit 20 --data-dir ../shared/data/benchmarks
    """
    from dftune.sweep import run_sweep

    ev = None
    if args.eval_benchmarks:
        ev = {"benchmarks": args.eval_benchmarks.split(","), "n": args.eval_n, "limit": args.eval_limit,
              "max_new_tokens": args.eval_max_new_tokens, "backend": args.eval_backend, "data_dir": args.data_dir}
    run_sweep(args.config, args.grid, args.out, args.overrides or [], ev, args.print_only)


def cmd_demo(args) -> None:
    """The laptop-scale testbed: pretrain tiny bases (weak and strong prior, cached), fine-tune them with
    NLL, DFT and prob_power, evaluate in and out of distribution, analyse, and write report.html.

    example: dftune demo                       # defaults: about 10 minutes on 2 CPU cores
             dftune demo seeds=3 strong_steps=800 out=out/demo-long
             dftune demo --show                # every setting with its meaning
    """
    import dataclasses

    from dftune.config import from_dict, parse_overrides
    from dftune.testbed.demo import DemoConfig, run_demo

    if args.show:
        print(DemoConfig.__doc__)
        print("\n".join(f"    {f.name} = {f.default!r}" for f in dataclasses.fields(DemoConfig)))
        return
    run_demo(from_dict(DemoConfig, parse_overrides(args.overrides, nested=False), "demo"))


def cmd_sample(args) -> None:
    """Rejection sampling: k responses per question, graded; writes rft.jsonl, dpo.jsonl, stats.json.

    example: dftune sample --model runs/tiny-dft/final --data ../shared/data/train/gsm8k_train.jsonl \\
                 --select first:32 --k 4 --backend hf --max-new-tokens 128 --out data/rft-tiny
    """
    from dftune.eval.generate import SamplingConfig
    from dftune.offline.sample import sample

    engine = {"batch_size": args.batch_size} if args.backend == "hf" else {"seed": args.seed}
    sc = SamplingConfig(n=args.k, temperature=args.temperature, top_p=1.0, max_new_tokens=args.max_new_tokens,
                        seed=args.seed)
    stats = sample(args.model, args.data, args.out, k=args.k, backend=args.backend, select=args.select,
                   suffix=args.instruction_suffix, sampling=sc, engine=engine, chat_template=args.chat_template)
    print(json.dumps(stats, indent=1))


def cmd_baseline(args) -> None:
    """DPO or GRPO baselines on TRL, with configs mirroring the paper.

    example: dftune baseline dpo configs/paper/dpo.yaml model=Qwen/Qwen2.5-Math-1.5B data=data/rft/dpo.jsonl
             dftune baseline grpo configs/paper/grpo.yaml model=Qwen/Qwen2.5-Math-1.5B data=data/math.jsonl
    """
    from dftune.offline.baselines import load_baseline_config, run_dpo, run_grpo

    cfg = load_baseline_config(args.config, args.overrides)
    final = (run_dpo if args.kind == "dpo" else run_grpo)(cfg)
    print(f"final model: {final}")


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
    p.add_argument("--grade-timeout", type=int, default=5, help="math-verify's time limit per call (seconds)")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32")
    p.add_argument("--strip-think", action="store_true", help="grade only what follows </think>")
    p.add_argument("--no-end-of-turn-stop", action="store_true",
                   help="do not stop chat-format prompts at the template's end-of-turn token(s) (EOS only)")

    p = add("compare", cmd_compare)
    p.add_argument("a", help="evaluation folder A (dftune eval --out)")
    p.add_argument("b", help="evaluation folder B")
    p.add_argument("--out", required=True, help="folder for compare.json and compare.md")
    p.add_argument("--reps", type=int, default=10_000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)

    p = add("analyze", cmd_analyze)
    p.add_argument("what", choices=["token-probs"])
    p.add_argument("--models", required=True, help="name=path,... (the first is the base unless --base)")
    p.add_argument("--base", default=None)
    data_args(p)
    p.add_argument("--out", required=True)

    p = add("probe", cmd_probe)
    p.add_argument("--model", required=True)
    data_args(p, limit=256)
    p.add_argument("--out", default=None, help="also write the result as JSON (the report reads it)")

    p = add("report", cmd_report)
    p.add_argument("inputs", nargs="+", help="run, eval, analysis or sweep folders; probe.json files")
    p.add_argument("-o", "--output", default="report.html")
    p.add_argument("--title", default="dftune report")

    p = add("sweep", cmd_sweep)
    p.add_argument("config")
    p.add_argument("--grid", nargs="+", required=True, help="key=v1,v2 ... (e.g. train.objective=nll,dft lr=1e-5,5e-5)")
    p.add_argument("--out", required=True)
    p.add_argument("--set", dest="overrides", nargs="*", help="fixed section.key=value overrides for every point")
    p.add_argument("--print-only", action="store_true", help="print the commands instead of running them")
    p.add_argument("--eval-benchmarks", default="", help="evaluate each point on these (comma-separated)")
    p.add_argument("--eval-n", type=int, default=4)
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--eval-max-new-tokens", type=int, default=512)
    p.add_argument("--eval-backend", default="hf", choices=["hf", "vllm"])
    p.add_argument("--data-dir", default=None)

    p = add("sample", cmd_sample)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="problem/solution or question/answer rows (gold from the data)")
    p.add_argument("--out", required=True, help="output folder (re-running resumes)")
    p.add_argument("--k", type=int, default=4, help="responses per question")
    p.add_argument("--select", default="all", help="all, first:N or random:N")
    p.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instruction-suffix", default="")
    p.add_argument("--chat-template", default="auto")
    p.add_argument("--batch-size", type=int, default=64, help="hf backend: sequences per generate call")

    p = add("baseline", cmd_baseline)
    p.add_argument("kind", choices=["dpo", "grpo"])
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*", help="key=value (see src/dftune/offline/baselines.py)")

    p = add("demo", cmd_demo)
    p.add_argument("overrides", nargs="*", help="key=value settings (dftune demo --show lists them)")
    p.add_argument("--show", action="store_true")

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


def data_args(p, limit: int = 128) -> None:
    p.add_argument("--data", required=True, help="a training-format data file (jsonl/json/parquet/folder/Hub id)")
    p.add_argument("--limit", type=int, default=limit, help="first N rows")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--format", default="auto")
    p.add_argument("--chat-template", default="auto", help="auto, plain, or a .jinja file")
    p.add_argument("--batch-size", type=int, default=8)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dftune.config import ConfigError
    from dftune.data import DataError
    from dftune.eval.benchmarks import BenchmarkError
    from dftune.eval.compare import CompareError

    try:
        args.fn(args)
    except (ConfigError, DataError, BenchmarkError, CompareError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
