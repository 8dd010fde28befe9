"""An evaluation's numbers: summary.json (``summarize_rows``) and results.md (``markdown_table``).

Per benchmark: the primary grader's metrics at the top level (avg@n with its interval and
spread, pass@k, maj@n, the first sample), generation statistics, the grader's verdict
counts; ``by_grader``: avg@n, maj@n and pass@k under each grader (math-verify and paper).
Their means over benchmarks; warnings; and, for one of the paper's base models, the
paper's reported numbers beside ours (``paper_numbers``).
"""

from __future__ import annotations

import time
from dataclasses import asdict

from dftune.eval.grade import FAILURES, GRADER_VERSION, PROTOCOLS, STATUSES, failure_counts
from dftune.eval.paper_grade import PAPER_GRADER_VERSION
from dftune.eval.metrics import avg_key, bootstrap_means, generation_stats, interval, samples_per_problem, summarize
from dftune.eval.paper_numbers import paper_rows
from dftune.eval.vote import majority_correct

def grader_versions() -> dict:
    """Each grader's version (an evaluation refuses to mix rows graded by two versions)."""
    return {"math-verify": GRADER_VERSION, "paper": PAPER_GRADER_VERSION}


CLUSTER_TASKS = {"math-verify": "dftune.eval.vote:_cluster_task", "paper": "dftune.eval.paper_grade:cluster_task"}


def verdict_of(row: dict, grader: str) -> dict:
    """A stored sample's verdict by ``grader`` (rows written before both were stored carry
    only their own, at the top level)."""
    return row.get("verdicts", {}).get(grader) or row


def _metrics(rows: dict[str, list[dict]], n: int, cfg, grader: str) -> tuple[dict, list[float]]:
    """summarize() of one benchmark's rows (``grader``'s verdicts), with maj@n clustered by
    that grader's equivalence; and each problem's accuracy."""
    majority = majority_correct(rows, workers=cfg.grade_workers, timeout=cfg.grade_timeout,
                                cluster=CLUSTER_TASKS[grader])
    m = summarize({i: [bool(r["correct"]) for r in rs] for i, rs in rows.items()}, ks=sorted({1, 4, 8, 16, n}),
                  majority=majority)
    return m, [sum(bool(r["correct"]) for r in rs) / n for rs in rows.values()]


