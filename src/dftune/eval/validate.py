"""The checks of an evaluation's settings (``EvalConfig`` and its sampling and engine
sections), run before any benchmark, tokenizer or model is loaded: every problem is
collected into one ``Problems`` list, each a line that names its key.

Used by ``dftune eval``, by training's periodic evaluation (the ``eval`` section, which
omits the keys it cannot honour), by ``dftune sweep``'s evaluation of each point, and, for
the sampling settings, by ``dftune sample``.
"""

from __future__ import annotations

from dftune.eval.benchmarks import BENCHMARKS, data_dir
from dftune.eval.generate import EngineConfig, SamplingConfig
from dftune.eval.run import EvalConfig, check_eval_config
from dftune.paths import model_problem
from dftune.precision import DTYPES
from dftune.settings import Problems

def check_sampling(s: SamplingConfig, p: Problems, where: str = "sampling.") -> None:
    p.at_least(f"{where}n", s.n, 1)
    p.at_least(f"{where}temperature", s.temperature, 0)
    p.check(0 < s.top_p <= 1, f"{where}top_p: must be in (0, 1]; got {s.top_p}")
    p.at_least(f"{where}max_new_tokens", s.max_new_tokens, 1)


def check_engine(e: EngineConfig, p: Problems, where: str = "engine.") -> None:
    p.at_least(f"{where}tensor_parallel_size", e.tensor_parallel_size, 1)
    p.at_least(f"{where}data_parallel_size", e.data_parallel_size, 1)
    p.at_least(f"{where}max_model_len", e.max_model_len, 0)
    p.fraction(f"{where}gpu_memory_utilization", e.gpu_memory_utilization, one=True)
    p.one_of(f"{where}dtype", e.dtype, ("auto", *DTYPES))
    p.at_least(f"{where}batch_size", e.batch_size, 1)


def check_benchmarks(names: list[str], directory: str, p: Problems, where: str = "") -> None:
    """Known names (from the Hub), or NAME/test.jsonl under the data folder (then read only there)."""
    if not p.check(bool(names), f"{where}benchmarks: empty; name at least one (e.g. math500)"):
        return
    d = data_dir(directory or None)
    if d is not None and not d.is_dir():
        p.append(f"{where}data_dir: {d} not found")
        return
    for name in names:
        if d is not None:
            path = d / name / "test.jsonl"
            p.check(path.is_file(), f"{where}benchmarks: {name}: {path} not found")
        else:
            p.check(name in BENCHMARKS, f"{where}benchmarks: unknown benchmark {name!r}; known: "
                                        f"{', '.join(BENCHMARKS)}, or NAME/test.jsonl under {where}data_dir")


def check_eval(cfg: EvalConfig, p: Problems, where: str = "", *, periodic: bool = False, out: str = "",
               model_set: bool = False) -> None:
    """``periodic``: training's ``eval`` section (no model, out, backend or engine of its own);
    ``model_set``: the model is set per run (sweep points), not here; ``out``: the results
    folder given apart from ``cfg.out``."""
    if periodic:  # set in code (the command line refuses these keys): what it cannot honour
        from dftune.config import PERIODIC_OMITS

        for key in ("model", "out"):
            p.check(not getattr(cfg, key), f"{where}{key}: {PERIODIC_OMITS[key]}")
        p.check(cfg.backend == "hf", f"{where}backend: {PERIODIC_OMITS['backend']}")
    if not (periodic or model_set):
        p.add(model_problem(f"{where}model", cfg.model))
        p.nonempty(f"{where}out", out or cfg.out, "the results folder")
    if not periodic:
        check_engine(cfg.engine, p, f"{where}engine.")
        p.at_least(f"{where}chunk", cfg.chunk, 1)
        p.fraction(f"{where}warn_failures", cfg.warn_failures, one=True)
    check_benchmarks(cfg.benchmarks, cfg.data_dir, p, where)
    check_eval_config(cfg, p, where)  # prompt, stops, grader, backend
    p.at_least(f"{where}limit", cfg.limit, 0)
    check_sampling(cfg.sampling, p, f"{where}sampling.")
    p.at_least(f"{where}grade_workers", cfg.grade_workers, 0)
    p.at_least(f"{where}grade_timeout", cfg.grade_timeout, 1)


def validate_eval(cfg: EvalConfig, out: str = "") -> None:
    """``dftune eval``'s settings, every problem raised together."""
    p = Problems()
    check_eval(cfg, p, out=out)
    p.raise_all()


def validate_compare(cfg) -> None:
    """`dftune compare`: two finished evaluation folders, a positive number of resamples."""
    from dftune.paths import folder_problem

    p = Problems()
    if p.check(len(cfg.evals) == 2, f"evals: compare needs two evaluation folders (A B); got {len(cfg.evals)}"):
        for folder in cfg.evals:
            p.add(folder_problem("evals", folder, needs="summary.json"))
    p.at_least("reps", cfg.reps, 1)
    p.raise_all()
