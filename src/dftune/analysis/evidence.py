"""The evidence behind the report's summary: every run's evaluation, a paired comparison of two
evaluations, a sweep's axes, the general suite (forgetting), sample completions to spot-check
the grader, and config differences."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from dftune.analysis import plots
from dftune.analysis.page import (
    Context,
    details,
    esc,
    img,
    pct,
    relpath_value,
    table,
)
from dftune.eval.metrics import avg_key, primary_metric, samples_per_problem
from dftune.settings import flatten

FOLD_ROWS = 6  # tables longer than this are folded into <details>


def eval_section(ctx: Context) -> str:
    """One row per run (and seed): each benchmark's primary metric ± its spread over the k
    samples, pass@k, truncation; warnings."""
    with_eval = [r for r in ctx.runs if r.summary and "benchmarks" in r.summary]
    if not with_eval:
        return ""
    benches = list(dict.fromkeys(b for r in with_eval for b in r.summary["benchmarks"]))
    rows, warnings = [], []
    for r in with_eval:
        n, key = samples_per_problem(r.summary), primary_metric(r.summary)
        cells = [esc(r.name)]
        for b in benches:
            m = r.summary["benchmarks"].get(b)
            if not m or key not in m:
                cells.append("")
                continue
            extra = [f"pass@{n} {pct(m[f'pass@{n}'])}" if f"pass@{n}" in m else "", f"{esc(m.get('problems', ''))} problems"]
            if m.get("truncated"):
                extra.append(f"{pct(m['truncated'], 0)}% truncated")
            cells.append(f"{pct(m[key], 2)} ± {pct(m.get('std', 0), 2)}<br><small>{' · '.join(e for e in extra if e)}"
                         "</small>")
        mean = r.summary.get("mean", {}).get(key)
        cells.append("" if mean is None else f"<b>{pct(mean, 2)}</b>")
        rows.append(cells)
        warnings += [f"{r.name}: {w}" for w in r.summary.get("warnings", [])]
    key0 = primary_metric(with_eval[0].summary)
    graders = sorted({r.summary.get("grader", "math-verify") for r in with_eval
                      if r.summary.get("grader") in ("math-verify", "paper")}) or ["math-verify"]
    body = _table_maybe_folded(["run"] + benches + ["mean"], rows, f"Every run and seed ({len(rows)})")
    warn = "".join(f"<li>{esc(w)}</li>" for w in warnings)
    return (f"<h2>Evaluation</h2><p class='note'>{esc(key0)} in % by the {esc(' / '.join(graders))} grader (the "
            "primary one, eval.grader) ± the standard deviation over the samples' indices; pass@k, problems and the "
            "share of samples that hit the token budget below.</p>" + body + _graders_table(with_eval, benches)
            + _paper_table(with_eval) + (f"<p><b>Warnings</b></p><ul>{warn}</ul>" if warn else ""))


def _graders_table(runs: list, benches: list) -> str:
    """avg@n and maj@n under each grader (math-verify, paper), per run and benchmark."""
    def cell(m: dict, n: int) -> str:
        if avg_key(n) not in m:
            return ""
        extra = f" · pass@{n} {pct(m[f'pass@{n}'], 2)}" if f"pass@{n}" in m else ""
        return f"{pct(m[avg_key(n)], 2)}<br><small>maj@{n} {pct(m[f'maj@{n}'], 2)}{extra}</small>"

    rows = []
    for r in runs:
        n = samples_per_problem(r.summary)
        for g in ("math-verify", "paper"):
            ms = [r.summary["benchmarks"].get(b, {}).get("by_grader", {}).get(g, {}) for b in benches]
            if any(avg_key(n) in m for m in ms):
                mean = r.summary.get("mean_by_grader", {}).get(g, {})
                rows.append([esc(r.name), g] + [cell(m, n) for m in ms] + [cell(mean, n)])
    if not rows:
        return ""
    return ("<p class='note'>Under both graders: math-verify (strict) and paper (the DFT paper's harness: quote it "
            "beside the paper's numbers).</p>" + _table_maybe_folded(["run", "grader"] + benches + ["mean"], rows,
                                                                     f"Both graders ({len(rows)} rows)"))


def _paper_table(runs: list) -> str:
    """The paper's reported numbers beside ours, for runs of one of its base models."""
    from dftune.eval.paper_numbers import paper_rows

    parts = []
    for r in runs:
        found = paper_rows(r.summary)
        if not found:
            continue
        rows = [[esc(x["benchmark"]), "" if x["ours"] is None else pct(x["ours"], 2),
                 "n/a" if x["base"] is None else f"{x['base']:.2f}", "n/a" if x["dft"] is None else f"{x['dft']:.2f}",
                 "" if x["diff"] is None else f"{100 * x['diff']:+.2f}"] for x in found]
        parts.append(f"<p class='note'>{esc(r.name)} is the paper's {esc(found[0]['model'])}: its reported avg@16 "
                     f"({esc(found[0]['source'])}) beside ours under the paper grader, in %.</p>"
                     + table(["benchmark", "ours (paper grader)", "paper: base", "paper: +DFT", "ours − base"], rows))
    return "".join(parts)


