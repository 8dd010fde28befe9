"""The ``dftune`` command: a table of commands, each a plain function of one config dataclass.

Every command reads its settings the same way (``dftune.arguments``, ``dftune.settings``):

    dftune COMMAND [CONFIG.yaml] [key=value ...] [--key value ...] [--flag] [ARG ...]

- ``CONFIG.yaml`` (optional) holds values only; ``key=value`` overrides it. Keys are the
  dataclass fields (``train.lr``, or a bare ``lr`` when only one section has it); values are
  read as YAML; lists as ``a,b,c``. Unknown keys and wrong types are errors naming the key.
- ``--key value`` is the same as ``key=value`` (``--max-new-tokens 64``); a boolean key is a
  bare flag (``--resume``). ``ARG``s without ``=`` fill the command's positional field
  (the report's inputs, say).
- ``--show`` lists every key the command honours with its default and its help (the
  docstring after each dataclass field).
- ``--help`` shows the command's description with a runnable example.

Errors a user can cause print as one line each (exit status 2), found before anything loads;
DFTUNE_DEBUG=1 shows tracebacks. Ctrl-C says what was kept and the command that continues.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

# ---- the commands -----------------------------------------------------------------------------


def cmd_train(cfg) -> None:
    """Fine-tune a causal LM with an objective from the registry.

    example:   dftune train configs/tiny_cpu.yaml train.objective=dft train.max_steps=20
    no YAML:   dftune train model.name_or_path=out/tiny-base data.path=../shared/data/train/gsm8k_train.jsonl
    continue:  dftune train configs/tiny_cpu.yaml --resume      (or --overwrite to start again)
    8 GPUs:    torchrun --nproc_per_node 8 -m dftune.cli train configs/paper/qwen2.5-math-1.5b.yaml
    """
    from dftune.train import train

    print(f"final model: {train(cfg)}")


def cmd_eval(cfg) -> None:
    """Evaluate a model on the math benchmarks (the paper's protocol by default: avg@16, T=1.0, vLLM).

    example: dftune eval --model runs/tiny-dft/final --benchmarks math500,gsm8k --limit 20 --n 4 \\
                 --max-new-tokens 256 --backend hf --data-dir ../shared/data/benchmarks --out evals/tiny
    paper:   dftune eval --model Qwen/Qwen2.5-Math-1.5B --out evals/base --grader paper --stops paper
             dftune eval --model meta-llama/Llama-3.2-3B --prompt llama-base-boxed --grader paper --out evals/llama
    """
    from dftune.eval.run import evaluate, markdown_table
    from dftune.eval.validate import validate_eval

    validate_eval(cfg)
    summary = evaluate(cfg)
    print(markdown_table(summary))
    print(f"per-sample results: {cfg.out}/samples.jsonl; summary: {cfg.out}/summary.json")


def cmd_compare(cfg) -> None:
    """Paired comparison of two evaluations of the same problems, the reference first: the
    per-benchmark difference OTHER - REFERENCE with a 95% bootstrap interval and a sign test
    ("DFT - SFT = +x [lo, hi]"; the report's direction too).

    example: dftune compare evals/nll evals/dft --out evals/dft-vs-nll     # DFT - NLL
    """
    from dftune.eval.compare import compare_markdown, run_compare
    from dftune.eval.validate import validate_compare

    validate_compare(cfg)
    print(compare_markdown(run_compare(cfg)))
    if cfg.out:
        print(f"wrote {cfg.out}/compare.json and compare.md")


def cmd_eval_general(cfg) -> None:
    """General capability (forgetting): lm-evaluation-harness tasks on one model; run it for the base and
    the fine-tuned model, then `dftune report` both folders for the side-by-side table.

    example: dftune eval-general model=out/base out=evals/base-general tasks=mmlu,arc_challenge limit=200
             dftune eval-general model=runs/dft/final out=evals/dft-general tasks=mmlu,arc_challenge limit=200
             dftune report evals/base-general evals/dft-general -o forgetting.html
    needs:   pip install 'dftune[general]'
    """
    from dftune.eval.general import evaluate_general, markdown_table

    summary = evaluate_general(cfg)
    print(markdown_table(summary, every=False))
    print(f"every task and metric: {cfg.out}/results.md; summary: {cfg.out}/summary.json")


def cmd_probe(cfg) -> None:
    """Pre-flight probe: how strong is the base model's prior on this data, and which objective fits.

    example: dftune probe --model out/tiny-base --data ../shared/data/train/gsm8k_train.jsonl --limit 200
    """
    from dftune.analysis.run import run_probe
    from dftune.analysis.tokens import format_probe

    print(format_probe(run_probe(cfg)))
    if cfg.out:
        print(f"wrote {cfg.out}")


def cmd_analyze(cfg) -> None:
    """Token-probability analysis of one or more models on a data sample (response tokens only).

    example: dftune analyze --models base=out/tiny-base,dft=runs/tiny-dft/final \\
                 --data ../shared/data/train/gsm8k_train.jsonl --limit 64 --out analysis/tiny
    """
    from dftune.analysis.run import run_analyze

    res = run_analyze(cfg)
    for name, s in res["summary"].items():
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in s.items()))
    print(f"wrote {cfg.out}/token_probs.json")


def cmd_report(cfg) -> None:
    """One self-contained HTML report comparing runs, evaluations, analyses, probes and sweeps.

    example: dftune report runs/tiny-dft analysis/tiny -o report.html
    """
    from dftune.analysis.report import validate_report, write_report

    validate_report(cfg)
    print(f"wrote {write_report(cfg.inputs, cfg.output, cfg.title)}")


def cmd_sweep(cfg) -> None:
    """Train (and evaluate) every point of a grid; skip finished points; one report for all.

    example: dftune sweep configs/tiny_cpu.yaml --grid train.objective=nll,dft --grid train.lr=1e-4,1e-3 \\
                 --out sweeps/tiny --eval.benchmarks gsm8k --eval.limit 20 --eval.data_dir ../shared/data/benchmarks
    cluster: dftune sweep CONFIG --grid ... --out DIR --print-only     # the commands, one per line
    """
    from dftune.sweep import run_sweep

    run_sweep(cfg)


def cmd_demo(cfg) -> None:
    """The laptop-scale testbed: pretrain tiny bases (weak and strong prior, cached), fine-tune them with
    several objectives and seeds, evaluate in and out of distribution, analyse, and write report.html.

    example: dftune demo                       # NLL, DFT and auto at a weak and a strong prior: about 1,040 s of CPU
             dftune demo --full                # firmer numbers: 5 seeds, 100 problems per split, floor/protect too
             dftune demo offline               # RFT, DFT-on-RFT, DPO and GRPO: about 7 minutes (11 under load)
    """
    from dftune.testbed.demo import run_demo

    run_demo(cfg)


def cmd_sample(cfg) -> None:
    """Rejection sampling: k responses per question, graded; writes rft.jsonl, dpo.jsonl, stats.json.

    example: dftune sample --model runs/tiny-dft/final --data ../shared/data/train/gsm8k_train.jsonl \\
                 --select first:32 --k 4 --backend hf --max-new-tokens 128 --out data/rft-tiny
    paper:   dftune sample --model Qwen/Qwen2.5-Math-1.5B --data AI-MO/NuminaMath-CoT --select first:100000 \\
                 --k 4 --out data/rft
    """
    from dftune.offline.sample import run_sample

    print(json.dumps(run_sample(cfg), indent=1))


def cmd_baseline_trl(kind: str):
    def run(cfg) -> None:
        from dftune.offline.baselines import run_dpo, run_grpo, validate_baseline

        validate_baseline(cfg, kind)
        print(f"final model: {(run_dpo if kind == 'dpo' else run_grpo)(cfg)}")

    return run


def cmd_baseline_ppo(cfg) -> None:
    from dftune.offline.ppo import run_ppo

    print(f"result: {run_ppo(cfg)}")


def cmd_tiny_model(cfg) -> None:
    """Build a tiny random Llama and a BPE tokenizer (with a chat template) trained on a data file.

    example: dftune tiny-model out/tiny-base --data ../shared/data/train/gsm8k_train.jsonl
    """
    from dftune.tiny import make_tiny_from

    print(f"wrote {make_tiny_from(cfg)}")


# ---- the table --------------------------------------------------------------------------------


@dataclass
class Command:
    """A command: its config dataclass, the function that runs it, and how bare arguments and
    short flags map onto keys."""

    config: Callable[[], type]  # returns the dataclass (imported lazily: --help stays fast)
    run: Callable
    doc: str = ""
    positional: str = ""  # the field bare ARGs fill
    flags: dict = field(default_factory=dict)  # short flag -> key
    yaml_field: str = ""  # a CONFIG.yaml argument is this field's value, not settings (sweep's training config)
    on_interrupt: str = ""  # what Ctrl-C leaves behind, printed with "interrupted"


def _cfg(module: str, name: str):
    def get():
        import importlib

        return getattr(importlib.import_module(module), name)

    return get


BASELINE_DOC = """DPO or GRPO baselines on TRL, PPO on verl, with configs mirroring the paper.

    example: dftune baseline dpo configs/paper/dpo.yaml model=Qwen/Qwen2.5-Math-1.5B data=data/rft/dpo.jsonl
             dftune baseline grpo configs/paper/grpo.yaml model=Qwen/Qwen2.5-Math-1.5B data=data/math.jsonl
             dftune baseline ppo configs/paper/ppo.yaml launch=false   # write verl's data and command only
    """

RERUN_CONTINUES = "finished samples are kept in OUT/samples.jsonl: the same command continues"

COMMANDS: dict[str, Command] = {
    "train": Command(_cfg("dftune.config", "Config"), cmd_train, cmd_train.__doc__),
    "eval": Command(_cfg("dftune.eval.run", "EvalConfig"), cmd_eval, cmd_eval.__doc__, on_interrupt=RERUN_CONTINUES,
                    flags={"--tensor-parallel": "tensor_parallel_size", "--data-parallel": "data_parallel_size",
                           "--no-end-of-turn-stop": "stops=eos"}),
    "compare": Command(_cfg("dftune.eval.compare", "CompareConfig"), cmd_compare, cmd_compare.__doc__,
                       positional="evals"),
    "eval-general": Command(_cfg("dftune.eval.general", "GeneralEvalConfig"), cmd_eval_general, cmd_eval_general.__doc__),
    "probe": Command(_cfg("dftune.analysis.run", "ProbeConfig"), cmd_probe, cmd_probe.__doc__),
    "analyze": Command(_cfg("dftune.analysis.run", "AnalyzeConfig"), cmd_analyze, cmd_analyze.__doc__),
    "report": Command(_cfg("dftune.analysis.report", "ReportConfig"), cmd_report, cmd_report.__doc__,
                      positional="inputs", flags={"-o": "output"}),
    "sweep": Command(_cfg("dftune.sweep", "SweepConfig"), cmd_sweep, cmd_sweep.__doc__, yaml_field="config",
                     on_interrupt="finished points are kept and an interrupted one resumes from its last checkpoint: "
                                  "the same command continues"),
    "demo": Command(_cfg("dftune.testbed.demo_config", "DemoConfig"), cmd_demo, cmd_demo.__doc__, positional="mode"),
    "sample": Command(_cfg("dftune.offline.sample", "SampleConfig"), cmd_sample, cmd_sample.__doc__,
                      on_interrupt=RERUN_CONTINUES),
    "baseline dpo": Command(_cfg("dftune.offline.baselines", "BaselineConfig"), cmd_baseline_trl("dpo"), BASELINE_DOC),
    "baseline grpo": Command(_cfg("dftune.offline.baselines", "BaselineConfig"), cmd_baseline_trl("grpo"), BASELINE_DOC),
    "baseline ppo": Command(_cfg("dftune.offline.ppo", "PPOConfig"), cmd_baseline_ppo, BASELINE_DOC),
    "tiny-model": Command(_cfg("dftune.tiny", "TinyConfig"), cmd_tiny_model, cmd_tiny_model.__doc__, positional="out"),
}


def usage() -> str:
    lines = ["usage: dftune COMMAND [CONFIG.yaml] [key=value ...] [--show] [--help]", "", "commands:"]
    for name, cmd in COMMANDS.items():
        first = (cmd.doc or "").strip().splitlines()[0] if cmd.doc else ""
        lines.append(f"  {name:<15} {first}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from dftune.arguments import build_config, parse_argv
    from dftune.errors import UserError
    from dftune.settings import describe

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name = argv.pop(0)
    if name == "baseline" and argv and not argv[0].startswith("-"):
        name = f"baseline {argv.pop(0)}"
    if name == "baseline":
        print("error: baseline needs a kind: dftune baseline dpo|grpo|ppo CONFIG [key=value ...]", file=sys.stderr)
        return 2
    if name not in COMMANDS:
        names = sorted({n.split()[0] for n in COMMANDS})
        print(f"error: unknown command {name!r}; commands: {', '.join(names)} (dftune --help)", file=sys.stderr)
        return 2
    cmd = COMMANDS[name]
    try:
        cls = cmd.config()
        parsed = parse_argv(cls, argv, cmd)
        if parsed.help:
            print(f"dftune {name}: {cmd.doc}\nsettings: dftune {name} --show")
            return 0
        if parsed.show:
            print(describe(cls))
            if name == "train":
                from dftune.objective_spec import describe_objectives

                print("\n" + describe_objectives())
            return 0
        from dftune.progress import quiet_library_bars

        quiet_library_bars()
        cmd.run(build_config(cls, parsed))
    except UserError as e:
        if os.environ.get("DFTUNE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(interrupted_message(name, argv, e, cmd.on_interrupt), file=sys.stderr)
        return 130
    return 0


def interrupted_message(name: str, argv: list[str], e: KeyboardInterrupt, hint: str) -> str:
    """What Ctrl-C leaves and the command that continues (a training run: from its last
    checkpoint with --resume, or again with --overwrite when it saved none)."""
    import shlex

    from dftune.errors import Interrupted

    if not isinstance(e, Interrupted) or name != "train":  # (sweep's points resume by themselves)
        return f"interrupted{': ' + hint if hint else ''}"
    keep = [a for a in argv if a not in ("--resume", "--overwrite") and a.partition("=")[0].split(".")[-1]
            not in ("resume", "overwrite")]
    if e.resume is not None:
        again = shlex.join(["dftune", *name.split(), *keep, "--resume"])
        return f"interrupted: {e.message}; the last checkpoint is {e.resume}; continue with: {again}"
    again = shlex.join(["dftune", *name.split(), *keep, "--overwrite"])
    return f"interrupted: {e.message}, before any checkpoint was saved (train.save_every); start again with: {again}"


if __name__ == "__main__":
    sys.exit(main())
