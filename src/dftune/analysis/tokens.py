"""Token-probability analysis and the pre-flight probe.

For each model, on a sample of a dataset (response tokens only, as in training): the
distribution of target-token probabilities on log-spaced bins (the paper's figure: SFT
lifts probabilities uniformly, DFT polarises them), the shift per bin against the base
model, the tokens that fill each bin, the biggest risers and fallers, the entropy
distribution and the mean per-token KL(base || model), overall and per token class
(``dftune.vocab``: special/template, number, punct, content) with the end-of-turn token
on its own. The statistics come from ``token_loss`` (chunked over the vocabulary, no full
logits for a batch).

The pre-flight probe (``probe``) owns the probe JSON: the base model's statistics per
class, the probability of the end-of-turn token, the percentiles of the target
probabilities, and a recommended objective with its reason and warnings.

    dftune analyze token-probs --models base=BASE,dft=runs/dft/final --data D --out analysis/
    dftune probe --model BASE --data D
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from dftune.loss import next_token_targets, token_loss
from dftune.model import _hidden, decoder_and_head
from dftune.objectives import AUTO_HIGH, AUTO_LOW, auto_exponent
from dftune.vocab import CLASS_NAMES, CONTENT, NUMBER, end_of_turn_ids, token_classes

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

    from dftune.precision import inference_dtype

    return AutoModelForCausalLM.from_pretrained(path, dtype=inference_dtype(device)).to(device).eval()


@torch.no_grad()
def token_stats(model, examples, pad_id: int, *, base=None, batch_size: int = 8, progress=None) -> TokenStats:
    """Statistics of ``model`` on ``examples`` (dftune.tokenized.Example); KL against ``base``."""
    from dftune.batching import collate

    device = next(model.parameters()).device
    ids, logps, ents, kls = [], [], [], []
    _, head = decoder_and_head(model)
    bhead = decoder_and_head(base)[1] if base is not None else None
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[s:s + batch_size], pad_id).items()}
        h, labels = next_token_targets(_hidden(model, batch["input_ids"], batch["attention_mask"]),
                                       batch["labels"])  # (N, H), (N,)
        kw = {}
        if base is not None:
            bh = next_token_targets(_hidden(base, batch["input_ids"], batch["attention_mask"]), batch["labels"])[0]
            kw = dict(ref_hidden=bh, ref_weight=bhead.weight, ref_bias=getattr(bhead, "bias", None))
        res = token_loss(h, head.weight, labels, "nll", bias=getattr(head, "bias", None), **kw)
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


SUMMARY_KEYS = ("tokens", "mean_prob", "median_prob", "frac_below_0.1", "frac_above_0.9", "mean_entropy", "nll")


def summary(st: TokenStats, select: np.ndarray | None = None) -> dict:
    """Mean/median probability, the tails, entropy, NLL (and KL) over the tokens ``select``
    picks (a boolean mask; all by default). No tokens: ``tokens`` 0 and None elsewhere."""
    sel = slice(None) if select is None else select
    logp, ent = st.logp[sel], st.entropy[sel]
    if len(logp) == 0:
        return {"tokens": 0, **{k: None for k in SUMMARY_KEYS[1:]}}
    p = np.exp(logp)
    out = {
        "tokens": int(len(p)), "mean_prob": float(p.mean()), "median_prob": float(np.median(p)),
        "frac_below_0.1": float((p < 0.1).mean()), "frac_above_0.9": float((p > 0.9).mean()),
        "mean_entropy": float(ent.mean()), "nll": float(-logp.mean()),
    }
    if st.kl is not None:
        out["mean_kl_to_base"] = float(st.kl[sel].mean())
    return out


def class_summaries(st: TokenStats, classes: np.ndarray) -> dict[str, dict]:
    """``summary`` per token class (``dftune.vocab.CLASS_NAMES``), each with its ``share`` of
    the tokens, and ``content_all``: content and number tokens together (what the task is
    about, without the template and layout tokens that inflate the overall mean)."""
    cls = classes[st.token_ids]
    out = {}
    for i, name in enumerate(CLASS_NAMES):
        out[name] = summary(st, cls == i)
        out[name]["share"] = float((cls == i).mean()) if len(cls) else 0.0
    out["content_all"] = summary(st, (cls == CONTENT) | (cls == NUMBER))
    out["content_all"]["share"] = float(((cls == CONTENT) | (cls == NUMBER)).mean()) if len(cls) else 0.0
    return out


def end_of_turn_summary(st: TokenStats, eot_ids, decode=None) -> dict:
    """The target probability where the target is an end-of-turn token (EOS, <|im_end|>...)."""
    ids = [int(i) for i in eot_ids]
    sel = np.isin(st.token_ids, ids)
    p = np.exp(st.logp[sel])
    out = {"token_ids": ids, "tokens": int(sel.sum()), "mean_prob": float(p.mean()) if len(p) else None,
           "min_prob": float(p.min()) if len(p) else None, "frac_below_0.1": float((p < 0.1).mean()) if len(p) else None}
    if decode is not None:
        out["text"] = [decode(i) for i in ids]
    return out


def analyze(stats: dict[str, TokenStats], decode, base: str | None = None, top: int = 8,
            classes: np.ndarray | None = None, eot_ids=()) -> dict:
    """Histograms, shifts against ``base``, bin fillers, risers/fallers, entropy, KL; with
    ``classes`` ((V,) from ``dftune.vocab.token_classes``) also the summary per token class
    and of the end-of-turn tokens ``eot_ids`` (did the model learn to stop?)."""
    out = {"p_edges": P_EDGES, "entropy_edges": ENTROPY_EDGES, "base": base, "models": list(stats),
           "summary": {}, "hist": {}, "entropy_hist": {}, "shift_vs_base": {}, "bin_tokens": {}, "risers": {},
           "fallers": {}, "classes": {}, "end_of_turn": {}}
    for name, st in stats.items():
        p = np.exp(st.logp)
        out["summary"][name] = summary(st)
        if classes is not None:
            out["classes"][name] = class_summaries(st, classes)
            out["end_of_turn"][name] = end_of_turn_summary(st, eot_ids)
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

# The capability-continuum thresholds on the mean target probability ("Beyond Log
# Likelihood", PAPER.md): above HIGH prior-leaning objectives (DFT) win, below LOW NLL does.
# Applied, as auto applies them, to the geometric mean (exp(-NLL)) of the tokens other than
# the special ones: the statistic auto's exponent follows (dftune.objectives.auto).
HIGH, LOW = AUTO_HIGH, AUTO_LOW
UNKNOWN = 0.1  # a token with p below this is one the model does not know yet
STOP_LOW = 0.3  # end-of-turn / special tokens with mean p below this: DFT would barely learn them
FORMAT_TAIL = 0.3  # more punct/layout tokens than this below UNKNOWN: advise dft's floor
PERCENTILES = (5, 10, 20, 30, 50, 70, 90)
PROBE_SCHEMA = 3


def _warn(code: str, message: str) -> dict:
    return {"code": code, "message": message}


def prior_strength(stats: dict, classes: dict | None = None) -> dict:
    """auto's statistic of the data under the base model, from the probe's summaries: the
    geometric mean target probability exp(-NLL) (``geo_p``), the arithmetic mean
    (``mean_p``) and the share below p = 0.1 (``below``) over the tokens other than the
    special ones (those auto trains with NLL whatever its exponent); over all tokens
    (``basis`` "all") without class summaries."""
    parts = [c for name, c in (classes or {}).items() if name in CLASS_NAMES and name != "special" and c.get("tokens")]
    if not parts:
        return {"geo_p": float(np.exp(-stats["nll"])), "mean_p": stats["mean_prob"],
                "below": stats.get("frac_below_0.1", 0.0), "basis": "all"}
    n = sum(c["tokens"] for c in parts)

    def mean(key):
        return sum(c["tokens"] * c[key] for c in parts) / n

    return {"geo_p": float(np.exp(-mean("nll"))), "mean_p": mean("mean_prob"), "below": mean("frac_below_0.1"),
            "basis": "non-special"}


def recommend(stats: dict, classes: dict | None = None, end_of_turn: dict | None = None) -> dict:
    """The objective for this base model and data, with its reason and warnings.

    stats: ``summary`` over all tokens; classes: ``class_summaries``; end_of_turn:
    ``end_of_turn_summary``. The decision is auto's first step (``prior_strength``: the
    geometric mean target probability of the non-special tokens, which a share of tokens
    the model has never seen pulls down however well it knows the rest):
    1. at or above HIGH (auto's exponent 1): dft; at or below LOW (exponent 0): nll; between:
       auto (neither end is clearly right, and the model's prior changes as it learns).
    2. with dft: ``protect=special`` when the end-of-turn or other special tokens have mean p
       < STOP_LOW, ``floor=0.1`` when more than FORMAT_TAIL of the punctuation/layout tokens
       are below p = 0.1 (auto protects special tokens itself).
    Warnings name what DFT would leave unlearned whatever the recommendation, since a user
    may pick DFT anyway. Returned keys: objective, alpha (auto's first exponent), geo_p,
    mean_p, reasoning, warnings (code, message), basis ("non-special" or "all"), thresholds.
    """
    strength = prior_strength(stats, classes)
    basis, gp, mp = strength["basis"], strength["geo_p"], strength["mean_p"]
    alpha = auto_exponent(gp)
    what = "tokens other than the special ones" if basis == "non-special" else "tokens"
    measure = (f"The base model's geometric mean target probability (exp(-NLL)) on the data's {what} is {gp:.3g} "
               f"(arithmetic mean {mp:.2f})")
    if alpha == 1:
        why = (f"{measure}: >= {HIGH}, a strong prior. Prior-leaning objectives (DFT) fit this regime: they damp the "
               "updates on the few low-probability tokens, which NLL would up-weight by 1/p.")
    elif alpha == 0:
        why = (f"{measure}: <= {LOW}, little prior for this data as a whole. DFT multiplies each token's gradient by "
               "its probability and would barely learn the tokens the model does not know; NLL is the right choice "
               "(auto starts as NLL here and moves towards DFT as the model learns the data).")
        if mp > HIGH:
            why += (f" (The arithmetic mean is high because most tokens are known; the {strength['below']:.0%} below "
                    f"p = {UNKNOWN} are what fine-tuning has to teach.)")
    else:
        why = (f"{measure}: between {LOW} and {HIGH}, neither end clearly right. auto weights each token by max(p^a, 0.1) with "
               f"a following this statistic as the model learns (a = {alpha:.2f} at the start), special tokens at NLL's "
               "weight; compare it with nll and dft on a short run.")
    warnings, protect, floor = [], False, False
    eot = end_of_turn or {}
    if eot.get("tokens") and eot["mean_prob"] < STOP_LOW:
        protect = True
        warnings.append(_warn("eot_unlearned", (
            f"The end-of-turn token{'s' if len(eot.get('token_ids', [])) > 1 else ''} "
            f"({', '.join(map(str, eot.get('text') or eot.get('token_ids', [])))}) get mean p = {eot['mean_prob']:.3f}: "
            f"under DFT their gradient is that fraction of NLL's, so the model may never learn to stop (it repeats or "
            f"runs to the length limit). Use dft:protect=special (NLL on special tokens), dft:floor=0.1, auto or nll.")))
    special = (classes or {}).get("special") or {}
    # special tokens other than the end-of-turn ones (which are special by construction)
    n_other = (special.get("tokens") or 0) - (eot.get("tokens") or 0)
    if n_other > 0:
        other = (special["mean_prob"] * special["tokens"] - (eot.get("mean_prob") or 0.0) * (eot.get("tokens") or 0)) / n_other
        if other < STOP_LOW:
            protect = True
            warnings.append(_warn("special_unlearned", (
                f"Special/template tokens other than the end of turn ({n_other} in the responses: <think>, tool or "
                f"role markers...) have mean p = {other:.3f}: DFT would barely train them. Use protect=special.")))
    punct = (classes or {}).get("punct") or {}
    if punct.get("tokens") and punct["frac_below_0.1"] > FORMAT_TAIL:
        floor = True
        warnings.append(_warn("format_unlearned", (
            f"{punct['frac_below_0.1']:.0%} of the punctuation/layout tokens (the output format) are below p = "
            f"{UNKNOWN}: DFT would learn the format slowly. Use dft:floor=0.1 (every token keeps 10% of its NLL "
            "gradient) or nll.")))
    content = (classes or {}).get("content_all") or {}
    cp = content["mean_prob"] if content.get("tokens") else mp  # words and numbers: what the task is about
    if cp <= 0.02:
        warnings.append(_warn("no_prior", (
            f"The model has almost no prior for this data (mean p {cp:.3f}{' on words and numbers' if content else ''}): "
            f"DFT's gradients are ~{cp:.3f} of NLL's and it would learn almost nothing; train with nll (or auto).")))

    if alpha == 0:
        objective = "nll"
    elif alpha < 1:
        objective = "auto"
    else:
        params = (["floor=0.1"] if floor else []) + (["protect=special"] if protect else [])
        objective = "dft" + (":" + ",".join(params) if params else "")
        if protect:
            why += " Special tokens (EOS, end-of-turn, template) are trained with NLL (protect=special): see warnings."
        if floor:
            why += " A floor of 0.1 on the weight keeps the output format learning: see warnings."
    return {"objective": objective, "alpha": alpha, "geo_p": gp, "mean_p": mp, "reasoning": why, "warnings": warnings,
            "basis": basis, "thresholds": {"prior_leaning_above": HIGH, "nll_below": LOW, "unknown_below": UNKNOWN,
                                           "stop_low": STOP_LOW, "format_tail": FORMAT_TAIL}}


def probe_report(st: TokenStats, classes: np.ndarray, eot_ids, *, decode=None, **meta) -> dict:
    """The probe JSON from a base model's token statistics (schema ``PROBE_SCHEMA``).

    Keys: schema, any ``meta`` given (model, data, examples), stats (``summary`` over every
    response token, plus p_percentiles: the target probability at each percentile, the
    thresholds the "Beyond Log Likelihood" scripts pass to thresholded:q=...), classes
    (``class_summaries``), end_of_turn (``end_of_turn_summary``), recommendation
    (``recommend``).
    """
    if len(st.logp) == 0:
        raise ValueError("nothing to probe: the examples have no response tokens (every label is masked)")
    stats = summary(st)
    p = np.exp(st.logp)
    stats["p_percentiles"] = {str(q): float(np.percentile(p, q)) for q in PERCENTILES}
    cls = class_summaries(st, classes)
    eot = end_of_turn_summary(st, eot_ids, decode)
    return {"schema": PROBE_SCHEMA, **meta, "stats": stats, "classes": cls, "end_of_turn": eot,
            "recommendation": recommend(stats, cls, eot)}


def probe(model, examples, tokenizer, *, model_name: str = "", data: str = "", batch_size: int = 8,
          progress=None) -> dict:
    """Pre-flight probe of a base ``model`` on ``examples`` (dftune.tokenized.Example), response
    tokens only: statistics overall, per token class and for the end-of-turn token, and the
    recommended objective with its reason and warnings (``probe_report``'s schema).

    model_name, data: stored as the JSON's "model" and "data" (for the report).
    """
    if not examples:
        raise ValueError("nothing to probe: no examples")
    st = token_stats(model, examples, tokenizer.pad_token_id, batch_size=batch_size, progress=progress)
    vocab = decoder_and_head(model)[1].weight.shape[0]
    classes = token_classes(tokenizer, vocab_size=max(vocab, len(tokenizer))).numpy()
    return probe_report(st, classes, end_of_turn_ids(tokenizer), decode=lambda t: tokenizer.decode([t]),
                        model=model_name, data=data, examples=len(examples))


def format_probe(result: dict) -> str:
    """The probe's result as terminal lines: overall, per class, end-of-turn, recommendation."""
    s, rec = result["stats"], result["recommendation"]

    def line(name, d):
        if not d.get("tokens"):
            return f"  {name:<12} (no tokens)"
        share = f" {d['share']:>5.1%} of tokens |" if "share" in d else ""
        return (f"  {name:<12}{share} mean p {d['mean_prob']:.3f} | p<0.1 {d['frac_below_0.1']:.1%} | "
                f"p>0.9 {d['frac_above_0.9']:.1%} | entropy {d['mean_entropy']:.2f}")

    out = [f"{result.get('model', 'model')} on {result.get('examples', '?')} examples ({s['tokens']} response tokens):",
           line("all", s)]
    for name in (*CLASS_NAMES, "content_all"):
        if name in result.get("classes", {}):
            out.append(line(name, result["classes"][name]))
    eot = result.get("end_of_turn") or {}
    if eot.get("tokens"):
        out.append(f"  end-of-turn  {', '.join(map(str, eot.get('text') or eot['token_ids']))}: mean p "
                   f"{eot['mean_prob']:.3f} (min {eot['min_prob']:.3f}) over {eot['tokens']} tokens")
    out.append(f"recommended objective: {rec['objective']}\n  {rec['reasoning']}")
    out += [f"warning [{w['code']}]: {w['message']}" for w in rec.get("warnings", [])]
    return "\n".join(out)
