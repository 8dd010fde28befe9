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
   resolved config, the command (``launch.sh``) and the data are written to ``out_dir``;
4. runs it (``launch=true``; needs verl, vLLM and GPUs), then copies the last
   checkpoint's Hugging Face weights to ``out_dir/final`` and verl's metrics to
   ``out_dir/log.jsonl``, so ``dftune eval`` and ``dftune report`` take it like any run.

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

from dftune.files import read_jsonl, write_jsonl, write_text
from dftune.settings import ConfigError, load

# verl imports pkg:// paths as modules (on every Ray node, from its own dftune install)
REWARD_MODULE = "pkg://dftune.offline.verl_reward"


@dataclass
class PPOConfig:
    """A PPO run on verl (defaults: the paper's offline-RL table, PAPER.md, and verl's own).

    model: Hub id or local folder (actor, critic and reference start from it).
    data: a question dataset with gold answers (problem/solution, question/answer, or an answer field).
    select: all, first:N or random:N rows.  instruction_suffix: appended to every question.
    lr: the actor's learning rate (paper: 1e-6).  critic_lr: the critic's (verl's default 1e-5; the paper gives none).
    warmup_ratio: linear warm-up over this fraction of the steps, actor and critic (paper: 0.1).
    lr_scheduler: constant (verl's default, flat after the warm-up) or cosine.
    weight_decay, grad_clip: AdamW's weight decay and the max gradient norm (verl's defaults).
    global_batch: questions per PPO step, one response each (paper: 256).
    mini_batch: responses per optimizer update; global_batch / mini_batch updates per step.
    micro_batch: responses per forward pass on one GPU; the accumulation is
        mini_batch / (micro_batch x gpus_per_node x nodes), and must divide.
    ppo_epochs: passes over each step's responses.  clip_ratio: PPO's clip range.
    gamma, lam: GAE's discount and lambda (1.0, 1.0: verl's defaults for outcome rewards).
    kl_coef: KL(actor || reference) penalty in the reward; 0 turns it off (verl's default).
    epochs, max_steps: length (max_steps > 0 wins).
    max_prompt_length, max_completion_length: tokens; longer prompts are dropped by verl.
    temperature: rollout sampling temperature (top_p 1.0).
    gpus_per_node, nodes: the GPUs verl spreads over (Ray).
    rollout_tp: vLLM's tensor-parallel size for the rollout.
    gpu_memory_utilization: the fraction of GPU memory vLLM may take.
    gradient_checkpointing: recompute activations (actor and critic).
    grade_workers: verl reward workers, each calling our grader.
    save_every: checkpoint every N steps (verl saves only then; the last step always saves).
    seed: data order.  out_dir: the run folder (data, launch.sh, checkpoints, final, log.jsonl).
    python: the interpreter that has verl installed ("" : this one).
    launch: run verl now; false only writes the data, the config and launch.sh, and prints the command.
    extra: further verl overrides, key=value, appended last (they win), e.g. [trainer.logger=[console,wandb]].
    """

    model: str = ""
    data: str = ""
    select: str = "all"
    instruction_suffix: str = ""
    lr: float = 1e-6
    critic_lr: float = 1e-5
    warmup_ratio: float = 0.1
    lr_scheduler: str = "constant"
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    global_batch: int = 256
    mini_batch: int = 256
    micro_batch: int = 4
    ppo_epochs: int = 1
    clip_ratio: float = 0.2
    gamma: float = 1.0
    lam: float = 1.0
    kl_coef: float = 0.0
    epochs: int = 1
    max_steps: int = 0
    max_prompt_length: int = 1024
    max_completion_length: int = 2048
    temperature: float = 1.0
    gpus_per_node: int = 8
    nodes: int = 1
    rollout_tp: int = 1
    gpu_memory_utilization: float = 0.5
    gradient_checkpointing: bool = True
    grade_workers: int = 8
    save_every: int = 50
    seed: int = 0
    out_dir: str = "runs/ppo"
    python: str = ""
    launch: bool = True
    extra: list[str] = field(default_factory=list, metadata={"split": False})


