"""`dftune demo` (mode continuum): both ends of the capability continuum, the EOS/format
failure at the weak end, and learning curves. See ``demo.py`` for the stages and
``tables.py`` for what the intervals mean; ``tables.json`` is documented in docs/testbed.md.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from dftune.eval.metrics import avg_key
from dftune.settings import ConfigError
from dftune.testbed import bases, tables, tasks
from dftune.testbed.demo_config import DemoConfig
from dftune.testbed.stages import (
    build_bases,
    elapsed,
    evaluate_model,
    finetune,
    finetune_schedule,
    folder_name,
    load_average,
    objectives_for,
    prepare,
    run_jobs,
    splits_of,
    test_rows,
    worker_count,
    write_sweep,
)

CURVE_BENCHMARK = "id"


def _check(cfg: DemoConfig) -> list[str]:
    """The priors; every objective spec checked before anything is trained."""
    from dftune.schedule import objective_schedule

    priors = ["real"] if cfg.real_base else [p.strip() for p in cfg.priors.split(",") if p.strip()]
    if not priors or set(priors) - {"weak", "strong", "real"}:
        raise ConfigError(f"priors must be weak, strong or both; got {cfg.priors!r}")
    for p in priors:
        objs = objectives_for(cfg, p)
        if "nll" not in objs:
            raise ConfigError(f"{'weak' if p == 'weak' else 'strong'}_objectives must include nll (the baseline)")
        for o in objs:
            objective_schedule(o)  # a bad spec fails now, not after pretraining
    splits_of(cfg)
    if cfg.weak_notes not in tasks.NOTATIONS:
        raise ConfigError(f"weak_notes must be one of {', '.join(tasks.NOTATIONS)}; got {cfg.weak_notes!r}")
    return priors


def curve_eval(cfg: DemoConfig, files: dict, seed: int):
    """The periodic evaluation behind the learning curves: the first ``curve_problems`` of
    the id split, ``curve_n`` samples each at temperature 1.0, sampled with the training
    seed (so seed s of every objective draws alike)."""
    from dftune.eval.generate import SamplingConfig
    from dftune.eval.run import EvalConfig

    return EvalConfig(benchmarks=[CURVE_BENCHMARK], backend="hf", prompt=bases.PROMPT, data_dir=str(files["benchmarks"]),
                      limit=cfg.curve_problems, sampling=SamplingConfig(n=cfg.curve_n, temperature=1.0,
                                                                        max_new_tokens=cfg.max_new_tokens, seed=seed))


def _point_job(cfg: DemoConfig, root: Path, files: dict, base: Path, values: dict, curve_every: int) -> None:
    """One point of the grid, in a worker: the base's evaluation (objective "base"), or a
    fine-tuning run (evaluated every ``curve_every`` steps, if not 0) and its evaluation."""
    from dftune.files import read_jsonl, write_jsonl

    out = root / folder_name(values)
    if values["objective"] == "base":
        marker = out / "base.txt"
        if marker.is_file() and marker.read_text() != str(base):
            import shutil

            shutil.rmtree(out)  # evaluated from an older base
        out.mkdir(parents=True, exist_ok=True)
        evaluate_model(cfg, base, out / "eval", files["benchmarks"], bases.PROMPT)
        marker.write_text(str(base))
        return
    curve = curve_eval(cfg, files, values["seed"]) if curve_every else None
    steps, lr = finetune_schedule(cfg, values["prior"])
    final = finetune(base, bases.data_config(files["narrow"]), out, objective=values["objective"], lr=lr,
                     batch=cfg.finetune_batch, steps=steps, seed=values["seed"], curve=curve, curve_every=curve_every)
    if curve and not any(r.get("step") == 0 for r in read_jsonl(out / "eval_curve.jsonl")):
        # the curve starts at the base: the loop's own quick evaluation, on the step-0 weights
        import torch

        from dftune.analysis.tokens import load_for_analysis
        from dftune.eval.run import quick_eval
        from dftune.model import load_tokenizer

        step0 = quick_eval(load_for_analysis(str(base), torch.device("cpu")), load_tokenizer(str(base)), curve)
        write_jsonl(out / "eval_curve.jsonl", [{"step": 0, **step0}, *read_jsonl(out / "eval_curve.jsonl")])
    if not (out / "eval" / "summary.json").is_file():
        evaluate_model(cfg, final, out / "eval", files["benchmarks"], bases.PROMPT)


def _analysis_job(cfg: DemoConfig, root: Path, files: dict, prior: str, base: Path) -> tuple[dict, float | None]:
    """A prior's probe (probe_PRIOR.json), the base's own-form accuracy, and the token
    analysis of the base and every fine-tuned model (analysis_PRIOR/token_probs.json; seed
    0's statistics, every seed's end-of-turn probability). Returns ({(objective, seed):
    end-of-turn p}, own-form accuracy or None for a real base)."""
    import torch

    from dftune.analysis.tokens import (
        analyze,
        end_of_turn_summary,
        load_for_analysis,
        probe,
        token_stats,
    )
    from dftune.data import build_dataset
    from dftune.files import write_json
    from dftune.model import load_tokenizer
    from dftune.vocab import end_of_turn_ids, token_classes

    tok = load_tokenizer(str(base))
    exs, _ = build_dataset(replace(bases.data_config(files["narrow"]), select=f"first:{cfg.analysis_examples}"), tok)
    base_model = load_for_analysis(str(base), torch.device("cpu"))
    write_json(root / f"probe_{prior}.json", probe(base_model, exs, tok, model_name=f"{prior} base",
                                                   data=str(files["narrow"])))
    own = None
    if prior != "real":
        own = bases.notes_accuracy(base_model, tok, test_rows(cfg, CURVE_BENCHMARK)[:cfg.curve_problems],
                                   notation=cfg.weak_notes)
    stats = {"base": token_stats(base_model, exs, tok.pad_token_id)}
    classes = token_classes(tok, vocab_size=max(len(tok), base_model.get_output_embeddings().weight.shape[0]))
    eot_ids, eot_p = end_of_turn_ids(tok), {}
    for obj in objectives_for(cfg, prior):
        for seed in range(cfg.seeds):
            final = root / folder_name({"prior": prior, "objective": obj, "seed": seed}) / "final"
            st = token_stats(load_for_analysis(str(final), base_model.device), exs, tok.pad_token_id,
                             base=base_model if seed == 0 else None)
            if seed == 0:
                stats[obj] = st
            eot_p[(obj, seed)] = end_of_turn_summary(st, eot_ids)["mean_prob"]
    res = analyze(stats, lambda i: tok.decode([i]), base="base", classes=classes.numpy(), eot_ids=eot_ids)
    write_json(root / f"analysis_{prior}" / "token_probs.json", res)
    return eot_p, own


def run_continuum(cfg: DemoConfig) -> Path:
    from dftune.analysis.report import write_report
    from dftune.files import write_json, write_text

    t0, load_start = time.time(), load_average()
    priors = _check(cfg)
    root, cache, files = prepare(cfg)
    base_of = build_bases(cfg, priors, cache)
    timings = {"bases": time.time() - t0}
    print(f"bases ready ({elapsed(t0)})")

    # every point of the grid: the bases' evaluations, then each (prior, objective, seed) run
    curve_priors = {p.strip() for p in cfg.curve_priors.split(",") if p.strip()}
    jobs, points = [], []
    for prior in priors:
        curve_every = cfg.curve_every if prior in curve_priors and CURVE_BENCHMARK in splits_of(cfg) else 0
        grid = [{"prior": prior, "objective": "base", "seed": 0}]
        grid += [{"prior": prior, "objective": o, "seed": s} for o in objectives_for(cfg, prior) for s in range(cfg.seeds)]
        for values in grid:
            jobs.append((cfg, root, files, base_of[prior], values, curve_every))
            points.append({"name": folder_name(values), "values": values})
    t = time.time()
    run_jobs(_point_job, jobs, cfg.workers)
    timings["runs"] = time.time() - t
    print(f"{len(jobs)} points trained and evaluated ({elapsed(t0)})")

    # what each base predicts before training (probe), and the token analysis of every model
    t = time.time()
    eot_p, own_form = {}, {}
    for prior, (eot, acc) in zip(priors, run_jobs(_analysis_job, [(cfg, root, files, p, base_of[p]) for p in priors],
                                                  cfg.workers)):
        eot_p.update({(prior, o, s): v for (o, s), v in eot.items()})
        own_form[prior] = acc
    timings["analysis"] = time.time() - t

    write_sweep(root, cfg, ["prior", "objective", "seed"], "nll", points)
    result = continuum_tables(root, cfg, points, priors, eot_p, own_form)
    result["timing"] = {"total_s": round(time.time() - t0, 1), "workers": worker_count(cfg.workers),
                        "load_average_start": load_start, "load_average_end": load_average(),
                        **{k: round(v, 1) for k, v in timings.items()}}
    result["tables"] = report_tables(result)
    write_json(root / "tables.json", result)
    text = tables.markdown_document("dftune demo: the capability continuum", result)
    write_text(root / "results.md", text)
    print(text)
    inputs = [root] + [root / f"analysis_{p}" for p in priors] + [root / f"probe_{p}.json" for p in priors]
    report = write_report(inputs, root / "report.html", title="dftune demo: the capability continuum (NLL vs DFT)")
    print(f"report: {report}  ({elapsed(t0)})")
    return report


def continuum_tables(root: Path, cfg: DemoConfig, points: list[dict], priors: list[str], eot_p: dict,
                     own_form: dict) -> dict:
    """tables.json (kind "continuum"); schema in docs/testbed.md."""
    from dftune.files import read_json

    splits = splits_of(cfg)
    tuned = [p for p in points if p["values"]["objective"] != "base"]
    accuracy, diffs = tables.accuracy_tables(root, points, splits, "prior", "nll")
    probes = {}
    for prior in priors:
        pr = read_json(root / f"probe_{prior}.json")
        rec = pr["recommendation"]
        probes[prior] = {"geo_p": rec["geo_p"], "mean_p": rec["mean_p"], "alpha": rec["alpha"],
                         "content_p": pr["classes"]["content_all"]["mean_prob"], "all_p": pr["stats"]["mean_prob"],
                         "below_0.1": pr["stats"]["frac_below_0.1"],
                         "punct_below_0.1": pr["classes"]["punct"]["frac_below_0.1"],
                         "eot_p": pr["end_of_turn"]["mean_prob"], "objective": rec["objective"],
                         "warnings": [w["code"] for w in rec["warnings"]], "notes_accuracy": own_form.get(prior)}
    eos = []
    for (prior, obj), seeds in tables._groups(points, "prior").items():
        folders = [root / seeds[s] / "eval" for s in sorted(seeds)]
        row = {"prior": prior, "objective": obj, "seeds": len(seeds), **tables.generation_summary(folders)}
        if obj == "base":
            row["eot_p"] = tables.seed_interval([probes[prior]["eot_p"]])
            row["probe"] = {"objective": probes[prior]["objective"], "warnings": probes[prior]["warnings"]}
        else:
            row["eot_p"] = tables.seed_interval([eot_p[(prior, obj, s)] for s in sorted(seeds)])
        eos.append(row)
    curves = tables.curve_rows(root, tuned, "prior", CURVE_BENCHMARK)
    return {"schema": tables.TABLES_SCHEMA, "kind": "continuum", "metric": avg_key(cfg.eval_n), "n": cfg.eval_n,
            "problems_per_split": cfg.eval_problems, "seeds": cfg.seeds, "splits": splits + ["mean"], "group": "prior",
            "baseline": "nll", "intervals": {"cell": tables.CELL_INTERVAL, "diff": tables.DIFF_INTERVAL},
            "settings": {k: getattr(cfg, k) for k in ("pretrain_steps", "finetune_steps", "finetune_batch", "finetune_lr",
                                                        "weak_notes", "weak_finetune_steps", "weak_finetune_lr",
                                                        "finetune_examples", "wrong_demos", "max_new_tokens",
                                                        "curve_every", "curve_problems", "curve_n")},
            "probe": probes, "probe_check": tables.probe_check(root, points, splits, "prior",
                                                                {p: v["objective"] for p, v in probes.items()}),
            "accuracy": accuracy, "vs_baseline": diffs, "eos": eos, "curves": curves,
            "steps_to_reach": tables.steps_to_reach(curves, "prior", "nll")}


def report_tables(t: dict) -> list[dict]:
    """The tables the report and results.md show, from ``continuum_tables``: [{title,
    columns, rows, note}], every cell as text (percent for accuracies)."""
    pct, splits = tables._pct, t["splits"]
    cells = {(r["prior"], r["objective"], r["split"]): r for r in t["accuracy"]}
    diffs = {(r["prior"], r["objective"], r["split"]): r for r in t["vs_baseline"]}
    keys = list(dict.fromkeys((r["prior"], r["objective"]) for r in t["accuracy"]))
    out = [{
        "title": "The continuum: accuracy by prior and objective",
        "columns": ["prior", "objective", "seeds"] + splits + [f"mean − {t['baseline']}, points"],
        "rows": [[p, o, str(cells[(p, o, splits[0])]["seeds"])] + [tables.fmt_cell(cells[(p, o, s)]) for s in splits]
                 + [tables.fmt_diff(diffs[(p, o, "mean")]) if (p, o, "mean") in diffs else ""] for p, o in keys],
        "note": (f"{t['metric']} in %, {t['problems_per_split']} problems per split, temperature 1.0; mean ± 95% "
                 f"t-interval half-width over {t['seeds']} fine-tuning seeds (the base: one evaluation). Last column: "
                 f"the paired difference to {t['baseline']} on the mean split, [95% bootstrap interval over seeds and "
                 "problems] (seeds where it is ahead / seeds)."),
    }, {
        "title": f"Paired difference to {t['baseline']} per split (points)",
        "columns": ["prior", f"objective − {t['baseline']}"] + splits,
        "rows": [[p, o] + [tables.fmt_diff(diffs[(p, o, s)]) for s in splits]
                 for p, o in dict.fromkeys((r["prior"], r["objective"]) for r in t["vs_baseline"])],
        "note": ("Seed s of each objective is paired with seed s of the baseline (same base, data order and sampling "
                 "seeds), problem with problem. Sign test over problems on the mean split: "
                 + "; ".join(f"{r['prior']} {r['objective']}: {r['sign_test']['a_better']} ahead, "
                             f"{r['sign_test']['b_better']} behind, p = {r['sign_test']['p']:.2g}"
                             for r in t["vs_baseline"] if r["split"] == "mean") + "."),
    }, {
        "title": "Each base on the demonstrations, before training (the probe), and the outcome",
        "columns": ["prior", "geometric mean p", "arithmetic mean p", "tokens p<0.1", "content-token p",
                    "end-of-turn p", "own-form accuracy", "probe recommends", "warnings", "measured best",
                    "recommended − best, points"],
        "rows": [[p, f"{v['geo_p']:.3g}", f"{v['mean_p']:.3f}", pct(v["below_0.1"]) + "%", f"{v['content_p']:.3f}",
                  f"{v['eot_p']:.2g}", "" if v.get("notes_accuracy") is None else pct(v["notes_accuracy"]) + "%",
                  v["objective"], ", ".join(v["warnings"]) or "none"] + _check_cells(t, p)
                 for p, v in t["probe"].items()],
        "note": ("The base's target probabilities on the demonstrations' response tokens. Geometric mean: exp(-NLL) "
                 "over the tokens other than the special ones, the statistic auto's exponent follows and the probe "
                 "decides by (>= 0.5: dft, <= 0.1: nll, between: auto); arithmetic mean over the same tokens beside "
                 "it; content: words and numbers; end-of-turn: EOS and <|im_end|>. Own-form accuracy: greedy "
                 "completions of the id split's problems as plain-text notes (the weak base's pretraining form), "
                 "checked step by step. Measured best: the fine-tuned objective with the highest mean accuracy; the "
                 "recommended one's paired difference to it [95% bootstrap interval] (\"best\" when they are the "
                 "same)."),
    }, {
        "title": "Does the model learn to stop? (how samples end, all splits and seeds pooled)",
        "columns": ["prior", "objective", "stopped (EOS) %", "hit the token limit %", "mean tokens", "boxed answer %",
                    "end-of-turn p on demos"],
        "rows": [[r["prior"], r["objective"], pct(r.get("stop")), pct(r.get("truncated")),
                  f"{r.get('mean_tokens', 0):.0f}", pct(r.get("boxed")), tables.fmt_p(r["eot_p"])] for r in t["eos"]],
        "note": (f"Stopped: the sample ended with EOS or <|im_end|> before {t['settings']['max_new_tokens']} new "
                 "tokens. End-of-turn p: the model's probability of the end-of-turn token where the demonstrations "
                 "have it (mean ± 95% t-interval over seeds). The probe's warnings on each base (previous table) "
                 "were written before any training."),
    }]
    if t["curves"]:
        steps = sorted({s for c in t["curves"] for s in c["steps"]})
        reach = []
        for r in t["steps_to_reach"]:
            first = r["first_step_reaching"]
            reach.append(f"{r['prior']}: {r['objective']} "
                         + (f"reaches {r['baseline']}'s final {pct(r['baseline_final'])}% at step {first}"
                            if first is not None else f"never reaches {r['baseline']}'s final {pct(r['baseline_final'])}%")
                         + f" (its own final: {pct(r['final'])}%)")
        out.append({
            "title": f"Learning curves ({CURVE_BENCHMARK} split, periodic evaluation during fine-tuning)",
            "columns": ["prior", "objective"] + [f"step {s}" for s in steps],
            "rows": [[c["prior"], c["objective"]] + [tables.fmt_cell({"mean": m, "ci95": ci})
                                                     for m, ci in zip(c["mean"], c["ci95"])] for c in t["curves"]],
            "note": (f"avg@{t['settings']['curve_n']} in % on the first {t['settings']['curve_problems']} problems, mean ± "
                     "95% t-interval over seeds; step 0 is the base. " + "; ".join(reach) + "."),
        })
    return out


def _check_cells(t: dict, prior: str) -> list[str]:
    """The probe-versus-outcome cells of a prior: the measured best, and the recommended
    objective's paired difference to it (or its verdict)."""
    row = next((r for r in t.get("probe_check", []) if r["prior"] == prior), None)
    if row is None:
        return ["", ""]
    best = f"{row['best']} ({tables._pct(row['best_mean'])}%)"
    if "diff" not in row:
        return [best, row["verdict"]]
    lo, hi = row["ci95"]
    return [best, f"{100 * row['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]: {row['verdict']}"]