def _table_maybe_folded(head, rows, summary: str) -> str:
    t = table(head, rows)
    return details(summary, t) if len(rows) > FOLD_ROWS else t


def compare_section(ctx: Context, direct: list) -> str:
    """Two evaluation folders given one by one: `dftune compare` of the second against the first
    (the first is the reference, as for the general suite), per benchmark with the sign test."""
    evals = [r for r in direct if r.eval_dir is not None and r.acc]
    if len(evals) != 2:
        return ""
    from dftune.eval.compare import CompareError, compare

    ref, run = evals
    try:  # unlike settings are compared anyway here, and said so
        c = compare(run.eval_dir, ref.eval_dir, force=True)
    except CompareError as e:
        return f"<h2>Paired comparison</h2><p>Not comparable problem by problem: {esc(e)}</p>"
    unlike = "".join(f"<li>{esc(d['key'])}: {esc(run.name)} {esc(d['a'])}, {esc(ref.name)} {esc(d['b'])}</li>"
                     for d in c.get("differences", []))
    rows = []
    for name, b in list(c["benchmarks"].items()) + [("mean", c["mean"])]:
        st = b.get("sign_test")
        cls = "better" if b["ci95"][0] > 0 else "worse" if b["ci95"][1] < 0 else ""
        rows.append([esc(name), esc(b.get("problems", "")), pct(b["b"], 2), pct(b["a"], 2),
                     f"<span class='{cls}'>{100 * b['diff']:+.2f}</span>",
                     f"{100 * b['ci95'][0]:+.2f} to {100 * b['ci95'][1]:+.2f}", f"{b['p_bootstrap']:.3g}",
                     f"{st['a_better']} / {st['b_better']} / {st['ties']}" if st else "", f"{st['p']:.3g}" if st else ""])
    head = ["benchmark", "problems", f"{ref.name} {c['metric']}", f"{run.name} {c['metric']}",
            f"Δ = {run.name} − {ref.name}", "95% CI",
            "p (bootstrap)", f"{run.name} better / worse / tied", "p (sign test)"]
    warn = (f"<p><b>Unlike evaluations</b>: their settings differ (the numbers are not comparable as they stand):"
            f"</p><ul>{unlike}</ul>" if unlike else "")
    return (f"<h2>Paired comparison</h2><p class='note'>{esc(run.name)} − {esc(ref.name)} (the first input is the "
            f"reference), problem by problem, by the {esc(c.get('grader', 'math-verify'))} grader: paired bootstrap "
            f"over problems ({c['reps']} resamples) and a sign test over the problems where they differ; in %.</p>"
            + warn + table(head, rows))


