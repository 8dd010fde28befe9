"""Figures for the report, as PNG bytes (matplotlib, Agg backend; no display needed)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _bin_labels(edges):
    def fmt(x):
        return "0" if x == 0 else f"{x:.0e}" if x < 0.01 else f"{x:.2g}"

    return [f"{fmt(a)}-{fmt(b)}" for a, b in zip(edges[:-1], edges[1:])]


def _grouped_bars(hists: dict[str, list[float]], edges, xlabel: str, title: str, height: float) -> bytes:
    """One bar per model in each bin, side by side."""
    labels = _bin_labels(edges)
    fig, ax = plt.subplots(figsize=(9, height))
    width = 0.8 / len(hists)
    for i, (m, h) in enumerate(hists.items()):
        ax.bar([x + i * width for x in range(len(labels))], h, width=width, label=m)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("fraction of tokens")
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return _png(fig)


def prob_histogram(analysis: dict, title: str = "") -> bytes:
    """Fraction of response tokens per log-spaced probability bin, models side by side."""
    return _grouped_bars(analysis["hist"], analysis["p_edges"], "target-token probability (log-spaced bins)",
                         title or "Token-probability distribution", 3.6)


def shift_plot(analysis: dict) -> bytes | None:
    if not analysis.get("shift_vs_base"):
        return None
    labels = _bin_labels(analysis["p_edges"])
    fig, ax = plt.subplots(figsize=(9, 3.2))
    for m, shift in analysis["shift_vs_base"].items():
        ax.plot(range(len(labels)), shift, marker="o", label=m)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(f"fraction minus {analysis['base']}")
    ax.set_title("Shift against the base model per bin")
    ax.legend(fontsize=8)
    return _png(fig)


def entropy_histogram(analysis: dict) -> bytes:
    return _grouped_bars(analysis["entropy_hist"], analysis["entropy_edges"],
                         "entropy of the next-token distribution (nats)", "", 3.2)


def curves(series: dict[str, list[tuple[float, float]]], ylabel: str, title: str, logy: bool = False) -> bytes:
    """series[run] = [(step, value), ...]."""
    many = len(series) > 4  # a legend beside the axes, not over the curves
    fig, ax = plt.subplots(figsize=(7.5 if many else 5.2, 3.2))
    for name, pts in series.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=name, marker="." if len(xs) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logy:
        ax.set_yscale("log")
    if many:
        ax.legend(fontsize=5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7)
    return _png(fig)


def axis_plot(points: dict[str, list[tuple[float, float, float]]], xlabel: str, ylabel: str, logx: bool) -> bytes:
    """points[line] = [(x, mean, spread), ...]: one line per other-setting, error bars."""
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    for name, pts in points.items():
        pts = sorted(pts)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    ax.legend(fontsize=7)
    return _png(fig)
