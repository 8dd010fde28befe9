"""The one training loop. Objectives differ only in the per-token function.

    dftune train configs/tiny_cpu.yaml train.objective=dft
    torchrun --nproc_per_node 8 -m dftune.cli train configs/paper/qwen2.5-math-1.5b.yaml train.parallel=fsdp

Normalisation: every micro-batch's summed loss is divided by the number of valid target
tokens of the whole optimizer step, counted over all accumulation micro-batches and all
processes (not a mean of micro-batch means, which over-weights short sequences). DDP and
FSDP average gradients over processes, so each process divides by (global count / world).

Shape (torchtitan's): ``setup`` builds every object once (precision, objective schedule,
data, model, optimizer); ``train_step`` is one optimizer step; ``_train`` is the loop that
calls it, then logs, saves and evaluates. Precision is decided once into a ``Precision``
(``dftune.precision``).

Resuming: the data order is a pure function of (seed, epoch, world size), so the data
position is the step number; a checkpoint holds weights, optimizer state and every
process's RNG state; the learning rate is a function of the step (no scheduler state).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dftune import dist
from dftune.batching import epoch_steps, step_batches
from dftune.config import Config, check_data, check_model, check_train
from dftune.data import build_dataset
from dftune.errors import Interrupted, UserError
from dftune.files import write_json
from dftune.loss import normalize_gradients_
from dftune.model import CausalLMLoss, load_model, load_tokenizer, reference_kind, stored_dtype
from dftune.precision import DTYPES, Precision
from dftune.records import DataError
from dftune.run_folder import check_run_folder, claim_run_folder, export_final, export_note
from dftune.run_log import RunLog
from dftune.schedule import Schedule, objective_schedule
from dftune.settings import ConfigError, Problems, to_dict
from dftune.step_stats import StepStats, data_stats, first_data_stats, gradient_record, protected_targets


class NonFiniteError(UserError, RuntimeError):
    """The loss or gradient became NaN/inf: training stops before the bad update."""


def lr_at(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier for 0-based ``step``: linear warm-up to 1, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _param_groups(module, weight_decay: float):
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # biases and norms: no decay
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Batches:
    """Step -> this process's micro-batches and the step's divisor. The data order is a pure
    function of (seed, epoch, world size), so a resumed run's step N gets step N's examples."""

    def __init__(self, cfg: Config, examples, rt: dist.Runtime, pad_id: int):
        self.cfg, self.examples, self.rt, self.pad_id = cfg, examples, rt, pad_id
        self.per_epoch = len(examples) // cfg.train.global_batch
        self.epoch, self.plan = -1, []

    def __call__(self, step: int):
        """(micro-batches, padded or packed rows with position_ids; valid target tokens over
        every micro-batch and process)."""
        t = self.cfg.train
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.plan = epoch_steps(self.examples, t.global_batch, self.rt.world, t.micro_batch, t.seed, epoch,
                                    self.cfg.data)
        return step_batches(self.examples, self.plan[index], self.rt.rank, self.pad_id)


@dataclass
class Setup:
    """Every object the loop needs, built once by ``setup``."""

    cfg: Config
    rt: dist.Runtime
    out: Path
    precision: Precision
    schedule: Schedule
    tokenizer: object
    batches: Batches
    total: int  # optimizer steps
    warmup: int
    module: torch.nn.Module  # CausalLMLoss, wrapped for DDP/FSDP
    params: list
    opt: torch.optim.Optimizer
    save_dtype: torch.dtype  # the final model's (train.save_dtype; auto: as the base was stored)
    start: int = 0  # the step a resumed run continues from
    classes: torch.Tensor | None = None  # (V,) token class per vocabulary id, when an objective needs them
    data_stats: dict | None = None  # the last step's statistics of the data (auto follows one; checkpointed)

    def state(self) -> dict:
        """What a checkpoint keeps beside the weights (JSON): the objective and the data's statistics."""
        return {"objective": self.schedule.spec, "data_stats": self.data_stats}


