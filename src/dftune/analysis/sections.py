"""The report's answer and its why: the summary block, the demo's tables, token probabilities
per group beside the probe's recommendation, and learning curves per objective."""

from __future__ import annotations

from dftune.analysis import plots
from dftune.analysis.page import Context, details, esc, fmt, img, pct, swatch, table
from dftune.analysis.summary import TAIL_MIN, TAIL_SE, Finding, Group

INTERVAL_NOTE = ("95% intervals: a two-level bootstrap, each objective's seeds resampled (independently) and each "
                 "benchmark's problems resampled (the same draw for every objective, so Δ is paired): they cover both "
                 "the training-seed and the test-set noise.")


def colors_for(groups: list[Group], analyses: list) -> dict[str, str]:
    names = [a for g in groups for a in g.arms] + [m for _, r in analyses for m in r.analysis.get("summary", {})]
    baseline = next((g.baseline for g in groups if g.baseline), None)
    return plots.colors(names, baseline)


def _interval(ci) -> str:
    return f" <small>[{pct(ci[0])}, {pct(ci[1])}]</small>" if ci else ""


def _signed(x) -> str:
    return f"{100 * x:+.1f}"


def group_table(g: Group, colors: dict, found: list[Finding]) -> str:
    """A group's ranking (score with its interval and every seed's score; Δ to the baseline
    with its interval and p) and, under it, the group's findings."""
    rows, attrs = [], []
    for arm in g.ranking:
        seeds = len([r for r in arm.runs if r.summary])
        per = f": {' · '.join(pct(s) for s in arm.seed_scores)}" if seeds > 1 else ""
        score = f"<b>{pct(arm.score)}</b>{_interval(arm.ci95)}<br><small>{seeds} seed{'s' if seeds != 1 else ''}{per}</small>"
        if arm.name == g.baseline:
            diff = "<small>baseline</small>"
        elif arm.diff is None:
            diff = ""
        else:
            lo_hi = f" <small>[{_signed(arm.diff_ci95[0])}, {_signed(arm.diff_ci95[1])}]</small>" if arm.diff_ci95 else ""
            diff = f"<span class='{arm.verdict}'>{_signed(arm.diff)}</span>{lo_hi}"
            diff += f"<br><small>p {_p(arm.p)}</small>" if arm.p is not None else ""
        rows.append([swatch(arm.name, colors), score, diff])
        data = {"arm": arm.name, "score": arm.score, "diff": arm.diff, "lo": (arm.diff_ci95 or [None])[0],
                "hi": (arm.diff_ci95 or [None, None])[1], "p": arm.p}
        attrs.append("".join(f' data-{k}="{esc(v)}"' for k, v in data.items() if v is not None))
    head = ["objective", f"{g.metric or 'accuracy'}, %", f"Δ = objective − {g.baseline}, points" if g.baseline else "Δ"]
    label = f"<h3>{esc(g.label)}</h3>" if g.label else ""
    items = "".join(f"<li>{_finding(f, g.label)}</li>" for f in found)
    return (f"<div class='group' data-group='{esc(g.label)}'>{label}{table(head, rows, cls='rank', row_attrs=attrs)}"
            + (f"<ul class='findings'>{items}</ul>" if items else "") + "</div>")


def _finding(f: Finding, within: str | None = None) -> str:
    """The text; its group label dropped inside that group's column, else in bold."""
    if f.group and f.text.startswith(f"{f.group}: "):
        rest = esc(f.text[len(f.group) + 2:])
        return rest if f.group == within else f"<b>{esc(f.group)}</b>: {rest}"
    return esc(f.text)


def _p(p: float) -> str:
    return "&lt; 0.001" if p < 0.001 else f"= {p:.2g}"


