"""PPO baseline on verl (the library the paper ran): we prepare, launch and collect; verl trains.

    dftune baseline ppo configs/paper/ppo.yaml model=Qwen/Qwen2.5-Math-1.5B
    dftune baseline ppo configs/paper/ppo.yaml launch=false   # only write the data and the command

No PPO is written here (TRL dropped its PPOTrainer; docs/design.md says why verl). What
this module does:
1. checks the config (batch sizes against the GPUs, the warm-up) before anything else;
2. converts the question dataset to verl's parquet schema (``to_verl_rows``): the prompt
   as one user turn, which verl renders with the tokenizer's chat template (the layout
   ``dftune sample`` and the GRPO baseline use), the gold answer in
   ``reward_model.ground_truth``; rows without a gold answer are skipped and counted;
3. builds verl's command line from the config (``verl_command``): every field maps to a
   Hydra override, the reward is ``verl_reward.compute_score`` (our grader) and the
   resolved config, the command (``launch.sh``) and the data are written to ``train.out``;
4. runs it (``launch=true``; needs verl, vLLM and GPUs), then copies the last
   checkpoint's Hugging Face weights to ``train.out/final`` and verl's metrics to
   ``train.out/log.jsonl``, so ``dftune eval`` and ``dftune report`` take it like any run.

Checked against verl 0.7.1, 0.8.0 and 0.9.1 (Hydra composes every override in strict mode)
and its main branch (0.10.0.dev, Aug 2026); ``reward.custom_reward_function`` needs >= 0.7.1.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from dftune.config import TrainingSection
from dftune.files import read_jsonl, write_jsonl, write_text
from dftune.settings import ConfigError, Problems, load

# verl imports pkg:// paths as modules (on every Ray node, from its own dftune install)
REWARD_MODULE = "pkg://dftune.offline.verl_reward"


# shared training keys verl does not take from us
PPO_TRAIN_OMITS = {"log_every": "verl logs every step (trainer.logger)"}


def ppo_training(**changes) -> TrainingSection:
    """The ``train`` section's defaults for PPO (the paper's: lr 1e-6, 256 questions per step,
    warm-up 0.1; verl's weight decay and clipping), with ``changes``."""
    return TrainingSection(**{"lr": 1e-6, "warmup_ratio": 0.1, "weight_decay": 0.01, "global_batch": 256,
                              "out": "runs/ppo", **changes})


@dataclass
class PPOConfig:
    """A PPO run on verl (defaults: the paper's offline-RL table, PAPER.md, and verl's own)."""

    model: str = ""
    """Hub id or local folder (actor, critic and reference start from it)."""
    data: str = ""
    """A question dataset with gold answers (problem/solution, question/answer, or an answer field)."""
    select: str = "all"
    """all, first:N or random:N rows."""
    instruction_suffix: str = ""
    """Text appended to every question."""
    train: TrainingSection = field(default_factory=ppo_training, metadata={"omit": PPO_TRAIN_OMITS})
    """The shared training settings: train.lr is the actor's; train.global_batch counts questions
    (one response each); train.micro_batch counts responses per forward pass on one GPU;
    train.epochs must be whole (verl's total_epochs)."""
    critic_lr: float = 1e-5
    """The critic's learning rate (verl's default; the paper gives none)."""
    lr_scheduler: str = "constant"
    """constant (verl's default, flat after the warm-up) or cosine; actor and critic."""
    mini_batch: int = 256
    """Responses per optimizer update; train.global_batch / mini_batch updates per step. The
    accumulation is mini_batch / (train.micro_batch x gpus_per_node x nodes), and must divide."""
    ppo_epochs: int = 1
    """Passes over each step's responses."""
    clip_ratio: float = 0.2
    """PPO's clip range."""
    gamma: float = 1.0
    """GAE's discount (1.0: verl's default for outcome rewards)."""
    lam: float = 1.0
    """GAE's lambda (1.0: verl's default for outcome rewards)."""
    kl_coef: float = 0.0
    """KL(actor || reference) penalty in the reward; 0 turns it off (verl's default)."""
    max_prompt_length: int = 1024
    """Prompt tokens; longer prompts are dropped by verl."""
    max_completion_length: int = 2048
    """Response tokens."""
    temperature: float = 1.0
    """Rollout sampling temperature (top_p 1.0)."""
    gpus_per_node: int = 8
    """GPUs per node verl spreads over (Ray)."""
    nodes: int = 1
    """Nodes verl spreads over (Ray)."""
    rollout_tp: int = 1
    """vLLM's tensor-parallel size for the rollout."""
    gpu_memory_utilization: float = 0.5
    """The fraction of GPU memory vLLM may take."""
    gradient_checkpointing: bool = True
    """Recompute activations (actor and critic)."""
    grade_workers: int = 8
    """verl reward workers, each calling our grader."""
    save_every: int = 50
    """Checkpoint every N steps (verl saves only then; the last step always saves)."""
    python: str = ""
    """The interpreter that has verl installed (empty: this one)."""
    launch: bool = True
    """Run verl now; false only writes the data, the config and launch.sh, and prints the command."""
    extra: list[str] = field(default_factory=list, metadata={"split": False})
    """Further verl overrides, key=value, appended last (they win), e.g. [trainer.logger=[console,wandb]]."""


