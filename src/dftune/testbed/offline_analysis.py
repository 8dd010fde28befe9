"""What each offline method changed in the model, measured (``dftune demo offline``).

On held-out samples of the base (its own evaluation samples: test problems, temperature 1.0,
graded), for every trained model against the base:

- **movement**: the relative change of the weights, ||theta - theta_0|| / ||theta_0||, and the
  mean per-token KL(base || model) on every held-out sample's response tokens (how far the
  model's next-token distributions moved where the base itself goes);
- **log-probability changes** per sample kind: the change of each sample's total log-probability
  (the sum over its response tokens and EOS, in nats) for correct samples whose every number is
  the gold derivation's ("clean"), correct samples that reach the answer through a wrong number
  ("lucky": what answer-only grading lets into the RFT data), and wrong samples; for wrong
  samples, split at the first error (the first digit where the sample's digits leave the gold
  solution's: the token where the derivation went wrong): the error token itself, the tokens
  before it (a right derivation so far) and after it (a continuation of a wrong one);
- **by the base's probability**: the mean change of log p per bin of the base's p, for correct
  and wrong samples (which tokens an objective moves: the ones the base was sure of, or unsure
  of), and the histogram of p before and after on correct and on wrong samples.

    measure(base, {"rft": path, ...}, rows, tokenizer)  # rows from held_out_rows()
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dftune.files import read_jsonl

P_BINS = [0.0, 0.1, 0.5, 0.9, 1.0]  # the base's p: unlikely, uncertain, likely, near-certain
HIST_EDGES = [0.0, 1e-3, 1e-2, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0]
KINDS = ("clean", "lucky", "wrong")
_DIGIT = re.compile(r"\d")


def first_error(completion: str, solution: str) -> int | None:
    """The character index in ``completion`` of its first digit that leaves the gold
    ``solution``'s sequence of digits (names and items may differ: only the numbers carry the
    derivation); the end of the completion when it stops short of the gold's digits; None when
    every digit agrees."""
    got = [(m.start(), m.group()) for m in _DIGIT.finditer(completion)]
    want = _DIGIT.findall(solution)
    for (pos, d), w in zip(got, want):
        if d != w:
            return pos
    if len(got) > len(want):
        return got[len(want)][0]
    return len(completion) if len(got) < len(want) else None


def held_out_rows(eval_folder: Path, problems: dict[tuple[str, str], tuple[str, str]], suffix: str) -> list[dict]:
    """The base's evaluation samples as analysis rows: {prompt (the question + ``suffix``, as
    training renders it), completion, kind (clean / lucky / wrong), error (first_error's
    character index or None), benchmark, id}. ``problems``: {(benchmark, id): (question, gold
    solution)}."""
    out = []
    for r in read_jsonl(eval_folder / "samples.jsonl"):
        question, solution = problems[(r["benchmark"], r["id"])]
        err = first_error(r["completion"], solution)
        kind = "wrong" if not r["correct"] else ("clean" if err is None else "lucky")
        out.append({"prompt": question + suffix, "completion": r["completion"], "kind": kind, "error": err,
                    "benchmark": r["benchmark"], "id": r["id"]})
    return out


def examples(rows: list[dict], tok) -> tuple[list, list[int | None]]:
    """(dftune Examples as training renders them: prompt in the chat template, response + EOS;
    per row the index among its target tokens of the token holding the first error, or None)."""
    from dftune.data import response_text, tokenize_example
    from dftune.tokenized import Example

    exs, where = [], []
    for i, r in enumerate(rows):
        ids, labels = tokenize_example(tok, [{"role": "user", "content": r["prompt"]},
                                             {"role": "assistant", "content": r["completion"]}],
                                       "prompt_completion", f"held-out:{i}")
        exs.append(Example(ids, labels, f"held-out:{i}"))
        j = None
        if r["error"] is not None:
            text = response_text(tok, r["completion"])
            shift = len(text) - len(r["completion"])  # the plain template's leading space
            spans = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            j = next((k for k, (a, b) in enumerate(spans) if a <= r["error"] + shift < b), len(spans))  # len: EOS
        where.append(j)
    return exs, where


def weight_change(base, model) -> float:
    """||theta - theta_0|| / ||theta_0|| over every parameter (the L2 norm of all of them)."""
    import torch

    num = den = 0.0
    b = dict(base.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            q = b[name].double()
            num += float((p.double() - q).pow(2).sum())
            den += float(q.pow(2).sum())
    return (num / den) ** 0.5


def _mean(x) -> float | None:
    return float(np.mean(x)) if len(x) else None


def compare(base_st, st, exs: list, where: list[int | None], rows: list[dict]) -> dict:
    """The summary of one model against the base (``token_stats`` of each on the same examples;
    ``st`` with KL to the base)."""
    from dftune.analysis.tokens import histogram

    lengths = [sum(1 for x in e.labels[1:] if x != -100) for e in exs]  # targets per example (shifted labels)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    d = st.logp - base_st.logp  # (M,) change of each target token's log-probability
    p0, p1 = np.exp(base_st.logp), np.exp(st.logp)
    kind = np.repeat([r["kind"] for r in rows], lengths)
    out = {"kl_per_token": float(st.kl.mean()), "entropy_change": float((st.entropy - base_st.entropy).mean()),
           "samples": {k: sum(r["kind"] == k for r in rows) for k in KINDS}}
    seq = np.array([d[a:b].sum() for a, b in zip(starts[:-1], starts[1:])])
    for k in KINDS:
        sel = [i for i, r in enumerate(rows) if r["kind"] == k]
        out[f"dlogp_seq_{k}"] = _mean(seq[sel])
    at, before, after = [], [], []
    for i, r in enumerate(rows):
        j = where[i]
        if r["kind"] != "wrong" or j is None:
            continue
        a, b = starts[i], starts[i + 1]
        j = min(j, b - a - 1)
        at.append(d[a + j])
        before.extend(d[a:a + j])
        after.extend(d[a + j + 1:b])
    out.update({"dlogp_error_token": _mean(at), "dlogp_before_error": _mean(before), "dlogp_after_error": _mean(after)})
    good = (kind == "clean") | (kind == "lucky")
    bins = {}
    for side, sel in (("correct", good), ("wrong", kind == "wrong")):
        idx = np.clip(np.searchsorted(P_BINS, p0[sel], side="right") - 1, 0, len(P_BINS) - 2)
        bins[side] = [{"p_base": [P_BINS[i], P_BINS[i + 1]], "tokens": int((idx == i).sum()),
                       "dlogp": _mean(d[sel][idx == i])} for i in range(len(P_BINS) - 1)]
        out[f"hist_{side}"] = {"edges": HIST_EDGES, "base": histogram(p0[sel], HIST_EDGES),
                               "model": histogram(p1[sel], HIST_EDGES)}
    out["by_base_p"] = bins
    return out


def measure(base: str | Path, models: dict[str, str | Path], rows: list[dict], batch_size: int = 32) -> dict:
    """{name: compare(...) plus weight_change} for every model, on ``rows`` (held_out_rows)."""
    import torch

    from dftune.analysis.tokens import token_stats
    from dftune.model import load_pretrained, load_tokenizer

    tok = load_tokenizer(str(base))
    exs, where = examples(rows, tok)
    device = torch.device("cpu")
    base_model = load_pretrained(str(base), dtype=torch.float32, device=device).eval()
    base_st = token_stats(base_model, exs, tok.pad_token_id, batch_size=batch_size)
    out = {}
    for name, path in models.items():
        model = load_pretrained(str(path), dtype=torch.float32, device=device).eval()
        st = token_stats(model, exs, tok.pad_token_id, base=base_model, batch_size=batch_size)
        out[name] = {"weight_change": weight_change(base_model, model), **compare(base_st, st, exs, where, rows)}
    return out
