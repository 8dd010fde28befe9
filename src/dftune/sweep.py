"""Grids of training + evaluation runs (the paper's lr x batch-size ablation, objective
comparisons), one run folder per point, finished points reused, one report for all.

    dftune sweep configs/tiny_cpu.yaml --grid train.objective=nll,dft --grid train.lr=1e-4,1e-3 --out sweeps/lr
    dftune sweep CONFIG --grid ... --out DIR --print-only     # the commands, for a cluster scheduler

A grid axis is ``key=v1,v2,...`` in the training config's keys. Values may hold commas
where an objective spec needs them: ``train.objective=nll,thresholded:q=0.2,normalize=kept``
is two values (a ``name=value`` piece after a spec with parameters continues that spec), or
separate values with ``;`` to say it explicitly.
"""

from __future__ import annotations

import dataclasses
import itertools
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from dftune.config import Config, load_config
from dftune.eval.run import EvalConfig
from dftune.settings import ConfigError, Problems, config_diff, parse_scalar, resolve_key


@dataclass
class SweepConfig:
    """Settings of `dftune sweep`."""

    config: str = ""
    """the training config (YAML) every point starts from."""
    grid: list[str] = field(default_factory=list, metadata={"split": False})
    """axes, each key=v1,v2 (repeat --grid per axis); the points are their product."""
    set: list[str] = field(default_factory=list, metadata={"split": False})
    """fixed key=value overrides applied to every point."""
    out: str = ""
    """the sweep folder (one run folder per point, sweep.json, report.html)."""
    print_only: bool = False
    """print the train (and eval) commands instead of running them."""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(benchmarks=[]), metadata={"omit": {
        "model": "each point's model is its run's final model (OUT/POINT/final)",
        "out": "each point is evaluated into OUT/POINT/eval"}})
    """how each point is evaluated (eval.benchmarks empty: not evaluated); model and out are set per point."""


def split_values(raw: str) -> list[str]:
    """'nll,thresholded:q=0.2,normalize=kept,dft' -> ['nll', 'thresholded:q=0.2,normalize=kept', 'dft']."""
    if ";" in raw:
        return [v.strip() for v in raw.split(";") if v.strip()]
    out: list[str] = []
    for piece in (p.strip() for p in raw.split(",")):
        if not piece:
            continue
        if out and "=" in piece and ":" not in piece and ":" in out[-1]:
            out[-1] += "," + piece  # a parameter of the spec before it
        else:
            out.append(piece)
    return out


def parse_grid(grid: list[str]) -> tuple[list[str], list[dict]]:
    """["train.objective=nll,dft", "lr=1e-5,5e-5"] -> axes and the product of their values."""
    axes, values = [], []
    for item in grid:
        key, eq, vals = item.partition("=")
        if not eq or not vals.strip():
            raise ConfigError(f"grid {item!r} must look like key=v1,v2")
        axes.append(".".join(resolve_key(Config, key.strip())))
        values.append([parse_scalar(v) for v in split_values(vals)])
    if len(set(axes)) != len(axes):
        raise ConfigError(f"grid: an axis is given twice ({axes})")
    return axes, [dict(zip(axes, combo)) for combo in itertools.product(*values)]


def point_name(values: dict) -> str:
    return "_".join(f"{k.split('.')[-1]}={v}" for k, v in values.items()).replace("/", "-").replace(":", "-")


def _eval_overrides(ev: EvalConfig) -> list[str]:
    """key=value for every eval setting that differs from the default (for --print-only)."""
    default = dataclasses.asdict(EvalConfig())
    flat = {}

    def walk(d, ref, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, ref.get(k, {}) or {}, f"{prefix}{k}.")
            elif v != ref.get(k) and k not in ("model", "out"):
                flat[f"{prefix}{k}"] = ",".join(map(str, v)) if isinstance(v, list) else v
    walk(dataclasses.asdict(ev), default, "")
    return [f"{k}={v}" for k, v in flat.items()]


