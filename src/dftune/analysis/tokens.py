"""Token-probability analysis and the pre-flight probe.

For each model, on a sample of a dataset (response tokens only, as in training): the
distribution of target-token probabilities on log-spaced bins (the paper's figure: SFT
lifts probabilities uniformly, DFT polarises them), the shift per bin against the base
model, the tokens that fill each bin, the biggest risers and fallers, the entropy
distribution and the mean per-token KL(base || model). The statistics come from
``token_loss`` (chunked over the vocabulary, no full logits for a batch).

    dftune analyze token-probs --models base=BASE,dft=runs/dft/final --data D --out analysis/
    dftune probe --model BASE --data D
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dftune.loss import token_loss
from dftune.model import _hidden, decoder_and_head

# log-spaced probability bins: [0, 1e-6), [1e-6, 1e-5.5), ..., [10^-0.5, 1]
P_EDGES = [0.0] + [10 ** (-6 + 0.5 * i) for i in range(13)]
ENTROPY_EDGES = [0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 100.0]


@dataclass
class TokenStats:
    """Per response token of the sample, in a fixed order shared by every model."""

    token_ids: np.ndarray  # (M,) int
    logp: np.ndarray  # (M,) log-prob of the target
    entropy: np.ndarray  # (M,)
    kl: np.ndarray | None = None  # (M,) KL(base || model), when a base was given


def load_for_analysis(path: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


@torch.no_grad()
def token_stats(model, examples, pad_id: int, *, base=None, batch_size: int = 8, progress=None) -> TokenStats:
    """Statistics of ``model`` on ``examples`` (dftune.data.Example); KL against ``base``."""
    from dftune.data import collate

    device = next(model.parameters()).device
    ids, logps, ents, kls = [], [], [], []
    _, head = decoder_and_head(model)
    bhead = decoder_and_head(base)[1] if base is not None else None
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[s:s + batch_size], pad_id).items()}
        h = _hidden(model, batch["input_ids"], batch["attention_mask"])[:, :-1]  # (B, T-1, H)
        labels = batch["labels"][:, 1:].reshape(-1)
        kw = {}
        if base is not None:
            bh = _hidden(base, batch["input_ids"], batch["attention_mask"])[:, :-1]
            kw = dict(ref_hidden=bh.reshape(-1, bh.shape[-1]), ref_weight=bhead.weight, ref_bias=getattr(bhead, "bias", None))
        res = token_loss(h.reshape(-1, h.shape[-1]), head.weight, labels, "nll", bias=getattr(head, "bias", None), **kw)
        m = res.mask
        ids.append(labels[m].cpu())
        logps.append(res.logp[m].cpu())
        ents.append(res.entropy[m].cpu())
        if res.kl is not None:
            kls.append(res.kl[m].cpu())
        if progress:
            progress(len(examples[s:s + batch_size]))
    cat = lambda xs: torch.cat(xs).double().numpy() if xs else None  # noqa: E731
    return TokenStats(torch.cat(ids).numpy(), cat(logps), cat(ents), cat(kls))


def histogram(values: np.ndarray, edges: list[float]) -> list[float]:
    """Fraction of values per bin [e_i, e_{i+1}); the last bin includes its right edge."""
    idx = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    counts = np.bincount(idx, minlength=len(edges) - 1)
    return (counts / max(len(values), 1)).tolist()


def summary(st: TokenStats) -> dict:
    p = np.exp(st.logp)
    out = {
        "tokens": int(len(p)), "mean_prob": float(p.mean()), "median_prob": float(np.median(p)),
        "frac_below_0.1": float((p < 0.1).mean()), "frac_above_0.9": float((p > 0.9).mean()),
        "mean_entropy": float(st.entropy.mean()), "nll": float(-st.logp.mean()),
    }
    if st.kl is not None:
        out["mean_kl_to_base"] = float(st.kl.mean())
    return out


def analyze(stats: dict[str, TokenStats], decode, base: str | None = None, top: int = 8) -> dict:
    """Histograms, shifts against ``base``, bin fillers, risers/fallers, entropy, KL."""
    out = {"p_edges": P_EDGES, "entropy_edges": ENTROPY_EDGES, "base": base, "models": list(stats),
           "summary": {}, "hist": {}, "entropy_hist": {}, "shift_vs_base": {}, "bin_tokens": {}, "risers": {},
           "fallers": {}}
    for name, st in stats.items():
        p = np.exp(st.logp)
        out["summary"][name] = summary(st)
        out["hist"][name] = histogram(p, P_EDGES)
        out["entropy_hist"][name] = histogram(st.entropy, ENTROPY_EDGES)
        bins = np.clip(np.searchsorted(P_EDGES, p, side="right") - 1, 0, len(P_EDGES) - 2)
        fill = []
        for b in range(len(P_EDGES) - 1):
            c = Counter(st.token_ids[bins == b].tolist())
            fill.append([[decode(t), n] for t, n in c.most_common(top)])
        out["bin_tokens"][name] = fill
    if base is not None and base in stats:
        b = stats[base]
        for name, st in stats.items():
            if name == base:
                continue
            out["shift_vs_base"][name] = [x - y for x, y in zip(out["hist"][name], out["hist"][base])]
            delta = defaultdict(list)  # per token type: mean change in log-prob
            for t, d in zip(st.token_ids.tolist(), (st.logp - b.logp).tolist()):
                delta[t].append(d)
            rows = [(decode(t), float(np.mean(v)), len(v)) for t, v in delta.items() if len(v) >= 3]
            rows.sort(key=lambda r: r[1])
            out["risers"][name] = [list(r) for r in rows[::-1][:top]]
            out["fallers"][name] = [list(r) for r in rows[:top]]
    return out


# ---- the pre-flight probe ------------------------------------------------------------------

HIGH, LOW = 0.5, 0.1  # the capability-continuum thresholds ("Beyond Log Likelihood", PAPER.md)


def recommend(s: dict) -> dict:
    """NLL, DFT or prob_power(alpha) from the base model's mean target probability."""
    mp = s["mean_prob"]
    if mp >= HIGH:
        obj = "dft"
        why = (f"The base model already gives the data's tokens a mean probability of {mp:.2f} (>= {HIGH}): a strong "
               "prior. Prior-leaning objectives (DFT, or prob_power with alpha >= 1) fit this regime: they damp the "
               "updates on the few low-probability tokens, which NLL would up-weight by 1/p.")
    elif mp <= LOW:
        obj = "nll"
        why = (f"The mean target probability is {mp:.3f} (<= {LOW}): the model has little prior for this data. DFT "
               "multiplies each token's gradient by its probability and would barely learn; NLL is the right choice.")
    else:
        alpha = round(4 * (mp - LOW) / (HIGH - LOW)) / 4  # 0 .. 1 in steps of 0.25
        obj = "nll" if alpha == 0 else ("dft" if alpha >= 1 else f"prob_power:alpha={alpha:g}")
        why = (f"The mean target probability is {mp:.2f}, between {LOW} and {HIGH}: a middling prior. An "
               f"interpolating objective is suggested ({obj}); compare it with nll and dft on a short run.")
    if s["frac_below_0.1"] > 0.3 and obj != "nll":
        why += (f" Note: {s['frac_below_0.1']:.0%} of tokens are below p = 0.1; if they carry format or new "
                "knowledge (special tokens, answer layouts), DFT may under-learn them.")
    return {"objective": obj, "reasoning": why, "thresholds": {"prior_leaning_above": HIGH, "nll_below": LOW}}


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)

