"""`dftune demo offline`: the paper's offline-RL table in miniature, on a CPU.

From the testbed's strong base (cached; the same one the continuum demo uses):
1. sample k responses per training question at temperature 1.0 and grade them
   (``dftune.offline.sample``): the correct ones are the RFT data, (correct, incorrect)
   pairs of a question the DPO data;
2. train from the same base, for every seed: RFT (NLL on the correct samples, the
   continuum demo's SFT recipe), DFT on the same file, DPO and GRPO (TRL, with our grader
   as GRPO's reward). PPO is wired on verl, which needs a GPU: not run here;
3. evaluate base and every model like the continuum demo; tables with seeds and intervals
   (differences paired to RFT), results.md, tables.json, report.html.

The paper's relative settings (PAPER.md) with every learning rate scaled by the same
factor as the demo's SFT one (finetune_lr / 5e-5): DPO and GRPO at 1/50 of the SFT rate,
DPO's batch half of SFT's with warm-up 0.05, GRPO group size 4 (= k) with warm-up 0.1.
"""

from __future__ import annotations

import time
from pathlib import Path

from dftune.config import DataConfig
from dftune.eval.metrics import avg_key
from dftune.files import write_jsonl
from dftune.settings import ConfigError
from dftune.testbed import bases, tables, tasks
from dftune.testbed.bases import PROMPT
from dftune.testbed.demo_config import DemoConfig
from dftune.testbed.stages import (
    build_bases,
    elapsed,
    evaluate_model,
    finetune,
    folder_name,
    load_average,
    prepare,
    run_jobs,
    splits_of,
    worker_count,
    write_sweep,
)

OBJECTIVES = ("rft", "dft_on_rft", "dpo", "grpo")
PAPER_SFT_LR = 5e-5


def _objectives(cfg: DemoConfig) -> list[str]:
    objs = [o.strip() for o in cfg.offline.objectives.split(",") if o.strip()]
    bad = [o for o in objs if o not in OBJECTIVES]
    if bad or "rft" not in objs:
        raise ConfigError(f"offline.objectives: choose from {', '.join(OBJECTIVES)} (rft, the baseline, included); "
                          f"got {cfg.offline.objectives!r}" + ("; PPO runs on verl and needs a GPU" if "ppo" in bad else ""))
    import importlib.util

    trl = [o for o in objs if o in ("dpo", "grpo")]
    if trl and importlib.util.find_spec("trl") is None:  # found out now, not after pretraining and sampling
        raise ConfigError(f"offline.objectives {','.join(trl)} run on TRL, which is not installed: "
                          "pip install 'dftune[trl]' (or offline.objectives=rft,dft_on_rft)")
    return objs


def write_questions(cfg: DemoConfig, root: Path) -> Path:
    """Training questions from the demonstrations' distribution (other problems than theirs)."""
    rows = tasks.generate(tasks.SPLITS["train_narrow"], cfg.offline.questions, seed=3, prefix="q")
    return write_jsonl(root / "data" / "questions.jsonl",
                              [{"id": r["id"], "problem": r["problem"], "solution": r["solution"], "answer": r["answer"]}
                               for r in rows])


def _offline_job(cfg: DemoConfig, root: Path, files: dict, base: Path, obj: str, seed: int) -> None:
    """One method's run from the base (objective "base": its evaluation only), in a worker."""
    from dftune.offline.baselines import BaselineConfig, baseline_training, run_dpo, run_grpo

    o, sampled = cfg.offline, root / "sampled"
    out = root / folder_name({"setting": "offline", "objective": obj, "seed": seed})
    final = out / "final"
    if obj == "base":
        final = base
    elif obj in ("rft", "dft_on_rft"):
        rft = DataConfig(path=str(sampled / "rft.jsonl"), max_length=bases.MAX_LENGTH)
        final = finetune(base, rft, out, objective="nll" if obj == "rft" else "dft", lr=cfg.finetune_lr,
                         batch=cfg.finetune_batch, steps=cfg.finetune_steps, seed=seed)
    elif not (final / "config.json").is_file():
        common = {"model": str(base), "max_length": bases.MAX_LENGTH}
        if obj == "dpo":
            train = baseline_training(lr=o.dpo_lr, warmup_ratio=0.05, global_batch=o.dpo_batch, micro_batch=o.dpo_batch,
                                      max_steps=o.dpo_steps, seed=seed, out=str(out), log_every=1)
            final = run_dpo(BaselineConfig(data=str(sampled / "dpo.jsonl"), train=train, beta=o.dpo_beta, **common))
        else:
            train = baseline_training(lr=o.grpo_lr, warmup_ratio=0.1, global_batch=o.grpo_questions * o.k,
                                      micro_batch=o.grpo_questions * o.k, max_steps=o.grpo_steps, seed=seed,
                                      out=str(out), log_every=1)
            final = run_grpo(BaselineConfig(data=str(root / "data" / "questions.jsonl"), instruction_suffix=bases.SUFFIX,
                                            train=train, num_generations=o.k, max_completion_length=o.sample_tokens,
                                            temperature=1.0, beta=o.grpo_beta, **common))
    if not (out / "eval" / "summary.json").is_file():
        evaluate_model(cfg, final, out / "eval", files["benchmarks"], PROMPT)