def summary_section(ctx: Context, found: list[Finding]) -> str:
    """Did it help here, and why: per group the ranking and the findings under it."""
    groups = [g for g in ctx.groups if g.ranking]
    if not groups and not found and not ctx.groups:
        return ""
    g0 = groups[0] if groups else None
    what = ""
    if g0 is not None:
        scope = f"mean over {len(g0.benchmarks)} benchmark{'s' if len(g0.benchmarks) != 1 else ''}, " \
                f"{g0.problems} problems" if g0.benchmarks else "mean over benchmarks"
        what = (f"<p class='note'>Ranked by {esc(g0.metric)} ({esc(scope)}), in %: the mean over seeds"
                + (f"; Δ: the paired difference to {esc(g0.baseline)} on the same problems, in points, coloured when "
                   f"its interval excludes 0" if g0.baseline else "") + f". {INTERVAL_NOTE}</p>")
    else:
        what = ("<p class='note'>No evaluation results among the inputs: evaluate each run's final model "
                "(<code>dftune eval model=RUN/final out=RUN/eval</code>) to rank the objectives.</p>")
    labels = {g.label for g in groups}
    rest = "".join(f"<li>{_finding(f)}</li>" for f in found if f.group not in labels)
    return ("<section id='summary'><h2>Summary</h2><div class='groups'>"
            + "".join(group_table(g, ctx.colors, [f for f in found if f.group == g.label]) for g in groups) + "</div>"
            + (f"<ul class='findings'>{rest}</ul>" if rest else "") + what + "</section>")


def tables_section(tables, name: str) -> str:
    """A sweep folder's tables.json, rendered as given: [{title, columns, rows, note}] (or
    {"tables": [...]}); a row is a list of cells or a dict keyed by column."""
    if isinstance(tables, dict):
        tables = tables.get("tables", [])
    out = []
    for t in tables if isinstance(tables, list) else []:
        if not isinstance(t, dict):
            continue
        cols = [str(c) for c in t.get("columns", [])]
        rows = []
        for row in t.get("rows", []):
            cells = [row.get(c) for c in cols] if isinstance(row, dict) else list(row)
            rows.append([fmt(c) for c in cells])
        if not cols and rows:
            cols = [""] * len(rows[0])
        out.append(f"<h3>{esc(t.get('title', ''))}</h3>" + (f"<p class='note'>{esc(t['note'])}</p>" if t.get("note") else "")
                   + table(cols, rows))
    return f"<h2>Tables ({esc(name)})</h2>" + "".join(out) if out else ""


TOKEN_KEYS = [("mean_prob", "mean p"), ("median_prob", "median p"), ("frac_below_0.1", "p < 0.1"),
              ("frac_above_0.9", "p > 0.9"), ("mean_entropy", "entropy"), ("nll", "NLL"), ("mean_kl_to_base", "KL to base")]


def _edge(a, i):
    e = a["p_edges"]
    return f"[{e[i]:.0e}, {e[i + 1]:.0e})"


def _measured(g: Group, colors: dict) -> str:
    ranked = " > ".join(f"{swatch(a.name, colors)} {pct(a.score)}" for a in g.ranking)
    return f"<b>Measured</b> ({esc(g.metric)}, %): {ranked}" if ranked else ""


def _probe_box(g: Group, colors: dict, found_probe: list[Finding]) -> str:
    rec = (g.probe.probe.get("recommendation") or {}) if g.probe is not None and g.probe.probe else {}
    parts = []
    if rec:
        warn = "".join(f"<li><code>{esc(w.get('code', ''))}</code> {esc(w.get('message', ''))}</li>"
                       for w in rec.get("warnings", []) if isinstance(w, dict))
        parts.append(f"<b>Probe</b> (base model, before training) recommended <b>{esc(rec.get('objective', ''))}</b>: "
                     f"{esc(rec.get('reasoning', ''))}" + (f"<ul>{warn}</ul>" if warn else ""))
    if g.ranking:
        parts.append(_measured(g, colors))
    parts += [f"<i>{_finding(f)}</i>" for f in found_probe]
    if not parts:
        return ""
    return f"<div class='box'>{'<h3>' + esc(g.label) + '</h3>' if g.label else ''}{'<br>'.join(parts)}</div>"


