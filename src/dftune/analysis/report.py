"""One self-contained HTML report comparing runs: plots embedded, no network needed.

    dftune report runs/nll runs/dft evals/base analysis/ -o report.html

Each argument is a run folder (config.yaml, log.jsonl, and optionally eval/, analysis/, general/,
probe.json inside), an evaluation folder (summary.json), an analysis folder
(token_probs.json), a probe file, a sweep folder (sweep.json) or a general-suite folder
(`dftune eval-general`; the first is the reference). What is found is shown:
evaluation table, learning curves, token-probability histograms, probe results, config
differences, and for sweeps one plot per grid axis.
"""

from __future__ import annotations

import base64
import html
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dftune.analysis import plots
from dftune.errors import UserError
from dftune.eval.general import is_summary as is_general


@dataclass
class ReportConfig:
    """Settings of `dftune report`.

    inputs: run, evaluation, analysis, sweep or general-suite folders; probe.json files.
    output: the HTML file to write.
    title: the page title.
    """

    inputs: list[str] = field(default_factory=list, metadata={"split": False})
    output: str = "report.html"
    title: str = "dftune report"


class ReportError(UserError, ValueError):
    """An input that is not something the report can read."""


CURVES = [("loss", "objective loss", True), ("nll", "NLL (always logged)", False), ("mean_prob", "mean target p", False),
          ("entropy", "entropy (nats)", False), ("grad_norm", "grad norm", True), ("lr", "learning rate", False),
          ("kl_ref", "KL(reference || model)", False)]


@dataclass
class Run:
    name: str
    path: Path
    config: dict | None = None
    log: list = field(default_factory=list)
    eval_curve: list = field(default_factory=list)
    summary: dict | None = None  # evaluation summary.json
    analysis: dict | None = None  # token_probs.json
    probe: dict | None = None
    general: dict | None = None  # general-suite (lm-eval) summary.json


def _jsonl(path: Path) -> list:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a torn last line of a live run
    return out


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def load_run(path: Path, name: str | None = None) -> Run:
    p = Path(path)
    if p.is_file():  # a probe.json / summary.json / token_probs.json given directly
        data = json.loads(p.read_text())
        r = Run(name or p.stem, p.parent)
        key = ("probe" if "recommendation" in data else "general" if is_general(data)
               else "summary" if "benchmarks" in data else "analysis" if "p_edges" in data else None)
        if key is None:
            raise ReportError(f"{p}: not a probe, evaluation summary or token-probability analysis file")
        setattr(r, key, data)
        return r
    if not p.is_dir():
        raise ReportError(f"{p}: no such file or folder")
    r = Run(name or p.name, p)
    cfg = p / "config.yaml"
    r.config = yaml.safe_load(cfg.read_text()) if cfg.is_file() else None
    r.log = _jsonl(p / "log.jsonl")
    r.eval_curve = _jsonl(p / "eval_curve.jsonl")
    r.summary = _json(p / "summary.json") or _json(p / "eval" / "summary.json")
    if is_general(r.summary):  # a general-suite folder (dftune eval-general)
        r.general, r.summary = r.summary, None
    r.general = r.general or _json(p / "general" / "summary.json")
    r.analysis = _json(p / "token_probs.json") or _json(p / "analysis" / "token_probs.json")
    r.probe = _json(p / "probe.json")
    if not any([r.config, r.log, r.summary, r.analysis, r.probe, r.general]):
        raise ReportError(f"{p}: nothing to report (no config.yaml, log.jsonl, summary.json, token_probs.json, probe.json)")
    return r


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(head: list[str], rows: list[list], cls: str = "sortable") -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def eval_section(runs: list[Run]) -> str:
    with_eval = [r for r in runs if r.summary]
    if not with_eval:
        return ""
    benches = sorted({b for r in with_eval for b in r.summary["benchmarks"]})
    rows = []
    for r in with_eval:
        n = r.summary["sampling"]["n"]
        cells = [html.escape(r.name)]
        for b in benches:
            m = r.summary["benchmarks"].get(b)
            if not m:
                cells.append("")
                continue
            cells.append(f"{100 * m[f'avg@{n}']:.2f} ± {100 * m['std']:.2f}<br><small>pass@{n} = {100 * m.get(f'pass@{n}', 0):.1f}"
                         f" · {m['problems']} problems</small>")
        mean = r.summary.get("mean", {}).get(f"avg@{n}")
        cells.append("" if mean is None else f"<b>{100 * mean:.2f}</b>")
        rows.append(cells)
    n0 = with_eval[0].summary["sampling"]["n"]
    return (f"<h2>Evaluation</h2><p>avg@k (mean accuracy over k={n0} samples per problem, the paper's number) ± the "
            f"standard deviation over the k samples, in %; pass@k below.</p>" + _table(["run"] + benches + ["mean"], rows))