def setup(cfg: Config, rt: dist.Runtime, schedule: Schedule, resume_from: Path | None) -> Setup:
    """Precision from its setting, the data (every row validated before the model's weights
    are read), the run folder claimed, the model and the optimizer, and the checkpoint's
    state. ``cfg`` was validated and ``schedule`` parsed by ``validate``."""
    t = cfg.train
    parallel = dist.resolve_parallel(t.parallel, rt.world)
    precision = Precision.resolve(t.precision, rt.device, parallel)
    out = Path(t.out)
    random.seed(t.seed)
    torch.manual_seed(t.seed)

    tokenizer = load_tokenizer(cfg.model)
    examples, summary = build_dataset(cfg.data, tokenizer, seed=t.seed)
    if len(examples) < t.global_batch:
        raise DataError(f"{cfg.data.path}: {len(examples)} usable examples is fewer than one global batch "
                        f"(train.global_batch {t.global_batch})")
    claim_run_folder(cfg, rt)  # the data is good: the folder is this run's now, before the model loads
    if rt.is_main:
        print(f"data: {summary}")
        write_json(out / "data_summary.json", summary.__dict__)
    batches = Batches(cfg, examples, rt, tokenizer.pad_token_id)
    total = t.max_steps or max(1, math.ceil(t.epochs * batches.per_epoch))

    save_dtype = stored_dtype(cfg.model) if t.save_dtype == "auto" else DTYPES[t.save_dtype]
    model = load_model(cfg.model, rt.device, dtype=precision.weights)
    classes = None
    if schedule.needs_classes:  # protect=...: which vocabulary ids are special / numbers / content
        from dftune.vocab import token_classes

        classes = token_classes(tokenizer, vocab_size=model.get_output_embeddings().weight.shape[0])
    module = CausalLMLoss(model, schedule.at(0.0), backend=t.loss_backend, chunk_size=t.chunk_size,
                          reference=reference_kind(schedule.needs_ref, cfg.model.lora_r > 0, t.log_kl),
                          token_class=classes, ref_dtype=precision.reference)
    module.train()
    module = dist.parallelize(module, model, rt, parallel, mixed_bf16=precision.mixed)
    opt = torch.optim.AdamW(_param_groups(module, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))
    s = Setup(cfg, rt, out, precision, schedule, tokenizer, batches, total, int(t.warmup_ratio * total), module,
              [p for p in module.parameters() if p.requires_grad], opt, save_dtype, classes=classes)
    if resume_from is not None:
        state = dist.load_checkpoint(rt, module, opt, resume_from)
        s.start, s.data_stats = state["step"], state.get("data_stats")
        if rt.is_main:
            print(f"resumed from {resume_from} (step {s.start})")
    return s


def train_step(s: Setup, step: int, logs_entropy: bool) -> dict:
    """One optimizer step (0-based ``step``): forward and backward over the step's
    micro-batches, gradients synced on the last; then normalise, clip, check and update.
    Returns the step's log record."""
    t, rt, inner = s.cfg.train, s.rt, dist.unwrap(s.module)
    micro, global_count = s.batches(step)
    objective = s.schedule.at(step / s.total)
    follows = objective.with_data_prob is not None  # auto: the objective follows a statistic of the data
    if follows:
        if s.data_stats is None:  # the first step: its own batch, measured before the update
            s.data_stats = first_data_stats(rt, s.module, micro, s.precision.autocast, objective, s.classes)
        used = s.data_stats[objective.follows] if s.data_stats else 0.0
        objective = objective.with_data_prob(used)
    inner.objective = objective
    inner.entropy = logs_entropy  # a logged statistic only (one more pass over the logits)

    stats = StepStats(rt.device)
    for i, batch in enumerate(micro):
        batch = {k: v.to(rt.device) for k, v in batch.items()}
        with dist.grad_sync(s.module, i == len(micro) - 1):
            with s.precision.autocast():
                res = s.module(**batch, num_items=global_count / rt.world)
            res.loss.backward()
        stats.add(res, batch["attention_mask"], protected_targets(objective, s.classes, batch["labels"]))
    sums = stats.reduce(rt)
    s.data_stats = data_stats(sums) or s.data_stats

    # norm=weight: divide by the step's summed weights instead of its token count
    factor = normalize_gradients_(s.params, sums["tokens"], sums["weight"]) if objective.normalize == "weights" else 1.0
    grad_norm = dist.clip_grad_norm(s.params, t.grad_clip)
    if not (math.isfinite(sums["objective"]) and math.isfinite(grad_norm)):
        kept = dist.checkpoints(s.out)
        raise NonFiniteError(
            f"non-finite loss or gradient at step {step + 1} (loss sum {sums['objective']}, grad norm "
            f"{grad_norm}); the update was not applied; last good checkpoint: {kept[-1] if kept else 'none'}")
    lr = t.lr * lr_at(step, s.total, s.warmup, t.min_lr_ratio)
    for group in s.opt.param_groups:
        group["lr"] = lr
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)

    n = max(sums["tokens"], 1.0)
    rec = {"step": step + 1, "epoch": step / s.batches.per_epoch, "loss": sums["objective"] / n, "nll": sums["nll"] / n,
           "mean_prob": sums["prob"] / n, "weight_mean": sums["weight"] / n, "grad_norm": grad_norm, "lr": lr,
           "tokens": int(sums["tokens"]), "input_tokens": int(sums["input_tokens"])}
    if logs_entropy:
        rec["entropy"] = sums["entropy"] / n
    rec.update(gradient_record(sums, bool(objective.protected)))  # where the gradient went
    if follows:
        from dftune.objectives import auto_exponent

        rec.update(auto_pbar=used, auto_exponent=auto_exponent(used))
    if factor != 1.0:
        rec["norm_factor"] = factor
    if not s.schedule.static:
        rec.update({f"schedule_{k}": v for k, v in s.schedule.values(step / s.total).items()})
    if inner.reference != "none":
        rec["kl_ref"] = sums["kl_ref"] / n
    return rec