def analysis_section(ctx: Context, found: list[Finding]) -> str:
    if not ctx.analyses:
        return ""
    panels = {label: r.analysis for label, r in ctx.analyses}
    boxes = "".join(_probe_box(g, ctx.colors, [f for f in found if f.kind == "probe" and f.group == g.label])
                    for g in ctx.groups if g.analysis is not None or g.probe is not None)
    rows = []
    for label, r in ctx.analyses:
        a = r.analysis
        eot = a.get("end_of_turn") or {}
        for m, s in a.get("summary", {}).items():
            e = (eot.get(m) or {}).get("mean_prob")
            rows.append([esc(label), swatch(m, ctx.colors)] + [fmt(s.get(k)) for k, _ in TOKEN_KEYS] + [fmt(e)])
    head = ["group", "model"] + [h for _, h in TOKEN_KEYS] + ["end-of-turn p"]
    more = [img(plots.hist_panels(panels, ctx.colors, "shift"), "shift against the base model"),
            img(plots.hist_panels(panels, ctx.colors, "entropy"), "entropy histogram")]
    for label, r in ctx.analyses:
        a = r.analysis
        fills = a.get("bin_tokens") or {}
        lowest = [i for i in range(len(a["p_edges"]) - 1) if any(f[i] for f in fills.values())][:2]
        low = [[swatch(m, ctx.colors)] + [esc(", ".join(f"{t!r}×{n}" for t, n in fill[i])) for i in lowest]
               for m, fill in fills.items()]
        if low:
            more.append(f"<h3>{esc(label)}</h3><p>Tokens filling the two lowest occupied probability bins (the paper "
                        "found connectives and punctuation in the lowest):</p>"
                        + table(["model"] + [f"p in {_edge(a, i)}" for i in lowest], low))
        for m in a.get("risers", {}):
            rs = ", ".join(f"{esc(repr(t))} ({d:+.2f})" for t, d, _ in a["risers"][m])
            fs = ", ".join(f"{esc(repr(t))} ({d:+.2f})" for t, d, _ in a.get("fallers", {}).get(m, []))
            more.append(f"<p><b>{esc(m)}</b> vs {esc(a.get('base'))}: biggest risers (mean Δ log p) {rs}; "
                        f"fallers {fs}.</p>")
    return ("<h2>Token probabilities</h2><p class='note'>Fraction of the training data's response tokens per "
            "probability bin under each model, one panel per group on the same axes (the paper: SFT raises "
            f"probabilities uniformly, DFT polarises them; a tail \"grew\" when its share rose by ≥ {100 * TAIL_MIN:.1f} "
            f"point and by more than {TAIL_SE:.0f} binomial standard errors).</p>"
            + img(plots.hist_panels(panels, ctx.colors, "p"), "token-probability histograms")
            + f"<div class='groups'>{boxes}</div>" + table(head, rows)
            + details("Shift against the base model, entropy, which tokens fill each bin, risers and fallers",
                      "".join(more)))


def probe_section(ctx: Context) -> str:
    rows = []
    for r in ctx.runs:
        if not r.probe:
            continue
        s, rec = r.probe.get("stats", {}), r.probe.get("recommendation", {})
        content = (r.probe.get("classes") or {}).get("content_all", {}).get("mean_prob")
        eot = (r.probe.get("end_of_turn") or {}).get("mean_prob")
        warns = ", ".join(w.get("code", "") for w in rec.get("warnings", []) if isinstance(w, dict))
        rows.append([esc(r.probe.get("model", r.name)), fmt(s.get("mean_prob")), fmt(content), fmt(s.get("frac_below_0.1")),
                     fmt(s.get("frac_above_0.9")), fmt(s.get("mean_entropy")), fmt(eot),
                     f"<b>{esc(rec.get('objective', ''))}</b>", esc(warns), esc(rec.get("reasoning", ""))])
    if not rows:
        return ""
    return "<h2>Pre-flight probe</h2>" + table(
        ["model", "mean p", "content p", "p<0.1", "p>0.9", "entropy", "end-of-turn p", "recommended", "warnings", "why"],
        rows)


MAIN_CURVES = [("loss", "objective loss", True), ("nll", "NLL", False), ("mean_prob", "mean target p", False),
               ("entropy", "entropy (nats)", False)]
MORE_CURVES = [("weight_mean", "mean token weight", False), ("grad_norm", "grad norm", True),
               ("lr", "learning rate", False), ("kl_ref", "KL(ref || model)", False)]


def _series(g: Group, key: str, source: str) -> dict[str, list]:
    out = {}
    for arm in g.arms.values():
        seeds = [[(x["step"], x[key]) for x in getattr(r, source) if isinstance(x.get(key), (int, float))]
                 for r in arm.runs]
        seeds = [s for s in seeds if s]
        if seeds:
            out[arm.name] = seeds
    return out