def general_section(runs: list[Run]) -> str:
    """General capability (forgetting): the first run with a general-suite result is the reference
    (list the base model first); every other is shown beside it with the difference."""
    from dftune.eval.general import (
        compare_general,
        fmt,
        headline,
        is_fraction,
        metric_label,
    )

    with_general = [r for r in runs if r.general]
    if not with_general:
        return ""
    ref, others = with_general[0], with_general[1:]
    comps = [compare_general(ref.general, r.general) for r in others]
    tasks = [t for t, _ in headline(ref.general)]
    tasks += [t for r in others for t, _ in headline(r.general) if t not in tasks]
    head = ["task", "metric", f"{ref.name} (reference)"]
    for r in others:
        head += [r.name, f"Δ {r.name}"]
    rows = []
    for t in tasks:
        e = ref.general["tasks"].get(t) or next(r.general["tasks"][t] for r in others if t in r.general["tasks"])
        key = e["primary"]
        m = ref.general["tasks"].get(t, {}).get("metrics", {}).get(key, {})
        vals = [m.get("value")] + [r.general["tasks"].get(t, {}).get("metrics", {}).get(key, {}).get("value")
                                   for r in others]
        pct = is_fraction(key, *vals)
        cells = [html.escape(t), html.escape(metric_label(key)), fmt(m.get("value"), m.get("stderr"), pct)]
        for c in comps:
            row = next((x for x in c["rows"] if x["task"] == t and x["metric"] == key), None)
            if row is None:
                cells += ["", ""]
                continue
            cells.append(fmt(row["tuned"], row["tuned_stderr"], pct))
            sign = "+" if row["delta"] is not None and row["delta"] >= 0 else ""
            delta = sign + fmt(row["delta"], row["stderr"], pct)
            if row["z"] is not None and abs(row["z"]) >= 1.96:  # outside the 95% interval: coloured
                good = (row["delta"] > 0) == (row["higher_is_better"] is not False)
                delta = f"<b style='color:{'#1a7f37' if good else '#c62828'}'>{delta}</b>"
            cells.append(delta)
        rows.append(cells)
    notes = "".join(f"<p><b>Not like for like:</b> {html.escape(r.name)} was evaluated with other settings "
                    f"({html.escape(', '.join(c['settings_differ']))}).</p>" for r, c in zip(others, comps)
                    if c["settings_differ"])
    return ("<h2>General capability (forgetting)</h2><p>lm-evaluation-harness tasks, headline metric of each; "
            "value ± stderr, in % for accuracies. Δ = run − reference ± sqrt(se₁² + se₂²) (conservative: "
            "both models answer the same questions); coloured when |Δ| ≥ 1.96 × that stderr and it is positive "
            "(green: better, red: worse). Every subtask and metric: results.md in each folder.</p>"
            + notes + _table(head, rows))


def curves_section(runs: list[Run]) -> str:
    logged = [r for r in runs if r.log]
    if not logged:
        return ""
    figs = []
    for key, label, logy in CURVES:
        series = {r.name: [(x["step"], x[key]) for x in r.log if key in x] for r in logged}
        if any(series.values()):
            positive = all(v > 0 for pts in series.values() for _, v in pts)
            figs.append(_img(plots.curves(series, label, label, logy=logy and positive), label))
    evals = {r.name: r.eval_curve for r in logged if r.eval_curve}
    if evals:
        benches = sorted({k for rows in evals.values() for row in rows for k in row if k != "step"})
        for b in benches:
            series = {name: [(row["step"], row[b]) for row in rows if b in row] for name, rows in evals.items()}
            figs.append(_img(plots.curves(series, "accuracy", f"periodic eval: {b}"), f"eval {b}"))
    return "<h2>Learning curves</h2><p>DFT's loss is 10-20x smaller than NLL by construction; NLL is logged for every " \
           "objective so they can be compared.</p><div class='grid'>" + "".join(figs) + "</div>"


