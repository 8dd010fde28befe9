"""Figures for the report, as PNG bytes (matplotlib, Agg backend; no display needed).

One colour per objective (``colors``) on every figure and table of a page. Figures with one
panel per group (a prior, a model) share their y axis, so groups compare at a glance.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]
BASE_COLOR = "#7f7f7f"  # the untuned model
FONT = 10


def colors(names, baseline: str | None = None) -> dict[str, str]:
    """name -> colour: "base" grey, the baseline first of the palette, then in order of appearance."""
    out: dict[str, str] = {"base": BASE_COLOR}
    order = ([baseline] if baseline else []) + [n for n in names if n != baseline]
    for n in order:
        if n not in out:
            out[n] = PALETTE[(len(out) - 1) % len(PALETTE)]
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _panels(n: int, height: float, bottom: float):
    """n panels side by side sharing the y axis, room above for the legend. Fixed margins (in
    inches), not constrained layout: half the drawing time."""
    width = min(5.6 * n, 11.5)
    h = height + 0.5
    fig, axes = plt.subplots(1, n, figsize=(width, h), sharey=True, squeeze=False)
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.15 / width, bottom=bottom / h, top=1 - 0.6 / h,
                        wspace=0.08)
    return fig, list(axes[0])


def _legend(fig, handles: dict):
    """One legend for all panels, above them, in readable type."""
    if handles:
        top = 1 - 0.04 / fig.get_figheight()
        fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, top),
                   ncol=min(len(handles), 6), fontsize=FONT, frameon=False)


def _edge_label(x: float) -> str:
    return "0" if x == 0 else f"{x:.0e}".replace("e-0", "e-") if x < 0.01 else f"{x:.2g}"


def _aligned(seeds: list[list[tuple[float, float]]]):
    """Steps every seed logged, and (seeds, steps) values there; None if they share no step."""
    maps = [dict(pts) for pts in seeds if pts]
    if not maps:
        return None
    steps = sorted(set.intersection(*(set(m) for m in maps)))
    if not steps:
        return None
    return steps, np.array([[m[s] for s in steps] for m in maps], dtype=float)


def _draw(ax, objs: dict, cmap: dict, per_seed: bool, handles: dict) -> None:
    for obj, seeds in objs.items():
        c = cmap.get(obj, BASE_COLOR)
        al = None if per_seed else _aligned(seeds)
        if al is None:
            for pts in seeds:
                xs, ys = zip(*pts)
                (line,) = ax.plot(xs, ys, color=c, lw=1.0, alpha=0.8)
                handles.setdefault(obj, line)
            continue
        steps, v = al
        (line,) = ax.plot(steps, v.mean(0), color=c, lw=1.8)
        if len(v) > 1:
            ax.fill_between(steps, v.min(0), v.max(0), color=c, alpha=0.18, lw=0)
        handles.setdefault(obj, line)


def curve_grid(rows: list[tuple[str, bool, dict]], cmap: dict[str, str], per_seed: bool = False) -> bytes | None:
    """Learning curves: one row per quantity (label, log y, panels), one column per group (one
    group: the quantities two by two); panels[group][objective] = one [(step, value), ...] per
    seed. Each panel has its own y range: the objectives within a group are what is compared
    (groups can differ by an order of magnitude). The mean over seeds as a line with the
    min-max band over seeds; ``per_seed``: every seed as a thin line."""
    rows = [r for r in rows if r[2]]
    if not rows:
        return None
    groups = list(dict.fromkeys(g for _, _, panels in rows for g in panels))
    single = len(groups) == 1 and len(rows) > 1
    nr, nc = ((len(rows) + 1) // 2, 2) if single else (len(rows), len(groups))
    width, row_h, top, bottom = min(5.6 * nc, 11.5), 2.3 + 0.25 * single, 0.75, 0.5
    h = row_h * nr + top + bottom
    fig, axes = plt.subplots(nr, nc, figsize=(width, h), sharex=True if single else "col", squeeze=False)
    fig.subplots_adjust(left=0.95 / width, right=1 - 0.15 / width, top=1 - top / h, bottom=bottom / h,
                        wspace=0.25, hspace=0.3 if single else 0.12)
    handles: dict = {}
    for i, (label, logy, panels) in enumerate(rows):
        for j, g in enumerate(groups):
            ax = axes[i // 2][i % 2] if single else axes[i][j]
            _draw(ax, panels.get(g, {}), cmap, per_seed, handles)
            if logy:
                ax.set_yscale("log")
            ax.tick_params(labelsize=FONT - 1)
            if single:
                ax.set_title(f"{label} ({g})", fontsize=FONT)
            elif i == 0:
                ax.set_title(g, fontsize=FONT)
            if j == 0 and not single:
                ax.set_ylabel(label, fontsize=FONT)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=FONT)
    if single and len(rows) % 2:
        axes[-1][1].set_visible(False)
        axes[-2][1].xaxis.set_tick_params(labelbottom=True)
    _legend(fig, handles)
    return _png(fig)


def hist_panels(panels: dict[str, dict], cmap: dict[str, str], kind: str = "p") -> bytes | None:
    """One panel per group (same axes), one bar per model in each bin. kind: "p" (token
    probability), "entropy" (next-token entropy) or "shift" (fraction minus the base model's)."""
    key, edges_key, xlabel, ylabel = {
        "p": ("hist", "p_edges", "target-token probability (log-spaced bins)", "fraction of tokens"),
        "entropy": ("entropy_hist", "entropy_edges", "entropy of the next-token distribution (nats)",
                    "fraction of tokens"),
        "shift": ("shift_vs_base", "p_edges", "target-token probability (log-spaced bins)", "fraction minus base's"),
    }[kind]
    panels = {k: a for k, a in panels.items() if a.get(key)}
    if not panels:
        return None
    fig, axes = _panels(len(panels), height=3.4, bottom=0.95)
    handles = {}
    for ax, (label, a) in zip(axes, panels.items()):
        edges, hists = a[edges_key], a[key]
        width = 0.9 / len(hists)
        for i, (m, h) in enumerate(hists.items()):  # bin b spans [b, b + 1) on the x axis
            bars = ax.bar([b + 0.05 + (i + 0.5) * width for b in range(len(h))], h, width=width,
                          color=cmap.get(m, BASE_COLOR))
            handles.setdefault(m, bars)
        if kind == "shift":
            ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(edges)), [_edge_label(e) for e in edges], rotation=45, ha="right", fontsize=FONT - 2)
        ax.tick_params(axis="y", labelsize=FONT - 1)
        ax.set_title(label, fontsize=FONT)
        ax.set_xlabel(xlabel, fontsize=FONT - 1)
    values = [v for a in panels.values() for h in a[key].values() for v in h if v > 0]
    if kind != "shift" and values and max(values) / min(values) > 100:  # tails of a percent beside a peak of 90%
        axes[0].set_yscale("log")
        ylabel += " (log scale)"
    axes[0].set_ylabel(ylabel, fontsize=FONT)
    _legend(fig, handles)
    return _png(fig)


def axis_plot(points: dict[str, list[tuple[float, float, float]]], xlabel: str, ylabel: str, logx: bool) -> bytes:
    """points[line] = [(x, mean, spread), ...]: one line per other-setting, error bars."""
    fig, ax = plt.subplots(figsize=(5.6, 3.4), layout="constrained")  # one small figure per numeric sweep axis
    for name, pts in points.items():
        pts = sorted(pts)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=name)
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    if logx:
        ax.set_xscale("log")
    ax.legend(fontsize=FONT - 1)
    return _png(fig)
