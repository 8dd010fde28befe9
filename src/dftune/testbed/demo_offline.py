"""`dftune demo offline`: the paper's offline-RL table in miniature, on a CPU.

    dftune demo offline                                   # RFT, DFT-on-RFT, DPO, GRPO
    dftune demo offline offline.objectives=rft,dft_on_rft,nll_on_all,dft_on_all  # the controls

From a base with the strong prior's recipe whose pretraining solutions end, half of the
time, in a wrong last step (``offline.base_wrong_last_steps``; cached like the continuum's):
1. sample k responses per training question at temperature 1.0 and grade them
   (``dftune.offline.sample``): the correct ones are the RFT data, (correct, incorrect)
   pairs of a question the DPO data; the base's pass@1 and pass@k on them are recorded;
2. train from the same base, for every seed: RFT (NLL on the correct samples, the
   continuum demo's SFT recipe), DFT on the same file, DPO and GRPO (TRL, with our grader
   as GRPO's reward; GRPO at a constant rate after its warm-up, as verl runs it), and on
   request NLL and DFT on every sample, graded or not (the controls that separate what the
   correctness filter does from what DFT's weight does). PPO is wired on verl, which needs
   a GPU: not run here;
3. evaluate base and every model like the continuum demo; measure each model's
   learning-rate budget (the sum of the rate over its optimizer steps, from its own logs),
   how far it moved from the base and what it changed on the base's held-out samples
   (``offline_analysis.py``);
4. tables with seeds and intervals (differences paired to the base and to RFT), results.md,
   tables.json, report.html (``offline_tables.py``).
"""

from __future__ import annotations

import time
from pathlib import Path

from dftune.config import DataConfig
from dftune.eval.metrics import avg_key
from dftune.files import read_json, read_jsonl, write_jsonl
from dftune.settings import ConfigError
from dftune.testbed import bases, tables, tasks
from dftune.testbed.bases import PROMPT
from dftune.testbed.demo_config import DemoConfig
from dftune.testbed.stages import (
    base_for,
    elapsed,
    evaluate_model,
    finetune,
    folder_name,
    load_average,
    prepare,
    run_jobs,
    splits_of,
    test_rows,
    worker_count,
    write_sweep,
)

OBJECTIVES = ("rft", "dft_on_rft", "dpo", "grpo", "nll_on_all", "dft_on_all")
# the SFT-loop methods: (objective, file of the sampled folder); *_on_all train on every sample,
# graded or not (the controls that separate what the correctness filter does from what DFT does)
SFT_RUNS = {"rft": ("nll", "rft.jsonl"), "dft_on_rft": ("dft", "rft.jsonl"), "nll_on_all": ("nll", "all.jsonl"),
            "dft_on_all": ("dft", "all.jsonl")}


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


def dpo_config(cfg: DemoConfig, root: Path, base: Path, out: Path, seed: int):
    """DPO's run (TRL): the sampled pairs, cosine after a 0.05 warm-up (the paper's DPO)."""
    from dftune.offline.baselines import BaselineConfig, baseline_training

    o = cfg.offline
    train = baseline_training(lr=o.dpo_lr, warmup_ratio=0.05, global_batch=o.dpo_batch, micro_batch=o.dpo_batch,
                              epochs=o.dpo_epochs, seed=seed, out=str(out), log_every=1)
    return BaselineConfig(model=str(base), data=str(root / "sampled" / "dpo.jsonl"), train=train, lr_scheduler="cosine",
                          beta=o.dpo_beta, max_length=bases.MAX_LENGTH)


def grpo_config(cfg: DemoConfig, root: Path, base: Path, out: Path, seed: int):
    """GRPO's run (TRL): the training questions, group size ``grpo_group``, a constant rate
    after a 0.1 warm-up (verl's schedule, which the paper ran; docs/design.md), no KL term."""
    from dftune.offline.baselines import BaselineConfig, baseline_training

    o = cfg.offline
    completions = o.grpo_questions * o.grpo_group
    train = baseline_training(lr=o.grpo_lr, warmup_ratio=0.1, global_batch=completions, micro_batch=completions,
                              max_steps=o.grpo_steps, seed=seed, out=str(out), log_every=1)
    return BaselineConfig(model=str(base), data=str(root / "data" / "questions.jsonl"), instruction_suffix=bases.SUFFIX,
                          train=train, lr_scheduler="constant", num_generations=o.grpo_group,
                          max_completion_length=o.sample_tokens, temperature=1.0, beta=o.grpo_beta,
                          max_length=bases.MAX_LENGTH)