def launched_world() -> int:
    """Processes the launcher (torchrun, accelerate) announces in WORLD_SIZE; 1 without one."""
    import os

    raw = os.environ.get("WORLD_SIZE", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"WORLD_SIZE={raw!r} in the environment is not a positive integer")
    return int(raw)


def check_run(cfg: Config, p: Problems, world: int = 1) -> Schedule | None:
    """Every problem with a training run's settings (not its folder); the objective schedule,
    parsed once (None when it does not parse)."""
    t = cfg.train
    check_model(cfg.model, p)
    check_data(cfg.data, p)
    check_train(t, p, world)
    schedule = None
    try:
        schedule = objective_schedule(t.objective_schedule or t.objective)
    except UserError as e:
        p.append(f"train.{'objective_schedule' if t.objective_schedule else 'objective'}: {e}")
    if t.parallel == "fsdp":
        p.check(cfg.model.lora_r == 0, "model.lora_r: LoRA with FSDP is not supported (LoRA's trainable state is "
                                       "small): use train.parallel=ddp")
    if t.loss_backend.partition(":")[0] in ("cce", "liger"):  # what the installed library cannot do, found now
        from dftune import loss_gpu

        try:
            loss_gpu.check(t.loss_backend)
        except UserError as e:
            p.append(f"train.loss_backend: {e}")
    if t.eval_every:
        from dftune.eval.validate import check_eval

        check_eval(cfg.eval, p, "eval.", periodic=True)
    return schedule


def validate(cfg: Config) -> tuple[Schedule, Path | None]:
    """Every problem with a training run's settings and folder, found before anything is
    loaded or written and raised together; the objective schedule, parsed once; the
    checkpoint to resume from."""
    p = Problems()
    schedule = check_run(cfg, p, launched_world())
    resume_from = check_run_folder(cfg, p)
    p.raise_all()
    return schedule, resume_from


def train(cfg: Config, on_step=None) -> Path:
    """Run training as configured; return the folder of the final model.

    on_step(step, record) is called after each optimizer step (tests use it to stop a
    run part-way, as a kill would).
    """
    schedule, resume_from = validate(cfg)
    rt = dist.init_runtime()
    try:
        return _train(cfg, rt, schedule, resume_from, on_step)
    finally:
        rt.close()


def _train(cfg: Config, rt: dist.Runtime, schedule: Schedule, resume_from: Path | None, on_step) -> Path:
    t = cfg.train
    s = setup(cfg, rt, schedule, resume_from)
    if s.start >= s.total and (s.out / "final" / "config.json").is_file():
        return s.out / "final"  # finished already
    log = RunLog(s.out, t.report_to, t.log_every, rt.is_main, s.start, to_dict(cfg))
    bar = None
    if rt.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=s.total, initial=s.start, desc=f"train {s.schedule.spec}", unit="step", dynamic_ncols=True,
                   disable=None)  # None: no bar when output is not a terminal (CI logs)
    t0, tokens_seen, step = time.perf_counter(), 0, s.start
    try:
        for step in range(s.start, s.total):
            logs_entropy = step == s.start or (step + 1) % log.every == 0 or step + 1 == s.total
            rec = train_step(s, step, logs_entropy)
            tokens_seen += rec.pop("input_tokens")
            rec["tokens_per_s"] = tokens_seen / (time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
            log.write(rec, bar)
            if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < s.total:
                dist.save_checkpoint(rt, s.module, s.opt, s.out, step + 1, t.keep_checkpoints, s.state())
            if t.eval_every and (step + 1) % t.eval_every == 0:
                _periodic_eval(s, step + 1)
            if on_step is not None:
                on_step(step + 1, rec)
    except KeyboardInterrupt:
        kept = dist.checkpoints(s.out)
        raise Interrupted(f"training stopped at step {step}", resume=kept[-1] if kept else None) from None
    finally:
        log.close()
        if bar is not None:
            bar.close()
    dist.save_checkpoint(rt, s.module, s.opt, s.out, s.total, t.keep_checkpoints, s.state())
    final = export_final(rt, s.module, s.tokenizer, s.out, s.save_dtype)
    if rt.is_main:  # the export's dtype may not be the master weights': say so where the run ends
        print(export_note(final, s.save_dtype, t.save_dtype, s.precision.weights))
    return final


def _periodic_eval(s: Setup, step: int) -> None:
    """A short evaluation (subset, few samples) for learning curves. Every process generates
    and grades its share and the counts are summed (``quick_eval``), so no process sits in a
    barrier, which a long evaluation would time out; the main process writes the curve."""
    from dftune.eval.run import quick_eval
    from dftune.files import append_jsonl

    model = dist.unwrap(s.module).model
    model.eval()
    with dist.gathered_root(s.module), s.precision.eval_autocast():
        result = quick_eval(model, s.tokenizer, s.cfg.eval, s.rt, synced=s.precision.fsdp and s.rt.world > 1,
                            chat_template=s.cfg.data.chat_template, model_path=s.cfg.model.name_or_path)
    model.train()
    if s.rt.is_main:
        append_jsonl(s.out / "eval_curve.jsonl", [{"step": step, **result}])