def load_ppo_config(path: str | None, overrides: list[str]) -> PPOConfig:
    """YAML (optional) + key=value overrides, checked (dftune.settings.load)."""
    return load(PPOConfig, path, overrides)


def check(cfg: PPOConfig) -> int:
    """Validate the values verl would reject late (or silently misread), every problem at
    once; return the GPU count."""
    p, t = Problems(), cfg.train
    for name in ("global_batch", "micro_batch", "max_steps"):
        p.at_least(f"train.{name}", getattr(t, name), 0 if name == "max_steps" else 1)
    for name in ("mini_batch", "ppo_epochs", "gpus_per_node", "nodes", "rollout_tp", "grade_workers", "save_every",
                 "max_prompt_length", "max_completion_length"):
        p.at_least(name, getattr(cfg, name), 1)
    p.check(t.epochs >= 1 and t.epochs == int(t.epochs), f"train.epochs: verl runs whole epochs (>= 1); got {t.epochs}")
    p.check(bool(cfg.model), "model: empty; give a Hub id or a local model folder")
    p.check(bool(cfg.data), "data: empty; give a question dataset with gold answers")
    p.check(t.lr > 0, f"train.lr: must be > 0; got {t.lr}")
    p.check(0.0 <= t.warmup_ratio < 1.0, f"train.warmup_ratio: must be in [0, 1); got {t.warmup_ratio}")
    p.one_of("lr_scheduler", cfg.lr_scheduler, ("constant", "cosine"))
    p.check(all("=" in x for x in cfg.extra), f"extra: expected key=value strings, got {cfg.extra!r}")
    from dftune.trackers import TRACKERS

    for name in t.report_to:  # installed where verl runs, not necessarily here
        p.one_of("train.report_to", name, tuple(TRACKERS))
    world = max(cfg.gpus_per_node, 1) * max(cfg.nodes, 1)
    if t.global_batch >= 1 and cfg.mini_batch >= 1 and t.micro_batch >= 1 and cfg.rollout_tp >= 1:
        p.check(t.global_batch % cfg.mini_batch == 0,
                f"train.global_batch {t.global_batch} is not a multiple of mini_batch {cfg.mini_batch}")
        p.check(cfg.mini_batch % (t.micro_batch * world) == 0,
                f"mini_batch {cfg.mini_batch} is not a multiple of train.micro_batch {t.micro_batch} x {world} GPU(s) "
                f"(gpus_per_node {cfg.gpus_per_node} x nodes {cfg.nodes}) = {t.micro_batch * world}")
        p.check(world % cfg.rollout_tp == 0, f"rollout_tp {cfg.rollout_tp} does not divide the {world} GPU(s)")
    p.raise_all()
    return world