def load_ppo_config(path: str | None, overrides: list[str]) -> PPOConfig:
    """YAML (optional) + key=value overrides, checked (dftune.config.load)."""
    return check_extra(load(PPOConfig, path, overrides))


def check_extra(cfg: PPOConfig) -> PPOConfig:
    if not all("=" in x for x in cfg.extra):
        raise ConfigError(f"ppo.extra: expected key=value strings, got {cfg.extra!r}")
    return cfg


def check(cfg: PPOConfig) -> int:
    """Validate the values verl would reject late (or silently misread); return the GPU count."""
    for name in ("global_batch", "mini_batch", "micro_batch", "ppo_epochs", "epochs", "gpus_per_node", "nodes",
                 "rollout_tp", "grade_workers", "save_every", "max_prompt_length", "max_completion_length"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"ppo.{name} must be >= 1; got {getattr(cfg, name)}")
    if not cfg.model or not cfg.data:
        raise ConfigError("ppo.model and ppo.data must be set")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ConfigError(f"ppo.warmup_ratio must be in [0, 1); got {cfg.warmup_ratio}")
    if cfg.lr_scheduler not in ("constant", "cosine"):
        raise ConfigError(f"ppo.lr_scheduler must be constant or cosine; got {cfg.lr_scheduler!r}")
    world = cfg.gpus_per_node * cfg.nodes
    if cfg.global_batch % cfg.mini_batch:
        raise ConfigError(f"ppo.global_batch {cfg.global_batch} is not a multiple of mini_batch {cfg.mini_batch}")
    if cfg.mini_batch % (cfg.micro_batch * world):
        raise ConfigError(f"ppo.mini_batch {cfg.mini_batch} is not a multiple of micro_batch {cfg.micro_batch} x "
                          f"{world} GPU(s) (gpus_per_node {cfg.gpus_per_node} x nodes {cfg.nodes}) = "
                          f"{cfg.micro_batch * world}")
    if world % cfg.rollout_tp:
        raise ConfigError(f"ppo.rollout_tp {cfg.rollout_tp} does not divide the {world} GPU(s)")
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

    questions, skipped = load_questions(cfg.data, cfg.select, cfg.instruction_suffix, cfg.seed)
    if len(questions) < cfg.global_batch:
        raise ConfigError(f"{cfg.data}: {len(questions)} question(s) with a gold answer, fewer than one batch "
                          f"(global_batch {cfg.global_batch}); verl drops the incomplete last batch")
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
    out = Path(cfg.out_dir).resolve()
    o: dict = {
        "algorithm.adv_estimator": "gae",  # PPO: a learned critic, generalised advantage estimation
        "algorithm.gamma": cfg.gamma,
        "algorithm.lam": cfg.lam,
        "algorithm.use_kl_in_reward": cfg.kl_coef > 0,
        "algorithm.kl_ctrl.kl_coef": cfg.kl_coef,
        "data.train_files": str(train_file.resolve()),
        "data.val_files": str(train_file.resolve()),  # never evaluated (test_freq -1) but must load
        "data.prompt_key": "prompt",
        "data.train_batch_size": cfg.global_batch,
        "data.max_prompt_length": cfg.max_prompt_length,
        "data.max_response_length": cfg.max_completion_length,
        "data.filter_overlong_prompts": True,
        "data.truncation": "error",
        "data.seed": cfg.seed,
        "actor_rollout_ref.model.path": cfg.model,
        "actor_rollout_ref.model.enable_gradient_checkpointing": cfg.gradient_checkpointing,
        "actor_rollout_ref.actor.optim.lr": cfg.lr,
        "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio": cfg.warmup_ratio,
        "actor_rollout_ref.actor.optim.lr_scheduler_type": cfg.lr_scheduler,
        "actor_rollout_ref.actor.optim.weight_decay": cfg.weight_decay,
        "actor_rollout_ref.actor.optim.clip_grad": cfg.grad_clip,
        "actor_rollout_ref.actor.ppo_mini_batch_size": cfg.mini_batch,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": cfg.micro_batch,
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
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": cfg.micro_batch,
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": cfg.micro_batch,
        "critic.model.path": cfg.model,
        "critic.model.enable_gradient_checkpointing": cfg.gradient_checkpointing,
        "critic.optim.lr": cfg.critic_lr,
        "critic.optim.lr_warmup_steps_ratio": cfg.warmup_ratio,
        "critic.optim.lr_scheduler_type": cfg.lr_scheduler,
        "critic.optim.weight_decay": cfg.weight_decay,
        "critic.optim.clip_grad": cfg.grad_clip,
        "critic.ppo_micro_batch_size_per_gpu": cfg.micro_batch,
        "reward.custom_reward_function.path": REWARD_MODULE,
        "reward.custom_reward_function.name": "compute_score",
        "reward.num_workers": cfg.grade_workers,
        "trainer.n_gpus_per_node": cfg.gpus_per_node,
        "trainer.nnodes": cfg.nodes,
        "trainer.total_epochs": cfg.epochs,
        "trainer.default_local_dir": str(out / "checkpoints"),
        "trainer.project_name": "dftune",
        "trainer.experiment_name": out.name,
        "trainer.logger": "[console,file]",
        "trainer.save_freq": cfg.save_every,
        "trainer.test_freq": -1,
        "trainer.val_before_train": False,
        "trainer.resume_mode": "auto",
    }
    if cfg.max_steps > 0:
        o["trainer.total_training_steps"] = cfg.max_steps
    # lists are Hydra syntax already; everything else is quoted as Hydra needs
    return {k: v if isinstance(v, str) and v.startswith("[") else _hydra(v) for k, v in o.items()}