def plan_sweep(cfg: SweepConfig) -> tuple[list[str], list[dict]]:
    """The grid's axes and points, every point's config checked (as ``dftune train`` would)
    against its folder, before anything is trained or written; every problem raised together."""
    from dftune.paths import file_problem
    from dftune.train import launched_world

    p = Problems()
    p.add(file_problem("config", cfg.config, "training config (YAML)"))
    p.nonempty("out", cfg.out, "the sweep folder")
    p.nonempty("grid", cfg.grid, "at least one axis: --grid key=v1,v2")
    if cfg.eval.benchmarks:
        from dftune.eval.validate import check_eval

        check_eval(cfg.eval, p, "eval.", model_set=True)
    p.raise_all()  # the points are built from these
    out_dir = Path(cfg.out)
    axes, points = parse_grid(cfg.grid)
    plan = []
    for values in points:
        name = point_name(values)
        ovr = list(cfg.set) + [f"{k}={v}" for k, v in values.items()] + [f"train.out={out_dir / name}"]
        run = load_config(cfg.config, ovr)
        for problem in _point_problems(run, launched_world()):
            if problem not in p:  # a problem every point shares is told once
                p.append(problem)
        plan.append({"name": name, "values": values, "overrides": ovr, "cfg": run})
    p.raise_all()
    return axes, plan


def _point_problems(run, world: int) -> list[str]:
    """A point's problems: its settings, and a folder trained with other settings."""
    import yaml

    from dftune.run_folder import progress
    from dftune.train import check_run

    p = Problems()
    check_run(run, p, world)
    saved = Path(run.train.out) / "config.yaml"
    if saved.is_file() and progress(Path(run.train.out)):
        diff = [d for d in config_diff(yaml.safe_load(saved.read_text()) or {}, run)
                if d[0] not in ("train.resume", "train.overwrite")]
        if diff:
            k, a, b = diff[0]
            p.append(f"{run.train.out} was trained with other settings ({k}: {a!r} there, {b!r} now); use another "
                     "out, or delete that point's folder")
    return p


def run_sweep(cfg: SweepConfig) -> list[dict]:
    """Train (and evaluate) every grid point not already finished; write sweep.json + report.html."""
    axes, plan = plan_sweep(cfg)
    out_dir = Path(cfg.out)
    evaluate_points = bool(cfg.eval.benchmarks)
    if cfg.print_only:
        for p in plan:
            print(shlex.join(["dftune", "train", cfg.config, *p["overrides"]]))
            if evaluate_points:
                run = out_dir / p["name"]
                print(shlex.join(["dftune", "eval", f"model={run / 'final'}", f"out={run / 'eval'}",
                                  *_eval_overrides(cfg.eval)]))
        return plan
    from dftune.files import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "sweep.json", {"config": cfg.config, "axes": axes, "overrides": list(cfg.set),
                                        "points": [{"name": p["name"], "values": p["values"]} for p in plan]})
    from dftune.dist import checkpoints
    from dftune.run_folder import progress
    from dftune.train import train

    for i, p in enumerate(plan, 1):
        run = out_dir / p["name"]
        if (run / "final" / "config.json").is_file():
            print(f"[{i}/{len(plan)}] {p['name']}: trained already")
        else:
            t = p["cfg"].train
            t.resume = bool(checkpoints(run))  # a point interrupted mid-way continues from its checkpoint
            t.overwrite = not t.resume and bool(progress(run))  # one stopped before any checkpoint starts again
            print(f"[{i}/{len(plan)}] {p['name']}: {'resuming' if t.resume else 'training'}")
            train(p["cfg"])
        if evaluate_points:
            from dftune.eval.run import evaluate

            ev = dataclasses.replace(cfg.eval, model=str(run / "final"))
            evaluate(ev, run / "eval")  # resumes; refuses other settings
    from dftune.analysis.report import write_report

    write_report([out_dir], out_dir / "report.html", title=f"dftune sweep: {', '.join(axes)}")
    print(f"report: {out_dir / 'report.html'}")
    return plan