def _offline_job(cfg: DemoConfig, root: Path, files: dict, base: Path, obj: str, seed: int) -> None:
    """One method's run from the base (objective "base": its evaluation only), in a worker."""
    from dftune.offline.baselines import run_dpo, run_grpo

    out = root / folder_name({"setting": "offline", "objective": obj, "seed": seed})
    final = out / "final"
    if obj == "base":
        final = base
    elif obj in SFT_RUNS:
        objective, name = SFT_RUNS[obj]
        data = DataConfig(path=str(root / "sampled" / name), max_length=bases.MAX_LENGTH)
        final = finetune(base, data, out, objective=objective, lr=cfg.finetune_lr, batch=cfg.finetune_batch,
                         steps=cfg.finetune_steps, seed=seed)
    elif not (final / "config.json").is_file():
        make, run = (dpo_config, run_dpo) if obj == "dpo" else (grpo_config, run_grpo)
        final = run(make(cfg, root, base, out, seed))
    if not (out / "eval" / "summary.json").is_file():
        evaluate_model(cfg, final, out / "eval", files["benchmarks"], PROMPT)


def _base_job(cfg: DemoConfig, cache: Path) -> Path:
    """The offline demo's base: the strong recipe, with ``base_wrong_last_steps`` of its
    pretraining solutions ending in a wrong last step (cached like the continuum's bases)."""
    return bases.pretrained_base("strong", cache, steps=cfg.pretrain_steps, examples=cfg.pretrain_examples,
                                 batch=cfg.pretrain_batch, lr=cfg.pretrain_lr, hidden=cfg.hidden, layers=cfg.layers,
                                 heads=cfg.heads, wrong_last_steps=cfg.offline.base_wrong_last_steps)


def _sample_job(cfg: DemoConfig, root: Path, base: Path, questions: Path) -> dict:
    from dftune.eval.generate import EngineConfig, SamplingConfig
    from dftune.offline.sample import sample

    o = cfg.offline
    return sample(str(base), str(questions), root / "sampled", k=o.k, backend="hf", suffix=bases.SUFFIX,
                  sampling=SamplingConfig(n=o.k, temperature=1.0, max_new_tokens=o.sample_tokens, seed=0),
                  engine=EngineConfig(batch_size=cfg.eval_batch))


def lr_budget(run: Path) -> dict:
    """The learning-rate budget a run spent, from its own records: {optimizer_steps, lr_sum}
    (``dftune train``: the rate of every step in log.jsonl; TRL: budget.json, the rates the
    optimizer used)."""
    recorded = read_json(run / "budget.json")
    if recorded is not None:
        return {"optimizer_steps": recorded["optimizer_steps"], "lr_sum": recorded["lr_sum"]}
    lrs = [r["lr"] for r in read_jsonl(run / "log.jsonl") if "lr" in r]
    return {"optimizer_steps": len(lrs), "lr_sum": float(sum(lrs))}


def _analysis_job(root: Path, base: Path, names: dict[str, str], rows: list[dict]) -> dict:
    """Movement and held-out log-probability changes of the runs ``names`` ({label: folder})."""
    from dftune.testbed.offline_analysis import measure

    return measure(base, {label: root / folder / "final" for label, folder in names.items()}, rows)


def held_out(cfg: DemoConfig, root: Path) -> list[dict]:
    """The base's evaluation samples, with the gold derivations of their problems."""
    from dftune.testbed.offline_analysis import held_out_rows

    problems = {(s, r["id"]): (r["problem"], r["solution"]) for s in splits_of(cfg) for r in test_rows(cfg, s)}
    folder = root / folder_name({"setting": "offline", "objective": "base", "seed": 0}) / "eval"
    return held_out_rows(folder, problems, bases.SUFFIX)