def to_verl_rows(questions, data_source: str = "dftune") -> list[dict]:
    """verl's RL dataset rows: a chat prompt, the gold answer for the rule-based reward, our id.

    ``ground_truth`` is a string, as verl expects; the reward reads the grader's list of parts
    (all required, for multi-answer golds) from ``extra_info.golds``.
    """
    return [{"data_source": data_source, "prompt": [{"role": "user", "content": q.prompt}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": ", ".join(q.golds)},
             "extra_info": {"index": i, "id": q.id, "golds": list(q.golds)}} for i, q in enumerate(questions)]


def write_verl_data(cfg: PPOConfig, path: Path) -> dict:
    """Convert cfg.data to verl's parquet at ``path``; return counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dftune.offline.sample import load_questions

    questions, skipped = load_questions(cfg.data, cfg.select, cfg.instruction_suffix, cfg.train.seed)
    if len(questions) < cfg.train.global_batch:
        raise ConfigError(f"{cfg.data}: {len(questions)} question(s) with a gold answer, fewer than one batch "
                          f"(global_batch {cfg.train.global_batch}); verl drops the incomplete last batch")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pylist(to_verl_rows(questions)), tmp)
    os.replace(tmp, path)
    return {"questions": len(questions), "skipped_no_gold": len(skipped), "skipped_examples": skipped[:5]}


_PLAIN = re.compile(r"^[\w./:@+-]+$")


def _numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _hydra(value) -> str:
    """A value in Hydra's override grammar; a string is quoted unless it is plain and reads as a string.

    In Hydra's quoted strings a quote is escaped, and so are backslashes just before a quote or the end.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    s = str(value)
    if _PLAIN.match(s) and not _numeric(s) and s.lower() not in ("true", "false", "null", "none", "nan", "inf"):
        return s
    s = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, s)
    return "'" + s.replace("'", "\\'") + "'"


def verl_overrides(cfg: PPOConfig, train_file: Path) -> dict[str, str]:
    """Every verl setting we choose, as Hydra key -> value (the config's fields, mapped)."""
    check(cfg)
    out = Path(cfg.train.out).resolve()
    o: dict = {
        "algorithm.adv_estimator": "gae",  # PPO: a learned critic, generalised advantage estimation
        "algorithm.gamma": cfg.gamma,
        "algorithm.lam": cfg.lam,
        "algorithm.use_kl_in_reward": cfg.kl_coef > 0,
        "algorithm.kl_ctrl.kl_coef": cfg.kl_coef,
        "data.train_files": str(train_file.resolve()),
        "data.val_files": str(train_file.resolve()),  # never evaluated (test_freq -1) but must load
        "data.prompt_key": "prompt",
        "data.train_batch_size": cfg.train.global_batch,
        "data.max_prompt_length": cfg.max_prompt_length,
        "data.max_response_length": cfg.max_completion_length,
        "data.filter_overlong_prompts": True,
        "data.truncation": "error",
        "data.seed": cfg.train.seed,
        "actor_rollout_ref.model.path": cfg.model,
        "actor_rollout_ref.model.enable_gradient_checkpointing": cfg.gradient_checkpointing,
        "actor_rollout_ref.actor.optim.lr": cfg.train.lr,
        "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio": cfg.train.warmup_ratio,
        "actor_rollout_ref.actor.optim.lr_scheduler_type": cfg.lr_scheduler,
        "actor_rollout_ref.actor.optim.weight_decay": cfg.train.weight_decay,
        "actor_rollout_ref.actor.optim.clip_grad": cfg.train.grad_clip,
        "actor_rollout_ref.actor.ppo_mini_batch_size": cfg.mini_batch,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "actor_rollout_ref.actor.ppo_epochs": cfg.ppo_epochs,
        "actor_rollout_ref.actor.clip_ratio": cfg.clip_ratio,
        "actor_rollout_ref.actor.use_kl_loss": False,
        "actor_rollout_ref.actor.checkpoint.save_contents": "[model,optimizer,extra,hf_model]",
        "actor_rollout_ref.rollout.name": "vllm",
        "actor_rollout_ref.rollout.n": 1,
        "actor_rollout_ref.rollout.temperature": cfg.temperature,
        "actor_rollout_ref.rollout.top_p": 1.0,
        "actor_rollout_ref.rollout.tensor_model_parallel_size": cfg.rollout_tp,
        "actor_rollout_ref.rollout.gpu_memory_utilization": cfg.gpu_memory_utilization,
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "critic.model.path": cfg.model,
        "critic.model.enable_gradient_checkpointing": cfg.gradient_checkpointing,
        "critic.optim.lr": cfg.critic_lr,
        "critic.optim.lr_warmup_steps_ratio": cfg.train.warmup_ratio,
        "critic.optim.lr_scheduler_type": cfg.lr_scheduler,
        "critic.optim.weight_decay": cfg.train.weight_decay,
        "critic.optim.clip_grad": cfg.train.grad_clip,
        "critic.ppo_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "reward.custom_reward_function.path": REWARD_MODULE,
        "reward.custom_reward_function.name": "compute_score",
        "reward.num_workers": cfg.grade_workers,
        "trainer.n_gpus_per_node": cfg.gpus_per_node,
        "trainer.nnodes": cfg.nodes,
        "trainer.total_epochs": int(cfg.train.epochs),
        "trainer.default_local_dir": str(out / "checkpoints"),
        "trainer.project_name": "dftune",
        "trainer.experiment_name": out.name,
        "trainer.logger": "[" + ",".join(["console", "file", *cfg.train.report_to]) + "]",
        "trainer.save_freq": cfg.save_every,
        "trainer.test_freq": -1,
        "trainer.val_before_train": False,
        "trainer.resume_mode": "auto",
    }
    if cfg.train.max_steps > 0:
        o["trainer.total_training_steps"] = cfg.train.max_steps
    # lists are Hydra syntax already; everything else is quoted as Hydra needs
    return {k: v if isinstance(v, str) and v.startswith("[") else _hydra(v) for k, v in o.items()}


