"""Experiment trackers users already use (``train.report_to``): TensorBoard, Weights & Biases,
MLflow. Each is imported only when asked for, here; each takes the run's numbers every step
and its resolved settings once. log.jsonl is always written: trackers are extra.

    dftune train cfg.yaml train.report_to=tensorboard,wandb,mlflow

Their own settings stay theirs: W&B's project, entity and mode come from its environment
(``WANDB_PROJECT``, ``WANDB_MODE=offline`` to log without a network), MLflow's store from
``MLFLOW_TRACKING_URI`` (a local ``./mlruns`` folder when unset). A resumed run continues the
same W&B and MLflow run (their ids are kept in the run folder). The TRL baselines hand the
same names to transformers' own integrations (``report_to``), verl's PPO to its logger.
"""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name -> the package it needs


def tracker_problems(names: list[str], where: str = "train.report_to") -> list[str]:
    """Unknown names, and named trackers whose package is not installed (the install command)."""
    out = []
    for name in names:
        if name not in TRACKERS:
            out.append(f"{where}: unknown tracker {name!r}; choose from {', '.join(TRACKERS)} (or leave it empty)")
        elif importlib.util.find_spec(TRACKERS[name]) is None:
            out.append(f"{where}: {name} is not installed: pip install {TRACKERS[name]}")
    return out


class TensorBoard:
    def __init__(self, out: Path, start: int, settings: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(out / "tb"), purge_step=start + 1)  # a resumed run overwrites replayed steps
        self.w.add_text("config", f"```\n{_yaml(settings)}\n```", 0)

    def log(self, metrics: dict, step: int) -> None:
        for k, v in metrics.items():
            self.w.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self.w.close()


class WandB:
    def __init__(self, out: Path, start: int, settings: dict):
        import wandb

        run_id = _kept_id(out / "wandb_id", lambda: uuid.uuid4().hex[:12])
        self.run = wandb.init(id=run_id, resume="allow", name=out.name, dir=str(out), config=settings,
                              project=None, reinit="finish_previous")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, out: Path, start: int, settings: dict):
        import mlflow

        from dftune.settings import flatten

        self.mlflow = mlflow
        path = out / "mlflow_run_id"
        run_id = path.read_text().strip() if path.is_file() else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else out.name)
        if run_id is None:
            path.write_text(self.run.info.run_id)
            flat = {k: str(v)[:500] for k, v in flatten(settings).items()}
            mlflow.log_params(flat)

    def log(self, metrics: dict, step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


OPEN = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def open_trackers(names: list[str], out: Path, start: int, settings: dict) -> list:
    """The trackers ``names`` asks for, started for the run in ``out`` (from step ``start``)."""
    return [OPEN[n](out, start, settings) for n in names]


def _kept_id(path: Path, new) -> str:
    if path.is_file():
        return path.read_text().strip()
    value = new()
    path.write_text(value)
    return value


def _yaml(settings: dict) -> str:
    import yaml

    return yaml.safe_dump(settings, sort_keys=False)