def analysis_section(runs: list[Run]) -> str:
    out = []
    for r in runs:
        a = r.analysis
        if not a:
            continue
        out.append(f"<h3>{html.escape(r.name)}</h3>")
        out.append(_img(plots.prob_histogram(a, f"Token probabilities ({r.name})"), "histogram"))
        out.append(_img(plots.shift_plot(a), "shift"))
        out.append(_img(plots.entropy_histogram(a), "entropy"))
        keys = ["tokens", "mean_prob", "median_prob", "frac_below_0.1", "frac_above_0.9", "mean_entropy", "nll",
                "mean_kl_to_base"]
        rows = [[html.escape(m)] + [_fmt(s.get(k)) for k in keys] for m, s in a["summary"].items()]
        out.append(_table(["model"] + keys, rows))
        fills = a["bin_tokens"]
        lowest = [i for i in range(len(a["p_edges"]) - 1) if any(f[i] for f in fills.values())][:2]
        low = [[html.escape(m)] + [html.escape(", ".join(f"{t!r}×{n}" for t, n in fill[i])) for i in lowest]
               for m, fill in fills.items()]
        out.append("<p>Tokens filling the two lowest occupied probability bins (the paper found connectives and "
                   "punctuation in the lowest):</p>" + _table(["model"] + [f"p in {_edge(a, i)}" for i in lowest], low))
        for m in a.get("risers", {}):
            rs = ", ".join(f"{html.escape(repr(t))} ({d:+.2f})" for t, d, _ in a["risers"][m])
            fs = ", ".join(f"{html.escape(repr(t))} ({d:+.2f})" for t, d, _ in a["fallers"][m])
            out.append(f"<p><b>{html.escape(m)}</b> vs {html.escape(str(a['base']))}: biggest risers (mean Δ log p) "
                       f"{rs}; fallers {fs}.</p>")
    return "<h2>Token probabilities</h2>" + "".join(out) if out else ""


def _edge(a, i):
    e = a["p_edges"]
    return f"[{e[i]:.0e}, {e[i + 1]:.0e})"


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def probe_section(runs: list[Run]) -> str:
    rows = []
    for r in runs:
        if r.probe:
            s, rec = r.probe["stats"], r.probe["recommendation"]
            rows.append([html.escape(r.probe.get("model", r.name)), _fmt(s["mean_prob"]), _fmt(s["frac_below_0.1"]),
                         _fmt(s["frac_above_0.9"]), _fmt(s["mean_entropy"]), f"<b>{html.escape(rec['objective'])}</b>",
                         html.escape(rec["reasoning"])])
    if not rows:
        return ""
    return "<h2>Pre-flight probe</h2>" + _table(
        ["model", "mean p", "p<0.1", "p>0.9", "entropy", "recommended", "why"], rows)


def config_section(runs: list[Run]) -> str:
    cfgs = {r.name: _flat(r.config) for r in runs if r.config}
    if len(cfgs) < 2:
        return ""
    keys = sorted({k for c in cfgs.values() for k in c})
    differ = [k for k in keys if len({json.dumps(c.get(k)) for c in cfgs.values()}) > 1 and not k.endswith("out_dir")]
    rows = [[html.escape(k)] + [html.escape(str(c.get(k))) for c in cfgs.values()] for k in differ]
    return "<h2>Config differences</h2>" + (_table(["key"] + list(cfgs), rows) if rows else "<p>None.</p>")