def verl_command(cfg: PPOConfig, train_file: Path) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) that launch verl's PPO trainer on ``train_file``."""
    argv = [cfg.python or sys.executable, "-m", "verl.trainer.main_ppo"]
    argv += [f"{k}={v}" for k, v in verl_overrides(cfg, train_file).items()] + list(cfg.extra)
    env = {"VERL_FILE_LOGGER_PATH": str((Path(cfg.out_dir) / "verl_metrics.jsonl").resolve())}
    return argv, env


def shell_line(argv: list[str], env: dict[str, str]) -> str:
    """The command as one shell line per override (what launch.sh holds and run_ppo prints)."""
    head = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, argv[:3])])
    return " \\\n    ".join([head, *map(shlex.quote, argv[3:])])


def prepare(cfg: PPOConfig) -> tuple[list[str], dict[str, str], dict]:
    """Check the config, write the data, config.yaml and launch.sh; return the command and data counts."""
    check(cfg)
    out = Path(cfg.out_dir)
    train_file = out / "data" / "train.parquet"
    counts = write_verl_data(cfg, train_file)
    argv, env = verl_command(cfg, train_file)
    write_text(out / "config.yaml", yaml.safe_dump({"baseline": "ppo", **asdict(cfg)}, sort_keys=False))
    write_text(out / "launch.sh", "#!/usr/bin/env bash\n# written by dftune baseline ppo\nset -euo pipefail\n"
               + shell_line(argv, env) + "\n")
    return argv, env, counts


def collect(cfg: PPOConfig) -> Path:
    """Copy the last checkpoint's Hugging Face weights to out_dir/final; verl's metrics to log.jsonl."""
    out = Path(cfg.out_dir)
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
    """Prepare, then (launch=true) run verl and collect the final model; returns out_dir/final or launch.sh."""
    argv, env, counts = prepare(cfg)
    out = Path(cfg.out_dir)
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