def verl_command(cfg: PPOConfig, train_file: Path) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) that launch verl's PPO trainer on ``train_file``."""
    argv = [cfg.python or sys.executable, "-m", "verl.trainer.main_ppo"]
    argv += [f"{k}={v}" for k, v in verl_overrides(cfg, train_file).items()] + list(cfg.extra)
    env = {"VERL_FILE_LOGGER_PATH": str((Path(cfg.train.out) / "verl_metrics.jsonl").resolve())}
    return argv, env


def shell_line(argv: list[str], env: dict[str, str]) -> str:
    """The command as one shell line per override (what launch.sh holds and run_ppo prints)."""
    head = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, argv[:3])])
    return " \\\n    ".join([head, *map(shlex.quote, argv[3:])])


def prepare(cfg: PPOConfig) -> tuple[list[str], dict[str, str], dict]:
    """Check the config, write the data, config.yaml and launch.sh; return the command and data counts."""
    check(cfg)
    out = Path(cfg.train.out)
    train_file = out / "data" / "train.parquet"
    counts = write_verl_data(cfg, train_file)
    argv, env = verl_command(cfg, train_file)
    write_text(out / "config.yaml", yaml.safe_dump({"baseline": "ppo", **asdict(cfg)}, sort_keys=False))
    write_text(out / "launch.sh", "#!/usr/bin/env bash\n# written by dftune baseline ppo\nset -euo pipefail\n"
               + shell_line(argv, env) + "\n")
    return argv, env, counts


def collect(cfg: PPOConfig) -> Path:
    """Copy the last checkpoint's Hugging Face weights to train.out/final; verl's metrics to log.jsonl."""
    out = Path(cfg.train.out)
    ckpt = out / "checkpoints"
    marker = ckpt / "latest_checkpointed_iteration.txt"
    if not marker.is_file():
        raise ConfigError(f"{ckpt}: no finished verl checkpoint (latest_checkpointed_iteration.txt is missing)")
    step = marker.read_text().strip()
    hf = ckpt / f"global_step_{step}" / "actor" / "huggingface"
    if not any(hf.glob("*.safetensors")) and not any(hf.glob("*.bin")):
        raise ConfigError(f"{hf}: no weights (verl saves them only with checkpoint.save_contents including hf_model)")
    final = out / "final"
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(hf, tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    rows = []
    for r in read_jsonl(out / "verl_metrics.jsonl"):
        data = r.get("data", {})
        rows.append({"step": r.get("step"), **{k: v for k, v in data.items() if isinstance(v, (int, float))}})
    write_jsonl(out / "log.jsonl", rows)
    return final


def run_ppo(cfg: PPOConfig) -> Path:
    """Prepare, then (launch=true) run verl and collect the final model; returns train.out/final or launch.sh."""
    argv, env, counts = prepare(cfg)
    out = Path(cfg.train.out)
    print(f"{cfg.data}: {counts['questions']} questions, {counts['skipped_no_gold']} row(s) without a gold answer "
          f"skipped; verl data in {out / 'data' / 'train.parquet'}")
    print(shell_line(argv, env))
    if not cfg.launch:
        return out / "launch.sh"
    probe = subprocess.run([argv[0], "-c", "import verl"], capture_output=True, text=True)
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"verl is not importable by {argv[0]} ({why}); install verl>=0.7.1 with vLLM on a GPU "
                          f"machine (docs/design.md) and set python= to its interpreter, or run {out / 'launch.sh'} "
                          "there; launch=false only prepares")
    rc = subprocess.run(argv, env={**os.environ, **env}).returncode
    if rc:
        raise RuntimeError(f"verl exited with status {rc} (its output is above); run again to resume from the last "
                           f"checkpoint, or see {out / 'launch.sh'}")
    return collect(cfg)