def sweep_section(paths: list[Path], runs: list[Run]) -> str:
    out = []
    for p in paths:
        sweep = _json(Path(p) / "sweep.json") if Path(p).is_dir() else None
        if not sweep:
            continue
        by_dir = {str(r.path.resolve()): r for r in runs}
        points = []
        for pt in sweep["points"]:
            r = by_dir.get(str((Path(p) / pt["name"]).resolve()))
            if r and r.summary:
                n = r.summary["sampling"]["n"]
                points.append((pt["values"], 100 * r.summary["mean"][f"avg@{n}"]))
        for axis in sweep["axes"]:
            if axis.endswith("seed"):
                continue
            lines: dict[str, dict[float, list[float]]] = {}
            for values, acc in points:
                other = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in values.items() if k != axis and not k.endswith("seed"))
                lines.setdefault(other or "all", {}).setdefault(values[axis], []).append(acc)
            numeric = all(isinstance(x, (int, float)) for ln in lines.values() for x in ln)
            if not numeric:
                continue
            pts = {k: [(x, statistics.mean(v), statistics.pstdev(v) if len(v) > 1 else 0.0) for x, v in ln.items()]
                   for k, ln in lines.items()}
            logx = all(x > 0 for ln in lines.values() for x in ln) and max(x for ln in lines.values() for x in ln) / max(
                min(x for ln in lines.values() for x in ln), 1e-30) >= 10
            out.append(_img(plots.axis_plot(pts, axis, "mean accuracy (%)", logx), axis))
        out.append(_grouped_table(p, sweep, by_dir))
    return "<h2>Sweep</h2><div class='grid'>" + "".join(out) + "</div>" if out else ""


def _grouped_table(folder: Path, sweep: dict, by_dir: dict) -> str:
    """Mean ± spread over seeds of avg@k per benchmark, one row per other grid setting."""
    groups: dict[str, dict[str, list[float]]] = {}
    for pt in sweep["points"]:
        r = by_dir.get(str((Path(folder) / pt["name"]).resolve()))
        if not (r and r.summary):
            continue
        n = r.summary["sampling"]["n"]
        key = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in pt["values"].items() if not k.endswith("seed")) or "all"
        for b, m in r.summary["benchmarks"].items():
            groups.setdefault(key, {}).setdefault(b, []).append(100 * m[f"avg@{n}"])
        groups[key].setdefault("mean", []).append(100 * r.summary["mean"][f"avg@{n}"])
    if not groups:
        return ""
    cols = sorted({b for g in groups.values() for b in g if b != "mean"}) + ["mean"]

    def cell(v):
        return "" if not v else f"{statistics.mean(v):.2f} ± {statistics.pstdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"

    rows = [[html.escape(k), str(len(g["mean"]))] + [cell(g.get(c, [])) for c in cols] for k, g in groups.items()]
    return ("<p>Accuracy (avg@k, %) as mean ± spread over seeds.</p>"
            + _table(["setting", "seeds"] + cols, rows))


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f0f0f0;cursor:pointer}img{max-width:100%;margin:4px}.grid{display:flex;flex-wrap:wrap}
.grid img{width:48%}small{color:#666}"""
JS = """document.querySelectorAll('table.sortable th').forEach(function(th, i){th.addEventListener('click', function(){
var tb=th.closest('table').tBodies[0];var rows=Array.from(tb.rows);var asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
rows.sort(function(a,b){var x=parseFloat(a.cells[i].textContent),y=parseFloat(b.cells[i].textContent);
if(isNaN(x)||isNaN(y)){x=a.cells[i].textContent;y=b.cells[i].textContent;}return (x>y?1:x<y?-1:0)*(asc?1:-1);});
rows.forEach(function(r){tb.appendChild(r);});});});"""


def build_report(paths: list[str | Path], title: str = "dftune report") -> str:
    runs, seen = [], {}
    for p in paths:
        p = Path(p)
        sweep = _json(p / "sweep.json") if p.is_dir() else None
        if sweep:  # a sweep folder: every point's run folder
            for pt in sweep["points"]:
                if (p / pt["name"]).is_dir():
                    runs.append(load_run(p / pt["name"]))
            continue
        r = load_run(p)
        if r.name in seen:  # same folder name twice: qualify with the parent
            r.name = f"{p.resolve().parent.name}/{r.name}"
        seen[r.name] = r
        runs.append(r)
    body = "".join([eval_section(runs), general_section(runs), sweep_section([Path(p) for p in paths], runs),
                    curves_section(runs), analysis_section(runs), probe_section(runs), config_section(runs)])
    inputs = "".join(f"<li>{html.escape(str(Path(p)))}</li>" for p in paths)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><p>Generated "
            f"{time.strftime('%Y-%m-%d %H:%M')} from:</p><ul>{inputs}</ul>{body}<script>{JS}</script></body></html>")


def write_report(paths, out: str | Path, title: str = "dftune report") -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(build_report(paths, title), encoding="utf-8")
    tmp.replace(out)
    return out
