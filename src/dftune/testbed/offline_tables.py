"""The offline demo's tables (``tables.json``'s ``tables``, results.md, the report), built
from the numbers ``demo_offline.run_offline`` gathers: accuracy with differences to the base
and to RFT, the base's pass@k, each method's budget and movement, and what each changed on
the base's held-out samples."""

from __future__ import annotations

from dftune.eval.metrics import pass_at_k
from dftune.files import read_json
from dftune.testbed import tables

# The paper's offline-RL table (Qwen2.5-Math-1.5B, the mean over five benchmarks; PAPER.md)
PAPER_ORDER = [("dft_on_rft", 35.43), ("grpo", 32.00), ("ppo", 28.66), ("rft", 23.97), ("dpo", 23.20)]
PAPER_SETTINGS = {"rft": "lr 5e-5, batch 256, warm-up 0.1, cosine", "dpo": "lr 1e-6, batch 128, warm-up 0.05",
                  "grpo": "lr 1e-6, 256 questions x 4, warm-up 0.1, constant (verl)"}


def pass_rows(stats: dict, base_eval, splits: list[str]) -> list[dict]:
    """The base's pass@j: on the training questions (from how many of the k samples of each
    were correct) and on every test split (from its evaluation's n samples per problem)."""
    k, hist = stats["k"], stats["questions_by_correct"]
    q = sum(hist.values())
    rows = [{"set": "training questions", "problems": q, "samples": k,
             **{f"pass@{j}": sum(n * pass_at_k(k, int(c), j) for c, n in hist.items()) / q for j in _ks(k)}}]
    n = read_json(base_eval / "summary.json")["sampling"]["n"]
    for b in splits:
        correct = [round(a * n) for a in tables.per_problem(base_eval, b).values()]
        rows.append({"set": b, "problems": len(correct), "samples": n,
                     **{f"pass@{j}": sum(pass_at_k(n, c, j) for c in correct) / len(correct) for j in _ks(n)}})
    return rows


def _ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    out = [1]
    while out[-1] * 2 <= n:
        out.append(out[-1] * 2)
    return out if out[-1] == n else out + [n]


def offline_settings(cfg) -> dict:
    """What each method ran with (the measured budgets are in ``movement``)."""
    o = cfg.offline
    return {"base_wrong_last_steps": o.base_wrong_last_steps, "k": o.k, "questions": o.questions, "temperature": 1.0,
            "sample_tokens": o.sample_tokens,
            "rft": {"lr": cfg.finetune_lr, "batch": cfg.finetune_batch, "steps": cfg.finetune_steps, "warmup": 0.1,
                    "schedule": "cosine", "unit": "sequences"},
            "dpo": {"lr": o.dpo_lr, "batch": o.dpo_batch, "epochs": o.dpo_epochs, "warmup": 0.05, "beta": o.dpo_beta,
                    "schedule": "cosine", "unit": "pairs"},
            "grpo": {"lr": o.grpo_lr, "questions_per_step": o.grpo_questions, "group": o.grpo_group,
                     "steps": o.grpo_steps, "warmup": 0.1, "beta": o.grpo_beta, "schedule": "constant",
                     "unit": "completions"},
            "paper": PAPER_SETTINGS,
            "ppo": "not run: PPO is wired on verl, which needs a GPU (dftune baseline ppo)"}


def _mean_pm(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """'0.029 ± 0.004' (mean ± 95% t half-width over seeds), or the one value."""
    cell = tables.seed_interval([v * scale for v in values])
    if cell["ci95"] is None:
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} ± {(cell['ci95'][1] - cell['ci95'][0]) / 2:.{digits}f}"


def _by(rows: list[dict], obj: str, key: str) -> list:
    return [r[key] for r in rows if r["objective"] == obj and r.get(key) is not None]