def _sample_job(cfg: DemoConfig, root: Path, base: Path, questions: Path) -> dict:
    from dftune.eval.generate import EngineConfig, SamplingConfig
    from dftune.offline.sample import sample

    o = cfg.offline
    return sample(str(base), str(questions), root / "sampled", k=o.k, backend="hf", suffix=bases.SUFFIX,
                  sampling=SamplingConfig(n=o.k, temperature=1.0, max_new_tokens=o.sample_tokens, seed=0),
                  engine=EngineConfig(batch_size=cfg.eval_batch))


def run_offline(cfg: DemoConfig) -> Path:
    from dftune.analysis.report import write_report
    from dftune.files import write_json, write_text

    t0, load_start = time.time(), load_average()
    o = cfg.offline
    objectives = _objectives(cfg)
    splits_of(cfg)
    root, cache, files = prepare(cfg)
    prior = "real" if cfg.real_base else "strong"
    base = build_bases(cfg, [prior], cache)[prior]
    timings = {"base": time.time() - t0}
    questions = write_questions(cfg, root)

    # 1. k samples per question from the base, graded: rft.jsonl and dpo.jsonl
    t = time.time()
    stats = run_jobs(_sample_job, [(cfg, root, base, questions)], 1)[0]
    timings["sample"] = time.time() - t
    print(f"sampled: {stats['correct']} correct of {stats['responses']} ({stats['yield']:.0%}), "
          f"{stats['dpo_pairs']} DPO pairs")
    if stats["correct"] < cfg.finetune_batch or ("dpo" in objectives and stats["dpo_pairs"] < o.dpo_batch):
        raise ConfigError(f"the base's samples gave {stats['correct']} correct responses and {stats['dpo_pairs']} pairs: "
                          f"too few for a batch ({cfg.finetune_batch} / {o.dpo_batch}); raise offline.questions")

    # 2. every method and seed from the base, the base's own evaluation beside them; 3. evaluate
    grid = [("base", 0)] + [(obj, seed) for obj in objectives for seed in range(cfg.seeds)]
    points = [{"name": folder_name(v), "values": v}
              for v in ({"setting": "offline", "objective": obj, "seed": seed} for obj, seed in grid)]
    t = time.time()
    run_jobs(_offline_job, [(cfg, root, files, base, obj, seed) for obj, seed in grid], cfg.workers)
    timings["runs"] = time.time() - t
    print(f"{len(grid)} points trained and evaluated ({elapsed(t0)})")
    scale = cfg.finetune_lr / PAPER_SFT_LR

    write_sweep(root, cfg, ["setting", "objective", "seed"], "rft", points)
    splits = splits_of(cfg)
    accuracy, diffs = tables.accuracy_tables(root, points, splits, "setting", "rft")
    result = {"schema": tables.TABLES_SCHEMA, "kind": "offline", "metric": avg_key(cfg.eval_n), "n": cfg.eval_n,
              "problems_per_split": cfg.eval_problems, "seeds": cfg.seeds, "splits": splits + ["mean"],
              "group": "setting", "baseline": "rft",
              "intervals": {"cell": tables.CELL_INTERVAL, "diff": tables.DIFF_INTERVAL},
              "sampling": stats, "settings": offline_settings(cfg, scale),
              "accuracy": accuracy, "vs_baseline": diffs,
              "eos": [{"setting": "offline", "objective": obj, "seeds": len(s),
                       **tables.generation_summary([root / s[k] / "eval" for k in sorted(s)])}
                      for (_, obj), s in tables._groups(points, "setting").items()],
              "timing": {"total_s": round(time.time() - t0, 1), "workers": worker_count(cfg.workers),
                        "load_average_start": load_start, "load_average_end": load_average(),
                         **{k: round(v, 1) for k, v in timings.items()}}}
    result["tables"] = offline_report_tables(result)
    write_json(root / "tables.json", result)
    text = tables.markdown_document("dftune demo offline: the paper's offline-RL table in miniature", result)
    write_text(root / "results.md", text)
    print(text)
    report = write_report([root], root / "report.html", title="dftune demo offline: RFT, DFT-on-RFT, DPO, GRPO")
    print(f"report: {report}  ({elapsed(t0)})")
    return report