def sweep_section(folder: Path, sweep: dict, runs: list) -> str:
    by_dir = {str(r.path.resolve()): r for r in runs}
    points = []
    for pt in sweep.get("points", []):
        r = by_dir.get(str((Path(folder) / pt["name"]).resolve()))
        if r and r.summary and primary_metric(r.summary) in r.summary.get("mean", {}):
            points.append((pt["values"], 100 * r.summary["mean"][primary_metric(r.summary)]))
    out = []
    for axis in sweep.get("axes", []):
        if axis.endswith("seed"):
            continue
        lines: dict[str, dict[float, list[float]]] = {}
        for values, acc in points:
            other = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in values.items() if k != axis and not k.endswith("seed"))
            lines.setdefault(other or "all", {}).setdefault(values.get(axis), []).append(acc)
        xs = [x for ln in lines.values() for x in ln]
        if not xs or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            continue
        pts = {k: [(x, statistics.mean(v), statistics.pstdev(v) if len(v) > 1 else 0.0) for x, v in ln.items()]
               for k, ln in lines.items()}
        logx = min(xs) > 0 and max(xs) / min(xs) >= 10
        out.append(img(plots.axis_plot(pts, axis, "mean accuracy (%)", logx), axis))
    grouped = _grouped_table(folder, sweep, by_dir)
    if not out and not grouped:
        return ""
    return (f"<h2>Sweep</h2><p class='note'>{esc(folder.name)}: axes {esc(', '.join(sweep.get('axes', [])))}; "
            f"{len(sweep.get('points', []))} points.</p><div class='grid'>" + "".join(out) + "</div>" + grouped)


def _grouped_table(folder: Path, sweep: dict, by_dir: dict) -> str:
    """Mean ± spread over seeds of the primary metric per benchmark, one row per other grid setting."""
    groups: dict[str, dict[str, list[float]]] = {}
    for pt in sweep.get("points", []):
        r = by_dir.get(str((Path(folder) / pt["name"]).resolve()))
        if not (r and r.summary):
            continue
        key = primary_metric(r.summary)
        name = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in pt["values"].items() if not k.endswith("seed")) or "all"
        for b, m in r.summary["benchmarks"].items():
            if key in m:
                groups.setdefault(name, {}).setdefault(b, []).append(100 * m[key])
        if key in r.summary.get("mean", {}):
            groups.setdefault(name, {}).setdefault("mean", []).append(100 * r.summary["mean"][key])
    if not groups:
        return ""
    cols = list(dict.fromkeys(b for g in groups.values() for b in g if b != "mean")) + ["mean"]

    def cell(v):
        return "" if not v else f"{statistics.mean(v):.2f} ± {statistics.pstdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"

    rows = [[esc(k), str(len(g.get("mean", [])))] + [cell(g.get(c, [])) for c in cols] for k, g in groups.items()]
    return ("<p>Accuracy per benchmark (%), mean ± spread (population standard deviation) over seeds.</p>"
            + table(["setting", "seeds"] + cols, rows))


def general_section(runs: list) -> str:
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
        pct_ = is_fraction(key, *vals)
        cells = [esc(t), esc(metric_label(key)), fmt(m.get("value"), m.get("stderr"), pct_)]
        for c in comps:
            row = next((x for x in c["rows"] if x["task"] == t and x["metric"] == key), None)
            if row is None:
                cells += ["", ""]
                continue
            cells.append(fmt(row["tuned"], row["tuned_stderr"], pct_))
            sign = "+" if row["delta"] is not None and row["delta"] >= 0 else ""
            delta = sign + fmt(row["delta"], row["stderr"], pct_)
            if row["z"] is not None and abs(row["z"]) >= 1.96:  # outside the 95% interval: coloured
                good = (row["delta"] > 0) == (row["higher_is_better"] is not False)
                delta = f"<b style='color:{'#1a7f37' if good else '#c62828'}'>{delta}</b>"
            cells.append(delta)
        rows.append(cells)
    notes = "".join(f"<p><b>Not like for like:</b> {esc(r.name)} was evaluated with other settings "
                    f"({esc(', '.join(c['settings_differ']))}).</p>" for r, c in zip(others, comps)
                    if c["settings_differ"])
    return ("<h2>General capability (forgetting)</h2><p>lm-evaluation-harness tasks, headline metric of each; "
            "value ± stderr, in % for accuracies. Δ = run − reference ± sqrt(se₁² + se₂²) (conservative: "
            "both models answer the same questions); coloured when |Δ| ≥ 1.96 × that stderr and it is positive "
            "(green: better, red: worse). Every subtask and metric: results.md in each folder.</p>"
            + notes + table(head, rows))