def _rows(ctx: Context, curves: list[tuple[str, str, bool, str]]) -> list[tuple[str, bool, dict]]:
    """(label, log y, {group: {objective: per-seed series}}) per curve that any run logged."""
    rows = []
    for key, label, logy, source in curves:
        panels = {g.label or "runs": s for g in ctx.groups if (s := _series(g, key, source))}
        if panels:
            positive = all(v > 0 for objs in panels.values() for seeds in objs.values() for pts in seeds for _, v in pts)
            rows.append((label, logy and positive, panels))
    return rows


def curves_section(ctx: Context) -> str:
    if not any(r.log for g in ctx.groups for a in g.arms.values() for r in a.runs):
        return ""
    benches = sorted({k for g in ctx.groups for a in g.arms.values() for r in a.runs for row in r.eval_curve
                      for k in row if k != "step"})
    main = [(k, lab, lg, "log") for k, lab, lg in MAIN_CURVES] + [(b, f"eval: {b}", False, "eval_curve") for b in benches]
    more = [(k, lab, lg, "log") for k, lab, lg in MORE_CURVES]
    main_rows, more_rows = _rows(ctx, main), _rows(ctx, more)
    return ("<h2>Learning curves</h2><p class='note'>Mean over seeds (line) and min–max over seeds (band), one "
            "colour per objective, one column per group. DFT's loss is 10-20x smaller than NLL by construction; NLL "
            "is logged for every objective so they can be compared.</p>"
            + img(plots.curve_grid(main_rows, ctx.colors), "learning curves")
            + details("Weights, gradient norm, learning rate, KL", img(plots.curve_grid(more_rows, ctx.colors),
                                                                       "more learning curves"))
            + details("Every seed", img(plots.curve_grid(main_rows + more_rows, ctx.colors, per_seed=True),
                                        "learning curves of every seed")))


# Where each step's gradient went (train.py's log): the share of the summed token weight on
# the tokens below p = 0.1 and on the protected ones, and auto's exponent and statistic.
GRADIENT_CURVES = [("auto_exponent", "auto's exponent a (0: NLL, 1: DFT)", False),
                   ("auto_pbar", "auto's pbar (data's mean p, previous step)", False),
                   ("low_p_weight", "weight share on tokens p < 0.1", False),
                   ("low_p_tokens", "token share p < 0.1", False),
                   ("protected_weight", "weight share on protected tokens", False)]


def _first_last(g: Group, key: str) -> dict[str, tuple[float, float]]:
    """{objective: (mean over seeds of the first logged value, of the last)}."""
    out = {}
    for name, seeds in _series(g, key, "log").items():
        out[name] = (sum(s[0][1] for s in seeds) / len(seeds), sum(s[-1][1] for s in seeds) / len(seeds))
    return out


def gradient_section(ctx: Context) -> str:
    """Where the gradient went, step by step: a table of first and last values per objective
    and the curves. Shown when any run logged the shares (train.py does, every step)."""
    rows = _rows(ctx, [(k, lab, lg, "log") for k, lab, lg in GRADIENT_CURVES])
    if not rows:
        return ""
    head = ["group", "objective", "auto's a (first → last)", "weight on p<0.1 (first → last)",
            "tokens p<0.1 (first → last)", "weight on protected"]
    body = []
    for g in ctx.groups:
        cols = {k: _first_last(g, k) for k in ("auto_exponent", "low_p_weight", "low_p_tokens", "protected_weight")}
        for name in g.arms:
            def cell(k, as_pct=True, name=name):
                v = cols[k].get(name)
                if v is None:
                    return ""
                return f"{pct(v[0])}% → {pct(v[1])}%" if as_pct else f"{v[0]:.2f} → {v[1]:.2f}"
            body.append([esc(g.label or "runs"), swatch(name, ctx.colors), cell("auto_exponent", False),
                         cell("low_p_weight"), cell("low_p_tokens"), cell("protected_weight")])
    return ("<h2>Where the gradient goes</h2><p class='note'>Per step, over all its tokens: the share of the summed "
            "per-token weight (NLL: 1 each; DFT: p) that falls on tokens the model gives p &lt; 0.1, and on protected "
            "tokens (NLL on special tokens: <code>protect=</code>, <code>auto</code>); for <code>auto</code>, its "
            "exponent a = clip((pbar − 0.1) / 0.4, 0, 1) and the statistic pbar it follows. Mean over seeds of the "
            "first and the last step.</p>" + table(head, body)
            + img(plots.curve_grid(rows, ctx.colors), "where the gradient goes"))