def offline_settings(cfg: DemoConfig, scale: float) -> dict:
    """What each method ran with, and the paper's value it was scaled from."""
    o = cfg.offline
    return {"lr_scale": scale, "k": o.k, "questions": o.questions, "temperature": 1.0,
            "rft": {"lr": cfg.finetune_lr, "batch": cfg.finetune_batch, "steps": cfg.finetune_steps, "warmup": 0.1,
                    "paper": {"lr": PAPER_SFT_LR, "batch": 256, "warmup": 0.1}},
            "dpo": {"lr": o.dpo_lr, "batch": o.dpo_batch, "steps": o.dpo_steps or "1 epoch", "warmup": 0.05,
                    "beta": o.dpo_beta, "paper": {"lr": 1e-6, "batch": 128, "warmup": 0.05}},
            "grpo": {"lr": o.grpo_lr, "questions_per_step": o.grpo_questions, "group": o.k, "steps": o.grpo_steps,
                     "warmup": 0.1, "beta": o.grpo_beta, "paper": {"lr": 1e-6, "batch": 256, "group": 4, "warmup": 0.1}},
            "ppo": "not run: PPO is wired on verl, which needs a GPU (dftune baseline ppo)"}


def offline_report_tables(t: dict) -> list[dict]:
    """The tables the report and results.md show: [{title, columns, rows, note}], cells as text."""
    s, st, splits = t["settings"], t["sampling"], t["splits"]
    cells = {(r["objective"], r["split"]): r for r in t["accuracy"]}
    diffs = {(r["objective"], r["split"]): r for r in t["vs_baseline"]}
    eos = {r["objective"]: r for r in t["eos"]}
    return [{
        "title": "Offline RL in miniature: accuracy by method",
        "columns": ["method", "seeds"] + splits + ["mean − rft, points", "stopped %", "mean tokens"],
        "rows": [[o, str(cells[(o, splits[0])]["seeds"])] + [tables.fmt_cell(cells[(o, b)]) for b in splits]
                 + [tables.fmt_diff(diffs[(o, "mean")]) if (o, "mean") in diffs else "",
                    tables._pct(eos[o]["stop"]), f"{eos[o]['mean_tokens']:.0f}"]
                 for o in dict.fromkeys(r["objective"] for r in t["accuracy"])],
        "note": (f"From the strong base: {st['questions']} questions x k = {st['k']} samples at temperature 1.0; "
                 f"{st['correct']} correct ({100 * st['yield']:.1f}%) are the RFT data (DFT-on-RFT trains on the same "
                 f"file), {st['dpo_pairs']} (correct, incorrect) pairs the DPO data. {t['metric']} in % on "
                 f"{t['problems_per_split']} problems per split, mean ± 95% t-interval half-width over {t['seeds']} "
                 "seeds (the base: one evaluation); the difference to RFT is paired by seed and problem, [95% "
                 "bootstrap interval] (seeds ahead / seeds)."),
    }, {
        "title": "Settings (the paper's relative settings, learning rates scaled)",
        "columns": ["method", "lr", "batch", "steps", "warm-up", "paper"],
        "rows": [["RFT / DFT-on-RFT", f"{s['rft']['lr']:g}", f"{s['rft']['batch']} sequences", str(s["rft"]["steps"]),
                  str(s["rft"]["warmup"]), "lr 5e-5, batch 256, warm-up 0.1"],
                 ["DPO", f"{s['dpo']['lr']:g}", f"{s['dpo']['batch']} pairs", str(s["dpo"]["steps"]),
                  str(s["dpo"]["warmup"]), "lr 1e-6, batch 128, warm-up 0.05"],
                 ["GRPO", f"{s['grpo']['lr']:g}", f"{s['grpo']['questions_per_step']} questions x {s['grpo']['group']}",
                  str(s["grpo"]["steps"]), str(s["grpo"]["warmup"]), "lr 1e-6, batch 256, group 4, warm-up 0.1"],
                 ["PPO", "", "", "", "", s["ppo"]]],
        "note": f"Every learning rate is the paper's times {s['lr_scale']:g} (the demo's SFT lr over the paper's 5e-5).",
    }]