def summarize_rows(cfg, problems: dict, done: dict) -> dict:
    """summary.json: per benchmark the primary grader's metrics, generation statistics and
    verdict counts, and every grader's avg@n / maj@n / pass@k; their means; warnings."""
    n = cfg.sampling.n
    primary = avg_key(n)
    summary = {"model": cfg.model, "prompt": cfg.prompt, "backend": cfg.backend, "sampling": asdict(cfg.sampling),
               "n": n, "primary": primary, "grader": cfg.grader, "graders": {}, "benchmarks": {}, "mean": {},
               "mean_by_grader": {}, "warnings": [], "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    summary["graders"] = grader_versions()
    graders = [cfg.grader] + [g for g in PROTOCOLS if g != cfg.grader]
    per_problem = {g: [] for g in graders}
    for b in cfg.benchmarks:
        stored = {p.id: [done[(b, p.id)][j] for j in range(n)] for p in problems[b]}
        m, by = {}, {}
        for g in graders:
            rows = {i: [verdict_of(r, g) for r in rs] for i, rs in stored.items()}
            gm, acc = _metrics(rows, n, cfg, g)
            flat = [r for rs in rows.values() for r in rs]
            counts = failure_counts(r.get("status", "ok") for r in flat)
            failed = sum(counts[f] for f in FAILURES)
            gm["grader"] = {**counts, "failures": failed, "failure_rate": failed / max(len(flat), 1)}
            if g == cfg.grader:
                m = dict(gm)
                if gm["grader"]["failure_rate"] > cfg.warn_failures:
                    summary["warnings"].append(
                        f"{b}: the {g} grader failed on {failed} of {len(flat)} samples ("
                        + ", ".join(f"{counts[f]} {f}" for f in FAILURES if counts[f]) + "); those count as incorrect")
            by[g] = {k: v for k, v in gm.items() if k.startswith(("avg@", "maj@", "pass@")) or k in ("ci95", "grader")}
            per_problem[g].append(acc)
        m.update(generation_stats([r for rs in stored.values() for r in rs]))
        m["by_grader"] = by
        summary["benchmarks"][b] = m
    for g in graders:
        ms = [m["by_grader"][g] for m in summary["benchmarks"].values() if primary in m["by_grader"][g]]
        if ms:
            summary["mean_by_grader"][g] = {
                primary: sum(x[primary] for x in ms) / len(ms), f"maj@{n}": sum(x[f"maj@{n}"] for x in ms) / len(ms),
                "ci95": interval(bootstrap_means([p for p in per_problem[g] if p]))}
    if cfg.grader in summary["mean_by_grader"]:
        summary["mean"] = dict(summary["mean_by_grader"][cfg.grader])
    return summary


def _pct(x) -> str:
    return f"{100 * x:.2f}"


def markdown_table(summary: dict) -> str:
    """results.md: one row per benchmark and the mean (the primary grader); both graders
    side by side; the paper's numbers where it reports this model; warnings and verdicts."""
    n = samples_per_problem(summary)
    avg = avg_key(n)
    ks = sorted({k for k in (1, 4, 8, 16, n) if k <= n})
    grader = summary.get("grader") if summary.get("grader") in PROTOCOLS else "math-verify"
    head = (["benchmark", "problems", avg, "95% CI", "std"] + [f"pass@{k}" for k in ks]
            + [f"maj@{n}", "first sample", "mean tokens", "truncated", "repetitive", "grader failures"])
    lines = [f"Graded by **{grader}** (the primary grader, `eval.grader`).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b, m in summary["benchmarks"].items():
        if avg not in m:  # a benchmark with no problems
            continue
        ci = m.get("ci95", [0.0, 0.0])
        g = m.get("grader", {})
        cells = [b, str(m["problems"]), _pct(m[avg]), f"{_pct(ci[0])}-{_pct(ci[1])}", _pct(m["std"])]
        cells += [_pct(m[f"pass@{k}"]) for k in ks]
        cells += [_pct(m.get(f"maj@{n}", 0.0)), _pct(m["first_sample"]), f"{m.get('mean_tokens', 0):.0f}",
                  _pct(m.get("truncated", 0.0)), _pct(m.get("repetitive", 0.0)), str(g.get("failures", 0))]
        lines.append("| " + " | ".join(cells) + " |")
    mean = summary.get("mean", {})
    if avg in mean:
        ci = mean["ci95"]
        cells = ["**mean**", "", f"**{_pct(mean[avg])}**", f"{_pct(ci[0])}-{_pct(ci[1])}"]
        cells += [""] * (1 + len(ks)) + [_pct(mean[f"maj@{n}"])] + [""] * 5
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    text += (f"\nAccuracy in %. {avg}: mean over the {n} samples of every problem (the paper's number); 95% CI: "
             "bootstrap over problems; std: spread of the per-sample-index accuracies; truncated: samples that hit "
             "the token budget; repetitive: samples stuck in a loop.\n")
    text += both_graders_table(summary)
    text += paper_table(summary)
    if summary.get("warnings"):
        text += "\n**Warnings**\n\n" + "".join(f"- {w}\n" for w in summary["warnings"])
    text += f"\nGrader verdicts per benchmark ({grader}):\n\n| benchmark | "
    text += " | ".join(s.replace("_", " ") for s in STATUSES) + " |\n|" + "---|" * (len(STATUSES) + 1) + "\n"
    for b, m in summary["benchmarks"].items():
        text += f"| {b} | " + " | ".join(str(m.get("grader", {}).get(s, 0)) for s in STATUSES) + " |\n"
    return text


def both_graders_table(summary: dict) -> str:
    """avg@n, maj@n and pass@k under each grader, per benchmark and their mean."""
    n = samples_per_problem(summary)
    avg = avg_key(n)
    graders = [g for g in PROTOCOLS if any(g in m.get("by_grader", {}) for m in summary["benchmarks"].values())]
    if len(graders) < 2:
        return ""
    ks = [k for k in sorted({1, n}) if k <= n]
    cols = [(avg, g) for g in graders] + [(f"maj@{n}", g) for g in graders] + [
        (f"pass@{k}", g) for k in ks if k != 1 for g in graders]
    text = ("\nUnder both graders (math-verify: strict; paper: the DFT paper's harness, the one to quote beside the "
            "paper's numbers):\n\n| benchmark | " + " | ".join(f"{k} {g}" for k, g in cols) + " |\n|"
            + "---|" * (len(cols) + 1) + "\n")
    for b, m in summary["benchmarks"].items():
        by = m.get("by_grader", {})
        if not all(avg in by.get(g, {}) for g in graders):
            continue
        text += f"| {b} | " + " | ".join(_pct(by[g][k]) for k, g in cols) + " |\n"
    means = summary.get("mean_by_grader", {})
    if all(g in means for g in graders):
        text += "| **mean** | " + " | ".join(_pct(means[g][k]) if k in means[g] else "" for k, g in cols) + " |\n"
    return text


def paper_table(summary: dict) -> str:
    """The paper's reported base and DFT numbers per benchmark beside ours (paper grader),
    when the model is one of the paper's base models (by Hub id)."""
    rows = paper_rows(summary)
    if not rows:
        return ""
    head = rows[0]
    text = (f"\nThe paper's numbers for {head['model']} ({head['source']}), avg@16 in %, beside ours under the paper "
            f"grader (ours - paper's base):\n\n| benchmark | ours | paper: base | paper: +DFT | ours - base |\n"
            "|---|---|---|---|---|\n")
    def num(x):
        return "n/a" if x is None else f"{x:.2f}"

    for r in rows:
        ours = "" if r["ours"] is None else _pct(r["ours"])
        diff = "" if r["diff"] is None else f"{100 * r['diff']:+.2f}"
        name = "**mean**" if r["benchmark"] == "mean" else r["benchmark"]
        text += f"| {name} | {ours} | {num(r['base'])} | {num(r['dft'])} | {diff} |\n"
    return text