def _marked(text: str, answer) -> str:
    """The completion, escaped, with the extracted answer highlighted: inside the last \\boxed{}
    holding it, else its last occurrence."""
    text = str(text or "")
    a = str(answer) if answer not in (None, "") else ""
    i = text.rfind("\\boxed{" + a) if a else -1
    i = i + len("\\boxed{") if i >= 0 else text.rfind(a) if a else -1
    if i < 0:
        return esc(text)
    return esc(text[:i]) + "<mark>" + esc(a) + "</mark>" + esc(text[i + len(a):])


def _example(r: dict) -> str:
    ok = bool(r.get("correct"))
    status = r.get("status") or ""
    verdict = ("correct" if ok else "incorrect") + (f" ({status})" if status and status != "ok" else "")
    gold = r.get("gold")
    gold = ", ".join(map(str, gold)) if isinstance(gold, list) else gold
    meta = [f"{esc(r.get('benchmark'))}:{esc(r.get('id'))}, sample {esc(r.get('sample'))}",
            f"<span class='verdict {'ok' if ok else 'bad'}'>{esc(verdict)}</span>",
            f"gold <code>{esc(gold)}</code>", f"extracted <mark>{esc(r.get('extracted'))}</mark>"]
    if r.get("rule"):
        meta.append(f"rule {esc(r['rule'])}")
    meta.append(f"{esc(r.get('num_tokens', ''))} tokens, {esc(r.get('finish_reason', ''))}")
    return (f"<div class='ex {'ok' if ok else 'bad'}'>{' · '.join(meta)}"
            f"<pre class='prompt'>{esc(r.get('prompt', ''))}</pre><pre>{_marked(r.get('completion'), r.get('extracted'))}"
            "</pre></div>")


def samples_section(ctx: Context) -> str:
    """A few completions per run, collapsed: readers trust numbers they can spot-check."""
    parts = []
    for r in ctx.runs:
        if not r.examples:
            continue
        good = sum(bool(x.get("correct")) for x in r.examples)
        parts.append(details(f"{esc(r.name)}: {good} correct, {len(r.examples) - good} incorrect",
                             "".join(_example(x) for x in r.examples)))
    if not parts:
        return ""
    return ("<h2>Sample completions</h2><p class='note'>First samples of a few problems per run, correct and "
            "incorrect: the extracted answer is highlighted in the completion, beside the gold answer and the "
            "grader's verdict.</p>" + "".join(parts))


def config_section(ctx: Context) -> str:
    cfgs = {r.name: flatten(r.config) for r in ctx.runs if r.config}
    if len(cfgs) < 2:
        return ""
    keys = sorted({k for c in cfgs.values() for k in c})
    differ = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in cfgs.values()}) > 1
              and k != "train.out"]
    rows = [[esc(k)] + [esc(relpath_value(c.get(k), ctx.rel)) for c in cfgs.values()] for k in differ]
    if not rows:
        return "<h2>Config differences</h2><p>None.</p>"
    t = table(["key"] + list(cfgs), rows)
    return "<h2>Config differences</h2>" + (details(f"{len(rows)} keys differ across {len(cfgs)} runs", t)
                                             if len(cfgs) > FOLD_ROWS else t)
