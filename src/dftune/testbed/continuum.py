"""`dftune demo` (mode continuum): both ends of the capability continuum, the EOS/format
failure at the weak end, and learning curves. See ``demo.py`` for the stages and
``tables.py`` for what the intervals mean; ``tables.json`` is documented in docs/testbed.md.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from dftune.config import ConfigError
from dftune.testbed import bases, tables
from dftune.testbed.demo import (
    DemoConfig,
    base_for,
    elapsed,
    evaluate_model,
    finetune,
    folder_name,
    objectives_for,
    prepare,
    splits_of,
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
    if cfg.seeds < 1:
        raise ConfigError(f"seeds must be >= 1; got {cfg.seeds}")
    splits_of(cfg)
    return priors


def run_continuum(cfg: DemoConfig) -> Path:
    import torch

    from dftune.analysis.report import write_report
    from dftune.analysis.tokens import analyze, end_of_turn_summary, load_for_analysis, probe, token_stats
    from dftune.data import build_dataset
    from dftune.eval.run import quick_eval
    from dftune.files import append_jsonl, read_jsonl, write_json, write_text
    from dftune.model import load_tokenizer
    from dftune.vocab import end_of_turn_ids, token_classes

    t0 = time.time()
    priors = _check(cfg)
    root, cache, files = prepare(cfg)
    curve_priors = {p.strip() for p in cfg.curve_priors.split(",") if p.strip()}
    points, eot_p, timings = [], {}, {}
    for prior in priors:
        t_prior = time.time()
        base = base_for(cfg, prior, cache)
        timings[f"base_{prior}"] = time.time() - t_prior
        prompt = bases.PROMPT  # the model's own chat template with the paper's instruction
        data = bases.data_config(files["narrow"])
        tok = load_tokenizer(str(base))
        exs, _ = build_dataset(replace(data, select=f"first:{cfg.analysis_examples}"), tok)
        base_model = load_for_analysis(str(base), torch.device("cpu"))
        write_json(root / f"probe_{prior}.json", probe(base_model, exs, tok, model_name=f"{prior} base",
                                                       data=str(files["narrow"])))
        values = {"prior": prior, "objective": "base", "seed": 0}
        out = root / folder_name(values)
        marker = out / "base.txt"
        if marker.is_file() and marker.read_text() != str(base):
            import shutil

            shutil.rmtree(out)  # evaluated from an older base
        out.mkdir(parents=True, exist_ok=True)
        evaluate_model(cfg, base, out / "eval", files["benchmarks"], prompt)
        marker.write_text(str(base))
        points.append({"name": out.name, "values": values})

        curve = None
        if prior in curve_priors and prior != "real" and CURVE_BENCHMARK in splits_of(cfg):
            curve = dict(eval_every=cfg.curve_every, eval_benchmarks=CURVE_BENCHMARK, eval_limit=cfg.curve_problems,
                         eval_n=cfg.curve_n, eval_max_new_tokens=cfg.max_new_tokens,
                         eval_data_dir=str(files["benchmarks"]))
        step0: dict[int, float] = {}
        stats = {"base": token_stats(base_model, exs, tok.pad_token_id)}
        classes = token_classes(tok, vocab_size=max(len(tok), base_model.get_output_embeddings().weight.shape[0]))
        eot_ids = end_of_turn_ids(tok)
        for obj in objectives_for(cfg, prior):
            for seed in range(cfg.seeds):
                values = {"prior": prior, "objective": obj, "seed": seed}
                out = root / folder_name(values)
                final = finetune(base, data, out, objective=obj, lr=cfg.finetune_lr, batch=cfg.finetune_batch,
                                 steps=cfg.finetune_steps, seed=seed, curve=curve)
                if curve and not any(r.get("step") == 0 for r in read_jsonl(out / "eval_curve.jsonl")):
                    # the curve starts at the base: the same quick evaluation the loop runs, on the step-0 weights
                    if seed not in step0:
                        step0[seed] = quick_eval(base_model, tok, benchmarks=[CURVE_BENCHMARK], limit=cfg.curve_problems,
                                                 n=cfg.curve_n, max_new_tokens=cfg.max_new_tokens,
                                                 data_dir=str(files["benchmarks"]), seed=seed, prompt=prompt)[CURVE_BENCHMARK]
                    rows = read_jsonl(out / "eval_curve.jsonl")
                    write_text(out / "eval_curve.jsonl", "")
                    append_jsonl(out / "eval_curve.jsonl", [{"step": 0, CURVE_BENCHMARK: step0[seed]}, *rows])
                if not (out / "eval" / "summary.json").is_file():
                    evaluate_model(cfg, final, out / "eval", files["benchmarks"], prompt)
                points.append({"name": out.name, "values": values})
                model = load_for_analysis(str(final), base_model.device)
                st = token_stats(model, exs, tok.pad_token_id, base=base_model if seed == 0 else None)
                if seed == 0:
                    stats[obj] = st
                eot_p[(prior, obj, seed)] = end_of_turn_summary(st, eot_ids)["mean_prob"]
        res = analyze(stats, lambda t: tok.decode([t]), base="base", classes=classes.numpy(), eot_ids=eot_ids)
        write_json(root / f"analysis_{prior}" / "token_probs.json", res)
        timings[f"prior_{prior}"] = time.time() - t_prior
        print(f"prior '{prior}' done ({elapsed(t0)})")
    write_sweep(root, cfg, ["prior", "objective", "seed"], "nll", points)
    result = continuum_tables(root, cfg, points, priors, eot_p)
    result["timing"] = {"total_s": time.time() - t0, **{k: round(v, 1) for k, v in timings.items()}}
    write_json(root / "tables.json", result)
    text = continuum_markdown(result)
    write_text(root / "results.md", text)
    print(text)
    inputs = [root] + [root / f"analysis_{p}" for p in priors] + [root / f"probe_{p}.json" for p in priors]
    report = write_report(inputs, root / "report.html", title="dftune demo: the capability continuum (NLL vs DFT)")
    print(f"report: {report}  ({elapsed(t0)})")
    return report


def continuum_tables(root: Path, cfg: DemoConfig, points: list[dict], priors: list[str], eot_p: dict) -> dict:
    """tables.json (kind "continuum"); schema in docs/testbed.md."""
    from dftune.files import read_json

    splits = splits_of(cfg)
    tuned = [p for p in points if p["values"]["objective"] != "base"]
    accuracy, diffs = tables.accuracy_tables(root, points, splits, "prior", "nll")
    probes = {}
    for prior in priors:
        pr = read_json(root / f"probe_{prior}.json")
        probes[prior] = {"content_p": pr["classes"]["content_all"]["mean_prob"], "all_p": pr["stats"]["mean_prob"],
                         "punct_below_0.1": pr["classes"]["punct"]["frac_below_0.1"],
                         "eot_p": pr["end_of_turn"]["mean_prob"], "objective": pr["recommendation"]["objective"],
                         "warnings": [w["code"] for w in pr["recommendation"]["warnings"]]}
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
    return {"schema": tables.TABLES_SCHEMA, "kind": "continuum", "metric": f"avg@{cfg.eval_n}", "n": cfg.eval_n,
            "problems_per_split": cfg.eval_problems, "seeds": cfg.seeds, "splits": splits + ["mean"], "group": "prior",
            "baseline": "nll", "intervals": {"cell": tables.CELL_INTERVAL, "diff": tables.DIFF_INTERVAL},
            "settings": {k: getattr(cfg, k) for k in ("pretrain_steps", "finetune_steps", "finetune_batch", "finetune_lr",
                                                        "finetune_examples", "max_new_tokens", "curve_every",
                                                        "curve_problems", "curve_n")},
            "probe": probes, "accuracy": accuracy, "vs_baseline": diffs, "eos": eos, "curves": curves,
            "steps_to_reach": tables.steps_to_reach(curves, "prior", "nll")}


def continuum_markdown(t: dict) -> str:
    """results.md: the tables of ``continuum_tables`` as markdown (percent)."""
    pct = tables._pct
    splits = t["splits"]
    out = [f"# dftune demo: the capability continuum\n",
           f"{t['metric']} in % on {t['problems_per_split']} problems per split; {t['seeds']} fine-tuning seeds per "
           f"(prior, objective); base rows are one evaluation. Cells: {t['intervals']['cell']}: shown as mean ± "
           f"half-width. Differences: {t['intervals']['diff']}: shown as diff [95% interval] (seeds better/seeds).\n",
           "## Probe of each base on the demonstrations (before training)\n",
           tables.markdown(["prior", "content p", "all-token p", "punct p<0.1", "end-of-turn p", "recommends", "warnings"],
                           [[p, f"{v['content_p']:.3f}", f"{v['all_p']:.3f}", pct(v["punct_below_0.1"]),
                             f"{v['eot_p']:.3f}", f"`{v['objective']}`", ", ".join(v["warnings"]) or "none"]
                            for p, v in t["probe"].items()]),
           "## Accuracy\n"]
    cells = {(r["prior"], r["objective"], r["split"]): r for r in t["accuracy"]}
    keys = list(dict.fromkeys((r["prior"], r["objective"]) for r in t["accuracy"]))
    out.append(tables.markdown(["prior", "objective", "seeds"] + splits,
                               [[p, o, cells[(p, o, splits[0])]["seeds"]] + [tables.fmt_cell(cells[(p, o, s)]) for s in splits]
                                for p, o in keys]))
    out.append(f"\n## Paired difference to {t['baseline']} (percent points)\n")
    diffs = {(r["prior"], r["objective"], r["split"]): r for r in t["vs_baseline"]}
    dkeys = list(dict.fromkeys((r["prior"], r["objective"]) for r in t["vs_baseline"]))
    out.append(tables.markdown(["prior", f"objective - {t['baseline']}"] + splits,
                               [[p, o] + [tables.fmt_diff(diffs[(p, o, s)]) for s in splits] for p, o in dkeys]))
    out.append("\nSign test over problems (seed-pooled accuracy, mean split): "
               + "; ".join(f"{p} {o}: {diffs[(p, o, 'mean')]['sign_test']['a_better']} better / "
                           f"{diffs[(p, o, 'mean')]['sign_test']['b_better']} worse, p = "
                           f"{diffs[(p, o, 'mean')]['sign_test']['p']:.3g}" for p, o in dkeys) + ".\n")
    out.append("\n## How samples end (all splits and seeds pooled)\n")
    rows = []
    for r in t["eos"]:
        probe = r.get("probe")
        rows.append([r["prior"], r["objective"], pct(r.get("stop")), pct(r.get("truncated")), f"{r.get('mean_tokens', 0):.0f}",
                     pct(r.get("repetitive")), pct(r.get("boxed")), tables.fmt_p(r["eot_p"]),
                     f"`{probe['objective']}` ({', '.join(probe['warnings']) or 'no warnings'})" if probe else ""])
    out.append(tables.markdown(["prior", "objective", "stop %", "truncated %", "mean tokens", "repetitive %", "boxed %",
                                "end-of-turn p on demos", "probe predicted (base)"], rows))
    if t["curves"]:
        out.append(f"\n## Learning curves ({CURVE_BENCHMARK} split, periodic evaluation: "
                   f"{t['settings']['curve_problems']} problems x {t['settings']['curve_n']} samples; % mean over seeds)\n")
        steps = sorted({s for c in t["curves"] for s in c["steps"]})
        out.append(tables.markdown(["prior", "objective"] + [f"step {s}" for s in steps],
                                   [[c["prior"], c["objective"]] + [tables.fmt_cell({"mean": m, "ci95": ci}) for m, ci in
                                                                    zip(c["mean"], c["ci95"])] for c in t["curves"]]))
        for r in t["steps_to_reach"]:
            first = r["first_step_reaching"]
            out.append(f"\n- {r['prior']}: {r['objective']} "
                       + (f"reaches {r['baseline']}'s final accuracy ({pct(r['baseline_final'])}% at step "
                          f"{r['baseline_final_step']}) at step {first}" if first is not None else
                          f"never reaches {r['baseline']}'s final accuracy ({pct(r['baseline_final'])}%)")
                       + f"; its own final: {pct(r['final'])}%.")
        out.append("\n")
    timing = t.get("timing", {})
    if timing:
        out.append(f"\nWall time: {timing['total_s'] / 60:.1f} min.\n")
    return "\n".join(out)