def order_line(t: dict) -> str:
    """'rft 35.1 > dft_on_rft ...' by mean accuracy, beside the paper's order."""
    means = {r["objective"]: 100 * r["mean"] for r in t["accuracy"]
             if r["split"] == "mean" and r["objective"] in {"base"} | {o for o, _ in PAPER_ORDER}}
    ours = " > ".join(f"{o} {m:.1f}" for o, m in sorted(means.items(), key=lambda x: -x[1]))
    paper = " > ".join(f"{o} {m:.1f}" for o, m in PAPER_ORDER)
    return f"Order here (mean accuracy): {ours}. The paper's: {paper}."


def offline_report_tables(t: dict) -> list[dict]:
    """The tables the report and results.md show: [{title, columns, rows, note}], cells as text."""
    s, st, splits = t["settings"], t["sampling"], t["splits"]
    cells = {(r["objective"], r["split"]): r for r in t["accuracy"]}
    diffs = {(r["objective"], r["split"]): r for r in t["vs_baseline"]}
    vs_base = {(r["objective"], r["split"]): r for r in t["vs_base"]}
    eos = {r["objective"]: r for r in t["eos"]}
    objs = list(dict.fromkeys(r["objective"] for r in t["accuracy"]))
    trained = [o for o in objs if o != "base"]
    mv = t["movement"]
    on_all = [o for o in objs if o.endswith("_on_all")]
    controls = f"; {' and '.join(on_all)} train on all {st['responses']} samples, graded or not" if on_all else ""
    accuracy = {
        "title": "Offline RL in miniature: accuracy by method",
        "columns": ["method", "seeds"] + splits + ["mean − base, points", "mean − rft, points", "stopped %",
                                                   "mean tokens"],
        "rows": [[o, str(cells[(o, splits[0])]["seeds"])] + [tables.fmt_cell(cells[(o, b)]) for b in splits]
                 + [tables.fmt_diff(vs_base[(o, "mean")]) if (o, "mean") in vs_base else "",
                    tables.fmt_diff(diffs[(o, "mean")]) if (o, "mean") in diffs else "",
                    tables._pct(eos[o]["stop"]), f"{eos[o]['mean_tokens']:.0f}"] for o in objs],
        "note": (f"From the base (the strong prior's recipe, {100 * s['base_wrong_last_steps']:.0f}% of its pretraining "
                 f"solutions ending in a wrong last step): {st['questions']} questions x k = {st['k']} samples at "
                 "temperature 1.0; "
                 f"{st['correct']} correct ({100 * st['yield']:.1f}%) are the RFT data (DFT-on-RFT trains on the same "
                 f"file{controls}), {st['dpo_pairs']} (correct, incorrect) pairs the DPO data. {t['metric']} in % on "
                 f"{t['problems_per_split']} problems per split, mean ± 95% t-interval half-width over {t['seeds']} "
                 "seeds (the base: one evaluation). Differences are paired by problem (and by seed for − rft; each "
                 "seed against the base's one evaluation for − base), [95% bootstrap interval over seeds and problems]"
                 " (seeds ahead / seeds). " + order_line(t)),
    }
    pass_table = {
        "title": "What reinforcement can reinforce: the base's pass@1 and pass@k",
        "columns": ["problems", "count", "samples each"] + [k for k in t["base_pass"][-1] if k.startswith("pass@")],
        "rows": [[r["set"], str(r["problems"]), str(r["samples"])]
                 + [tables._pct(r.get(k)) if k in r else "" for k in t["base_pass"][-1] if k.startswith("pass@")]
                 for r in t["base_pass"]],
        "note": ("Unbiased pass@j (Chen et al. 2021) in %: the chance that at least one of j samples is correct. "
                 "pass@1 is the accuracy of one sample; the gap to pass@k is what a method that makes the base's "
                 "better samples likelier can gain."),
    }
    rft_sum = tables.seed_interval(_by(mv, "rft", "lr_sum"))["mean"] if _by(mv, "rft", "lr_sum") else None
    budget_rows = []
    for o in trained:
        key = o if o in ("dpo", "grpo") else "rft"  # every SFT-loop run has RFT's recipe
        c = s[key]
        batch = (f"{c['questions_per_step']} questions x {c['group']}" if key == "grpo" else f"{c['batch']} {c['unit']}")
        lr_sum = tables.seed_interval(_by(mv, o, "lr_sum"))["mean"]
        budget_rows.append([o, f"{c['lr']:g}, {c['schedule']}", batch, str(_by(mv, o, "optimizer_steps")[0]),
                            f"{lr_sum:.4f} ({lr_sum / rft_sum:.2f}x)" if rft_sum else f"{lr_sum:.4f}",
                            _mean_pm(_by(mv, o, "weight_change"), 100, 2), _mean_pm(_by(mv, o, "kl_per_token")),
                            _mean_pm(_by(mv, o, "entropy_change")), s["paper"].get(key, "")])
    budget = {
        "title": "Budget and movement: what each method spent and how far it moved from the base",
        "columns": ["method", "lr, schedule", "batch", "optimizer steps", "lr sum (x RFT's)", "weight change %",
                    "KL(base || model) per token", "entropy change (nats)", "paper"],
        "rows": budget_rows + [["ppo", "", "", "", "", "", "", "", s["ppo"]]],
        "note": ("lr sum: the sum over optimizer steps of the rate each step used, read from the run's own records "
                 "(dftune train's log.jsonl; TRL: the optimizer's rate before each step, budget.json); under Adam a "
                 "step moves each weight by about its rate, so it is the budget for how far a method can move. Weight "
                 "change: ||theta - theta_0|| / ||theta_0||. KL and entropy: mean per response token on the base's own "
                 f"held-out samples ({sum(t['held_out_samples'].values())} evaluation samples). Mean ± 95% t half-width "
                 "over seeds."),
    }
    ho = t["held_out_samples"]
    keys = ["dlogp_seq_clean", "dlogp_seq_lucky", "dlogp_seq_wrong", "dlogp_error_token", "dlogp_before_error",
            "dlogp_after_error"]
    changes = {
        "title": "What each method changed: log-probability of the base's held-out samples, change in nats",
        "columns": ["method", f"correct, clean ({ho['clean']})", f"correct, lucky ({ho['lucky']})",
                    f"wrong ({ho['wrong']})", "wrong: first error token", "wrong: tokens before it",
                    "wrong: tokens after it"],
        "rows": [[o] + [_mean_pm(_by(mv, o, k), 1, 2) for k in keys] for o in trained],
        "note": ("The base's own evaluation samples (test problems, temperature 1.0), graded: clean = correct with "
                 "every number of the gold derivation; lucky = the right answer through a wrong number (answer-only "
                 "grading lets these into the RFT data); wrong. The first three columns: the change of a sample's "
                 "total log-probability (its response tokens and EOS); the last three: the mean change per token, "
                 "at the first digit where a wrong sample leaves the gold derivation, before it and after it. "
                 "Mean ± 95% t half-width over seeds."),
    }
    edges = mv[0]["by_base_p"]["correct"] if mv else []
    bins = [f"{b['p_base'][0]:g}-{b['p_base'][1]:g}" for b in edges]
    by_p = {
        "title": "Which tokens each method moved: change of log p by the base's p (nats per token)",
        "columns": ["method"] + [f"correct, p {b}" for b in bins] + [f"wrong, p {b}" for b in bins],
        "rows": [[o] + [_mean_pm([r["by_base_p"][side][i]["dlogp"] for r in mv if r["objective"] == o
                                  and r["by_base_p"][side][i]["dlogp"] is not None], 1, 2)
                        for side in ("correct", "wrong") for i in range(len(bins))] for o in trained],
        "note": ("Tokens of the base's held-out samples binned by the base's probability of them "
                 + ", ".join(f"{side} {'/'.join(str(b['tokens']) for b in mv[0]['by_base_p'][side])} tokens"
                             for side in ("correct", "wrong") if mv) + "); mean change of log p per bin."),
    }
    return [accuracy, pass_table, budget, changes, by_p]
