"""One self-contained HTML report comparing runs: plots embedded, no network needed.

    dftune report runs/nll runs/dft evals/base analysis/ -o report.html

Each argument is a run folder (config.yaml, log.jsonl, and optionally eval/, analysis/, general/,
probe.json inside), an evaluation folder (summary.json, samples.jsonl), an analysis folder
(token_probs.json), a probe file, a sweep folder (sweep.json, optionally tables.json) or a
general-suite folder (`dftune eval-general`; the first is the reference).

The page answers "did DFT help here, and why" first: a summary per group (a sweep's other axes,
e.g. the prior) ranking the objectives with 95% intervals and the paired difference to the
baseline, and findings computed from the data (``summary.py``). Then the token-probability
figures per group on shared axes beside the probe's recommendation, learning curves per
objective (mean and band over seeds), the evaluation tables, sample completions, config
differences. Per-seed detail is folded away (``<details>``), never dropped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dftune.analysis import evidence as E
from dftune.analysis import page as P
from dftune.analysis import sections as S
from dftune.analysis.summary import Arm, Group, findings, score_group
from dftune.errors import UserError
from dftune.eval.general import is_summary as is_general
from dftune.eval.metrics import accuracy_by_problem
from dftune.files import read_jsonl
from dftune.settings import flatten


@dataclass
class ReportConfig:
    """Settings of `dftune report`."""

    inputs: list[str] = field(default_factory=list, metadata={"split": False})
    """run, evaluation, analysis, sweep or general-suite folders; probe.json files."""
    output: str = "report.html"
    """the HTML file to write."""
    title: str = "dftune report"
    """the page title."""


class ReportError(UserError, ValueError):
    """An input that is not something the report can read."""


@dataclass
class Run:
    name: str
    path: Path
    config: dict | None = None
    log: list = field(default_factory=list)
    eval_curve: list = field(default_factory=list)
    summary: dict | None = None  # evaluation summary.json
    eval_dir: Path | None = None
    acc: dict | None = None  # {benchmark: {problem id: accuracy}} from samples.jsonl
    examples: list = field(default_factory=list)  # a few samples.jsonl rows to show
    analysis: dict | None = None  # token_probs.json
    probe: dict | None = None
    general: dict | None = None  # general-suite (lm-eval) summary.json


def _jsonl(path: Path) -> list:
    try:
        return read_jsonl(path)
    except UserError:  # a corrupt log: show the rest of the run
        return []


def _json(path: Path):
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None


EXAMPLES = 2  # correct and incorrect samples shown per run


def pick_examples(rows: list[dict], k: int = EXAMPLES) -> list[dict]:
    """Up to k correct and k incorrect first samples, spread over benchmarks (round robin)."""
    pools: dict[tuple, list] = {}
    for r in rows:
        if r.get("sample", 0) == 0:
            pools.setdefault((bool(r.get("correct")), r.get("benchmark")), []).append(r)
    out = []
    for verdict in (True, False):
        queues = [q for (v, _), q in pools.items() if v == verdict]
        taken = 0
        while taken < k and any(queues):
            for q in queues:
                if q and taken < k:
                    out.append(q.pop(0))
                    taken += 1
    return out


def _load_eval(r: Run, folder: Path) -> None:
    r.summary, r.eval_dir = _json(folder / "summary.json"), folder
    if r.summary and "benchmarks" in r.summary and (folder / "samples.jsonl").is_file():
        rows = _jsonl(folder / "samples.jsonl")
        r.acc = accuracy_by_problem(rows, r.summary) or None
        r.examples = pick_examples(rows)


def evaluates(summary: dict | None, run: Path, config: dict | None) -> bool:
    """Is this evaluation (its summary's model) of the run's final model? Told by the run's
    config (train.out/final) or folder (RUN/final): the same path resolved, else the same
    last two parts (the run folder's name and final: a path written on another machine)."""
    model = (summary or {}).get("model")
    if not isinstance(model, str) or not model:
        return False
    train = (config or {}).get("train") or {}
    targets = [run / "final"] + [Path(train[k]) / "final" for k in ("out", "out_dir") if train.get(k)]
    m = Path(model)
    return any(m.resolve() == t.resolve() or m.parts[-2:] == t.parts[-2:] for t in targets)


def pair_evaluations(runs: list[Run]) -> list[Run]:
    """Evaluation folders given beside the training runs they evaluate join those runs (paired
    by the run's config, whatever the folders are called); the rest stay as they are."""
    trained = [r for r in runs if r.config and r.summary is None]
    out = []
    for r in runs:
        run = next((t for t in trained if r.summary and not (r.config or r.log) and evaluates(r.summary, t.path, t.config)),
                   None)
        if run is None:
            out.append(r)
            continue
        run.summary, run.eval_dir, run.acc, run.examples = r.summary, r.eval_dir, r.acc, r.examples
        trained.remove(run)
    return out


def objective_label(config: dict | None) -> str | None:
    """What a run trained with: its objective, or its schedule when the objective moved."""
    train = (config or {}).get("train") or {}
    return train.get("objective_schedule") or train.get("objective")


def load_run(path: Path, name: str | None = None) -> Run:
    p = Path(path)
    if p.is_file():  # a probe.json / summary.json / token_probs.json given directly
        data = _json(p)
        if not isinstance(data, dict):
            raise ReportError(f"{p}: not a probe, evaluation summary or token-probability analysis file")
        r = Run(name or p.stem, p.parent)
        key = ("probe" if "recommendation" in data else "general" if is_general(data)
               else "summary" if "benchmarks" in data else "analysis" if "p_edges" in data else None)
        if key is None:
            raise ReportError(f"{p}: not a probe, evaluation summary or token-probability analysis file")
        if key == "summary":
            r.name = name or p.parent.name
            _load_eval(r, p.parent)
        else:
            setattr(r, key, data)
        return r
    if not p.is_dir():
        raise ReportError(f"{p}: no such file or folder")
    r = Run(name or p.name, p)
    cfg = p / "config.yaml"
    r.config = yaml.safe_load(cfg.read_text()) if cfg.is_file() else None
    r.log = _jsonl(p / "log.jsonl")
    r.eval_curve = _jsonl(p / "eval_curve.jsonl")
    if (p / "summary.json").is_file():
        _load_eval(r, p)
    elif (p / "eval" / "summary.json").is_file():  # RUN/eval: attached when it evaluates this run's model
        _load_eval(r, p / "eval")
        if r.config and not evaluates(r.summary, p, r.config):
            r.summary = r.acc = None
            r.examples = []
    if is_general(r.summary):  # a general-suite folder (dftune eval-general)
        r.general, r.summary, r.acc, r.examples = r.summary, None, None, []
    if r.summary is None:
        r.eval_dir = None
    r.general = r.general or _json(p / "general" / "summary.json")
    r.analysis = _json(p / "token_probs.json") or _json(p / "analysis" / "token_probs.json")
    r.probe = _json(p / "probe.json")
    if not any([r.config, r.log, r.summary, r.analysis, r.probe, r.general]):
        raise ReportError(f"{p}: nothing to report (no config.yaml, log.jsonl, summary.json, token_probs.json, probe.json)")
    return r


# ---- groups: which runs are compared with which ------------------------------------------------


def _axis(axes: list[str], want: str | None) -> str | None:
    return next((a for a in axes if want and (a == want or a.split(".")[-1] == want)), None)


def _label(values: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in values.items())


def sweep_groups(folder: Path, sweep: dict, runs: dict[str, Run]) -> list[Group]:
    """One group per setting of the axes other than compare (objective) and replicate (seed).
    sweep.json's "roles" names them; without it: objective, seed, baseline nll."""
    roles, axes = sweep.get("roles") or {}, list(sweep.get("axes", []))
    rep = _axis(axes, roles.get("replicate", "seed"))
    cmp = _axis(axes, roles.get("compare", "objective")) or next((a for a in axes if a != rep), None)
    others = [a for a in axes if a not in (cmp, rep)]
    groups: dict[str, Group] = {}
    for pt in sweep.get("points", []):
        r = runs.get(str((folder / pt["name"]).resolve()))
        if r is None:
            continue
        values = {a: pt["values"].get(a) for a in others}
        g = groups.setdefault(_label(values), Group(_label(values), values))
        arm = str(pt["values"].get(cmp)) if cmp else pt["name"]
        g.arms.setdefault(arm, Arm(arm)).runs.append(r)
    for g in groups.values():
        want = roles.get("baseline", "nll")
        g.baseline = want if want in g.arms else None
    return list(groups.values())


IGNORED_KEYS = ("train.seed", "train.objective", "train.objective_schedule", "train.out", "train.resume",
                "train.overwrite")


def run_groups(runs: list[Run]) -> list[Group]:
    """Runs given one by one: one group; runs with the same objective that differ only in their
    seed are replicates of it, anything else is its own entry (named by its folder)."""
    runs = [r for r in runs if r.summary or r.log]
    if not runs:
        return []
    key = {id(r): str(objective_label(r.config) or r.name) for r in runs}
    flat = {id(r): {k: v for k, v in flatten(r.config or {}).items() if k not in IGNORED_KEYS} for r in runs}
    for r in runs:
        same = [x for x in runs if key[id(x)] == key[id(r)]]
        if any(json.dumps(flat[id(x)], sort_keys=True, default=str) != json.dumps(flat[id(r)], sort_keys=True, default=str)
               for x in same):
            for x in same:
                key[id(x)] = x.name
    g = Group("", {})
    for r in runs:
        g.arms.setdefault(key[id(r)], Arm(key[id(r)])).runs.append(r)
    evaluated = [a for a in g.arms.values() if any(r.summary for r in a.runs)]
    g.baseline = "nll" if "nll" in g.arms else evaluated[0].name if evaluated else None
    return [g]


def _suffix_match(name: str, g: Group) -> bool:
    vals = [str(v) for v in g.values.values()]
    return any(name == v or name.endswith((f"_{v}", f"-{v}")) for v in vals)


def attach(groups: list[Group], extras: list[Run]) -> list[tuple[str, Run]]:
    """Give each group its token analysis and probe (named for it: analysis_weak, probe_weak, or
    the only ones); return every analysis as (label, run) for the token section."""
    analyses = [r for r in extras if r.analysis]
    probes = [r for r in extras if r.probe]
    for kind, pool in (("analysis", analyses), ("probe", probes)):
        for g in groups:
            match = [r for r in pool if _suffix_match(r.name, g) or (kind == "probe" and _suffix_match(
                str(r.probe.get("model", "")).split(" ")[0], g))]
            if not match and len(groups) == 1 and len(pool) == 1:
                match = pool
            if match:
                setattr(g, kind, match[0])
    labelled = {id(g.analysis): g.label for g in groups if g.analysis is not None}
    return [(labelled.get(id(r)) or r.name, r) for r in analyses]


# ---- the page -----------------------------------------------------------------------------------


def _rel(path: Path, base: Path | None) -> str:
    if base is None:
        return str(path)
    try:
        return os.path.relpath(Path(path).resolve(), base.resolve())
    except ValueError:  # another drive (Windows)
        return str(path)


def build_report(paths: list[str | Path], title: str = "dftune report", base: str | Path | None = None) -> str:
    """The page for ``paths``; paths on it are relative to ``base`` (the report's folder)."""
    base = Path(base) if base is not None else None
    runs, seen, sweeps, extras = [], {}, [], []
    for p in paths:
        p = Path(p)
        sweep = _json(p / "sweep.json") if p.is_dir() else None
        if sweep:  # a sweep folder: every point's run folder
            pts = [load_run(p / pt["name"]) for pt in sweep.get("points", []) if (p / pt["name"]).is_dir()]
            sweeps.append((p, sweep, pts, _json(p / "tables.json")))
            runs += pts
            continue
        r = load_run(p)
        if r.name in seen:  # same folder name twice: qualify with the parent
            r.name = f"{p.resolve().parent.name}/{r.name}"
        seen[r.name] = r
        runs.append(r)
    runs = pair_evaluations(runs)
    extras = [r for r in runs if not (r.summary or r.log)]
    groups = []
    for folder, sweep, pts, _ in sweeps:
        groups += sweep_groups(folder, sweep, {str(r.path.resolve()): r for r in pts})
    in_sweeps = {id(r) for _, _, pts, _ in sweeps for r in pts}
    groups += run_groups([r for r in runs if id(r) not in in_sweeps])
    groups = [score_group(g) for g in groups if g.arms]
    extra_ids = {id(r) for r in extras}
    analyses = attach(groups, extras + [r for r in runs if r.analysis and id(r) not in extra_ids])
    found = findings(groups, [(label, r.analysis) for label, r in analyses])
    ctx = P.Context(runs=runs, groups=groups, analyses=analyses, colors=S.colors_for(groups, analyses),
                    rel=lambda x: _rel(x, base))
    body = "".join([
        S.summary_section(ctx, found),
        "".join(S.tables_section(t, folder.name) for folder, _, _, t in sweeps if t),
        S.analysis_section(ctx, found), S.probe_section(ctx), S.curves_section(ctx), S.gradient_section(ctx),
        E.eval_section(ctx),
        E.compare_section(ctx, [r for r in runs if id(r) not in in_sweeps]),
        "".join(E.sweep_section(folder, sweep, pts) for folder, sweep, pts, _ in sweeps),
        E.general_section(runs), E.samples_section(ctx), E.config_section(ctx),
    ])
    inputs = "".join(f"<li><code>{P.esc(_rel(Path(p), base))}</code></li>" for p in paths)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{P.esc(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{P.CSS}</style></head><body>"
            f"<h1>{P.esc(title)}</h1><p class='meta'>Generated {time.strftime('%Y-%m-%d %H:%M')} from {len(paths)} "
            f"input{'s' if len(paths) != 1 else ''} (listed at the end); paths relative to this page's folder.</p>"
            f"{body}<h2>Inputs</h2><ul>{inputs}</ul><script>{P.JS}</script></body></html>")


def validate_report(cfg: ReportConfig) -> None:
    """`dftune report`'s settings: inputs that exist, an output file to write."""
    from dftune.settings import Problems

    p = Problems()
    if p.nonempty("inputs", cfg.inputs, "run, evaluation, analysis or sweep folders (or probe.json files)"):
        for path in cfg.inputs:
            p.check(Path(path).exists(), f"inputs: {path} not found")
    if p.nonempty("output", cfg.output, "the HTML file to write (-o report.html)"):
        p.check(not Path(cfg.output).is_dir(), f"output: {cfg.output} is a folder; give the HTML file to write")
    p.raise_all()


def write_report(paths, out: str | Path, title: str = "dftune report") -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(build_report(paths, title, base=out.parent), encoding="utf-8")
    tmp.replace(out)
    return out
