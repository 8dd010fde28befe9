"""The DFT paper's reported numbers for its base models, to set beside an evaluation of one.

Source: arXiv 2508.05629 (Wu et al., "On the Generalization of SFT: A Reinforcement
Learning Perspective with Reward Rectification"), Table 1: avg@16 in % under the paper's
protocol (its harness, temperature 1.0, 4,096 new tokens), per base model: the base model,
and the model after DFT on the first 100K rows of NuminaMath-CoT. The averages over the
five benchmarks are recorded here (as the project's PAPER.md quotes them); the table's
per-benchmark cells are None until someone copies them from the paper (the machine this
was written on could not retrieve them), and are shown as "n/a" meanwhile.

A model is one of these when ``eval.model`` is its Hub id, or a folder named as the Hub
id's last part (a local download, e.g. models/Qwen2.5-Math-1.5B), case aside.
"""

from __future__ import annotations

from pathlib import PurePath

from dftune.eval.metrics import avg_key, samples_per_problem

SOURCE = "arXiv 2508.05629, Table 1 (averages as quoted in PAPER.md)"
BENCHMARKS = ("math500", "minerva_math", "olympiadbench", "aime24", "amc23")


def _entry(base_mean: float, dft_mean: float) -> dict:
    per = dict.fromkeys(BENCHMARKS)  # None: not recorded yet
    return {"base": {**per, "mean": base_mean}, "dft": {**per, "mean": dft_mean}}


PAPER_MODELS = {
    "Qwen/Qwen2.5-Math-1.5B": _entry(15.92, 31.58),
    "Qwen/Qwen2.5-Math-7B": _entry(21.25, 37.15),
    "meta-llama/Llama-3.2-3B": _entry(1.19, 4.65),
    "meta-llama/Llama-3.1-8B": _entry(1.00, 11.02),
    "deepseek-ai/deepseek-math-7b-base": _entry(2.64, 18.15),
}


def paper_model(model: str) -> str | None:
    """The Hub id of the paper's base model that ``model`` is, or None."""
    name = (model or "").strip().rstrip("/").lower()
    for hub_id in PAPER_MODELS:
        if name == hub_id.lower() or PurePath(name).name == hub_id.split("/")[-1].lower():
            return hub_id
    return None


def paper_rows(summary: dict) -> list[dict]:
    """Per paper benchmark in the summary, and the mean over the five: ours (avg@n under
    the paper grader, as a fraction; the mean only when all five were evaluated), the
    paper's base and DFT numbers (%), and ours - the paper's base (a fraction; None where
    either is missing). Empty when the model is not one of the paper's base models."""
    hub_id = paper_model(summary.get("model", ""))
    if hub_id is None:
        return []
    key, paper = avg_key(samples_per_problem(summary)), PAPER_MODELS[hub_id]
    rows = []
    for b in BENCHMARKS:
        m = summary.get("benchmarks", {}).get(b)
        if m is None:
            continue
        ours = m.get("by_grader", {}).get("paper", {}).get(key)
        rows.append((b, ours))
    # the paper's mean is over its five: ours beside it only when all five were evaluated
    complete = len(rows) == len(BENCHMARKS)
    rows.append(("mean", summary.get("mean_by_grader", {}).get("paper", {}).get(key) if complete else None))
    out = []
    for b, ours in rows:
        base, dft = paper["base"][b], paper["dft"][b]
        diff = None if ours is None or base is None else ours - base / 100
        out.append({"model": hub_id, "source": SOURCE, "benchmark": b, "ours": ours, "base": base, "dft": dft,
                    "diff": diff})
    return out