def run_offline(cfg: DemoConfig) -> Path:
    from dftune.analysis.report import write_report
    from dftune.files import write_json, write_text
    from dftune.testbed.offline_tables import offline_report_tables, offline_settings, pass_rows

    t0, load_start = time.time(), load_average()
    o = cfg.offline
    objectives = _objectives(cfg)
    splits = splits_of(cfg)
    root, cache, files = prepare(cfg)
    base = base_for(cfg, "real", cache) if cfg.real_base else run_jobs(_base_job, [(cfg, cache)], 1)[0]
    timings = {"base": time.time() - t0}
    questions = write_questions(cfg, root)

    # 1. k samples per question from the base, graded: rft.jsonl and dpo.jsonl
    t = time.time()
    stats = run_jobs(_sample_job, [(cfg, root, base, questions)], 1)[0]
    write_jsonl(root / "sampled" / "all.jsonl", [{"id": f"{r['id']}-{r['sample']}", "prompt": r["prompt"],
                                                  "completion": r["response"]}
                                                 for r in read_jsonl(root / "sampled" / "samples.jsonl")])
    timings["sample"] = time.time() - t
    print(f"sampled: {stats['correct']} correct of {stats['responses']} ({stats['yield']:.0%}), "
          f"{stats['dpo_pairs']} DPO pairs")
    if stats["correct"] < cfg.finetune_batch or ("dpo" in objectives and stats["dpo_pairs"] < o.dpo_batch):
        raise ConfigError(f"the base's samples gave {stats['correct']} correct responses and {stats['dpo_pairs']} pairs: "
                          f"too few for a batch ({cfg.finetune_batch} / {o.dpo_batch}); raise offline.questions")

    # 2. every method and seed from the base, the base's own evaluation beside them; evaluated
    grid = [("base", 0)] + [(obj, seed) for obj in objectives for seed in range(cfg.seeds)]
    points = [{"name": folder_name(v), "values": v}
              for v in ({"setting": "offline", "objective": obj, "seed": seed} for obj, seed in grid)]
    t = time.time()
    run_jobs(_offline_job, [(cfg, root, files, base, obj, seed) for obj, seed in grid], cfg.workers)
    timings["runs"] = time.time() - t
    print(f"{len(grid)} points trained and evaluated ({elapsed(t0)})")

    # 3. what each run spent and changed, on the base's held-out samples (a job per seed)
    t = time.time()
    rows = held_out(cfg, root)
    per_seed = [{obj: folder_name({"setting": "offline", "objective": obj, "seed": s}) for obj in objectives}
                for s in range(cfg.seeds)]
    measured = run_jobs(_analysis_job, [(root, base, names, rows) for names in per_seed], cfg.workers)
    timings["analysis"] = time.time() - t
    movement = [{"objective": obj, "seed": s, **lr_budget(root / per_seed[s][obj]), **measured[s][obj]}
                for obj in objectives for s in range(cfg.seeds)]

    write_sweep(root, cfg, ["setting", "objective", "seed"], "rft", points)
    accuracy, diffs = tables.accuracy_tables(root, points, splits, "setting", "rft")
    vs_base = base_differences(root, points, splits)
    base_eval = root / points[0]["name"] / "eval"
    result = {"schema": tables.TABLES_SCHEMA, "kind": "offline", "metric": avg_key(cfg.eval_n), "n": cfg.eval_n,
              "problems_per_split": cfg.eval_problems, "seeds": cfg.seeds, "splits": splits + ["mean"],
              "group": "setting", "baseline": "rft",
              "intervals": {"cell": tables.CELL_INTERVAL, "diff": tables.DIFF_INTERVAL},
              "sampling": stats, "base_pass": pass_rows(stats, base_eval, splits),
              "settings": offline_settings(cfg), "accuracy": accuracy, "vs_baseline": diffs, "vs_base": vs_base,
              "movement": movement, "held_out_samples": {k: sum(r["kind"] == k for r in rows)
                                                         for k in ("clean", "lucky", "wrong")},
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


def base_differences(root: Path, points: list[dict], splits: list[str]) -> list[dict]:
    """Every method minus the base, per split and "mean": the base's one evaluation paired
    with each seed's, problem by problem (the bootstrap resamples the seeds and the problems)."""
    import numpy as np

    groups = tables._groups(points, "setting")
    base_folder = root / groups[("offline", "base")][0] / "eval"
    base = {b: tables.accuracy_matrix([base_folder], b)[0] for b in splits}
    base["mean"] = np.concatenate([base[b] for b in splits], axis=1)
    out = []
    for (g, obj), seeds in groups.items():
        if obj == "base":
            continue
        folders = [root / seeds[s] / "eval" for s in sorted(seeds)]
        mats = {b: tables.accuracy_matrix(folders, b)[0] for b in splits}
        mats["mean"] = np.concatenate([mats[b] for b in splits], axis=1)
        for k, (b, m) in enumerate(mats.items()):
            d = tables.paired_difference(m, np.repeat(base[b], len(m), axis=0), seed=k)
            out.append({"setting": g, "objective": obj, "baseline": "base", "split": b, "seeds": len(m), **d})
    return out
