"""Grids of training + evaluation runs (the paper's lr x batch-size ablation, objective
comparisons), one run folder per point, finished points skipped, one report for all.

    dftune sweep configs/tiny_cpu.yaml --grid train.objective=nll,dft train.lr=1e-4,1e-3 --out sweeps/lr
    dftune sweep CONFIG --grid ... --out DIR --print-only     # commands for a cluster scheduler
"""

from __future__ import annotations

import itertools
import json
import shlex
import typing
from dataclasses import fields
from pathlib import Path


from dftune.config import Config, ConfigError, load_config, parse_scalar


def _full_key(key: str) -> str:
    """'lr' -> 'train.lr': a bare key is looked up in the config's sections."""
    if "." in key:
        return key
    hints = typing.get_type_hints(Config)
    for section in fields(Config):
        if key in {f.name for f in fields(hints[section.name])}:
            return f"{section.name}.{key}"
    raise ConfigError(f"--grid: unknown key {key!r}")


def parse_grid(grid: list[str]) -> tuple[list[str], list[dict]]:
    """["train.objective=nll,dft", "lr=1e-5,5e-5"] -> axes and the product of their values."""
    axes, values = [], []
    for item in grid:
        key, eq, vals = item.partition("=")
        if not eq or not vals:
            raise ConfigError(f"--grid {item!r} must look like key=v1,v2")
        axes.append(_full_key(key.strip()))
        values.append([parse_scalar(v) for v in vals.split(",")])
    return axes, [dict(zip(axes, combo)) for combo in itertools.product(*values)]


def point_name(values: dict) -> str:
    return "_".join(f"{k.split('.')[-1]}={v}" for k, v in values.items()).replace("/", "-").replace(":", "-")


def run_sweep(config: str, grid: list[str], out: str, overrides: list[str] = (), evaluate_with: dict | None = None,
              print_only: bool = False) -> list[dict]:
    """Train (and evaluate) every grid point not already finished; write sweep.json + report.html."""
    out_dir = Path(out)
    axes, points = parse_grid(grid)
    plan = []
    for values in points:
        name = point_name(values)
        ovr = list(overrides) + [f"{k}={v}" for k, v in values.items()] + [f"train.out_dir={out_dir / name}"]
        cfg = load_config(config, ovr)  # every point's config is checked before any training starts
        plan.append({"name": name, "values": values, "overrides": ovr, "cfg": cfg})
    if print_only:
        for p in plan:
            print(shlex.join(["dftune", "train", config, *p["overrides"]]))
            if evaluate_with:
                print(shlex.join(_eval_argv(out_dir / p["name"], evaluate_with)))
        return plan
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps({"config": config, "axes": axes, "overrides": list(overrides),
                                                    "points": [{"name": p["name"], "values": p["values"]} for p in plan]},
                                                   indent=1))
    from dftune.train import train

    for i, p in enumerate(plan, 1):
        run = out_dir / p["name"]
        if (run / "final").is_dir():
            print(f"[{i}/{len(plan)}] {p['name']}: trained already")
        else:
            print(f"[{i}/{len(plan)}] {p['name']}: training")
            p["cfg"].train.resume = True  # a point interrupted mid-way continues from its checkpoint
            train(p["cfg"])
        if evaluate_with and not (run / "eval" / "summary.json").is_file():
            from dftune.eval.run import evaluate

            evaluate(_eval_config(run, evaluate_with), run / "eval")
    from dftune.analysis.report import write_report

    write_report([out_dir], out_dir / "report.html", title=f"dftune sweep: {', '.join(axes)}")
    print(f"report: {out_dir / 'report.html'}")
    return plan


def _eval_config(run: Path, ev: dict):
    from dftune.eval.generate import SamplingConfig
    from dftune.eval.run import EvalConfig

    return EvalConfig(model=str(run / "final"), benchmarks=ev["benchmarks"], backend=ev.get("backend", "hf"),
                      prompt=ev.get("prompt", "qwen-boxed"), data_dir=ev.get("data_dir") or "", limit=ev.get("limit") or 0,
                      sampling=SamplingConfig(n=ev.get("n", 4), max_new_tokens=ev.get("max_new_tokens", 512),
                                              seed=ev.get("seed", 0)))


def _eval_argv(run: Path, ev: dict) -> list[str]:
    argv = ["dftune", "eval", "--model", str(run / "final"), "--benchmarks", ",".join(ev["benchmarks"]),
            "--out", str(run / "eval"), "--backend", ev.get("backend", "hf"), "--n", str(ev.get("n", 4)),
            "--max-new-tokens", str(ev.get("max_new_tokens", 512))]
    if ev.get("data_dir"):
        argv += ["--data-dir", ev["data_dir"]]
    if ev.get("limit"):
        argv += ["--limit", str(ev["limit"])]
    return argv
