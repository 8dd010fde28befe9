"""The one training loop. Objectives differ only in the per-token function.

    dftune train configs/tiny_cpu.yaml train.objective=dft
    torchrun --nproc_per_node 8 -m dftune.cli train configs/paper/qwen2.5-math-1.5b.yaml train.parallel=fsdp

Normalisation: every micro-batch's summed loss is divided by the number of valid target
tokens of the whole optimizer step, counted over all accumulation micro-batches and all
processes (not a mean of micro-batch means, which over-weights short sequences). DDP and
FSDP average gradients over processes, so each process divides by (global count / world).

Precision (``train.precision``): ``bf16-mixed`` keeps fp32 master weights and optimizer
state and computes in bf16 (autocast; FSDP gathers bf16 parameters and reduces fp32
gradients), the paper's setting and the default on GPUs; ``fp32``; ``bf16-pure`` stores
the weights in bf16 and loses updates smaller than bf16's resolution (0.02 + 5e-5 == 0.02),
offered only for memory-starved runs.

Resuming: the data order is a pure function of (seed, epoch, world size), so the data
position is the step number; a checkpoint holds weights, optimizer state and every
process's RNG state; the learning rate is a function of the step (no scheduler state).
"""

from __future__ import annotations

import math
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from dftune import dist
from dftune.config import Config, ConfigError, config_diff, save_config
from dftune.data import DataError, build_dataset, epoch_steps, step_batches
from dftune.errors import UserError
from dftune.eval.run import check_periodic_eval
from dftune.files import read_jsonl, write_json, write_text
from dftune.loss import normalize_gradients_
from dftune.model import (
    CausalLMLoss,
    load_model,
    load_tokenizer,
    reference_kind,
    resolve_precision,
    stored_dtype,
)
from dftune.schedule import objective_schedule


class NonFiniteError(UserError, RuntimeError):
    """The loss or gradient became NaN/inf: training stops before the bad update."""


class RunFolderError(UserError, ValueError):
    """The run folder holds another run, or a resume asks for different settings."""


# Settings a resumed run may change: they alter logging, saving or speed, not the run.
RESUMABLE_CHANGES = ("train.resume", "train.overwrite", "train.log_every", "train.tensorboard", "train.save_every",
                     "train.keep_checkpoints", "train.loss_backend", "train.chunk_size", "train.eval_every", "eval.",
                     "model.attn_implementation", "model.gradient_checkpointing", "data.cache", "data.workers")
RUN_FILES = ("config.yaml", "log.jsonl", "eval_curve.jsonl", "data_summary.json", "checkpoints", "final", "final.tmp", "tb")


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


class StepStats:
    """Sums over one optimizer step's valid tokens (every micro-batch, every process), kept
    on the device so that a step syncs with the host once."""

    FIELDS = ("objective", "nll", "prob", "entropy", "kl_ref", "weight", "tokens", "input_tokens")

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)

    def add(self, res, attention_mask: torch.Tensor) -> None:
        m = res.mask
        kl = res.kl[m].sum() if res.kl is not None else torch.zeros((), device=m.device)
        self.sums += torch.stack([res.objective_sum.double(), -res.logp[m].double().sum(), res.logp[m].double().exp().sum(),
                                  res.entropy[m].double().sum(), kl.double(), res.weight_sum.double(), m.sum().double(),
                                  attention_mask.sum().double()])

    def reduce(self, rt: dist.Runtime) -> dict[str, float]:
        return dict(zip(self.FIELDS, rt.all_sum(self.sums).tolist()))


class RunLog:
    """log.jsonl (every step; on resume, cut back to the checkpoint's step so replayed steps
    appear once), TensorBoard (optional), and a printed line every ``every`` steps."""

    def __init__(self, out: Path, tensorboard: bool, every: int, enabled: bool, start: int):
        self.enabled, self.every, self.tb, self.file = enabled, max(1, every), None, None
        if not enabled:
            return
        for name in ("log.jsonl", "eval_curve.jsonl"):
            path = out / name
            if path.exists():
                kept = [r for r in read_jsonl(path) if r.get("step", 0) <= start]
                write_text(path, "".join(_json_line(r) for r in kept))
        self.file = (out / "log.jsonl").open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"), purge_step=start + 1)
            except ImportError:
                print("tensorboard is not installed: logging to log.jsonl only")

    def write(self, rec: dict, bar) -> None:
        if not self.enabled:
            return
        self.file.write(_json_line(rec))
        self.file.flush()
        if self.tb:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", nll=f"{rec['nll']:.3f}", p=f"{rec['mean_prob']:.3f}")
        if rec["step"] % self.every == 0:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())
            (bar.write if bar is not None else print)(text)

    def close(self):
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def _json_line(rec: dict) -> str:
    import json

    return json.dumps(rec) + "\n"


def open_run_folder(cfg: Config, rt: dist.Runtime) -> Path | None:
    """Check the run folder before anything loads; return the checkpoint to resume from.

    A folder that holds a run is continued only with ``train.resume`` (and only with the
    same settings, up to RESUMABLE_CHANGES), or cleared with ``train.overwrite``.
    """
    import yaml

    t, out = cfg.train, Path(cfg.train.out_dir)
    present = [n for n in RUN_FILES if (out / n).exists()]
    rt.barrier()  # every process has looked before the main one changes anything
    if present and t.overwrite:
        if rt.is_main:
            for name in present:
                p = out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        rt.barrier()
        present = []
    if present and not t.resume:
        raise RunFolderError(f"{out} already holds a run ({', '.join(present)}); continue it with --resume "
                             f"(train.resume=true) or start again with --overwrite (train.overwrite=true)")
    if present and (out / "config.yaml").is_file():
        saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
        diff = [d for d in config_diff(saved, cfg) if not d[0].startswith(RESUMABLE_CHANGES)]
        if diff:
            lines = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in diff[:6])
            raise RunFolderError(f"cannot resume {out} with different settings ({lines}); use another "
                                 "train.out_dir, or --overwrite to start again")
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    rt.barrier()
    kept = dist.checkpoints(out)
    return kept[-1] if (t.resume and kept) else None


def train(cfg: Config, on_step=None) -> Path:
    """Run training as configured; return the folder of the final model.

    on_step(step, record) is called after each optimizer step (tests use it to stop a
    run part-way, as a kill would).
    """
    objective_schedule(cfg.train.objective_schedule or cfg.train.objective)  # a bad spec fails before anything loads
    rt = dist.init_runtime()
    try:
        return _train(cfg, rt, on_step)
    finally:
        rt.close()


def _train(cfg: Config, rt: dist.Runtime, on_step) -> Path:
    t = cfg.train
    schedule = objective_schedule(t.objective_schedule or t.objective)
    precision = resolve_precision(t.precision, rt.device)
    parallel = dist.resolve_parallel(t.parallel, rt.world)
    if parallel == "fsdp" and cfg.model.lora_r > 0:
        raise ConfigError("LoRA with FSDP is not supported (LoRA's trainable state is small): use train.parallel=ddp")
    if parallel == "fsdp" and t.eval_every:
        raise ConfigError("periodic evaluation (train.eval_every) needs the whole model in one process; with FSDP "
                         "evaluate saved checkpoints with dftune eval instead")
    if t.eval_every:
        check_periodic_eval(cfg.eval)
    out = Path(t.out_dir)
    resume_from = open_run_folder(cfg, rt)
    random.seed(t.seed)
    torch.manual_seed(t.seed)

    # data first: every row is validated before the model's weights are read
    tokenizer = load_tokenizer(cfg.model)
    examples, summary = build_dataset(cfg.data, tokenizer, seed=t.seed)
    if rt.is_main:
        print(f"data: {summary}")
        write_json(out / "data_summary.json", summary.__dict__)
    if len(examples) < t.global_batch:
        raise DataError(f"{len(examples)} usable examples is fewer than one global batch ({t.global_batch})")
    steps_per_epoch = len(examples) // t.global_batch
    total = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    warmup = int(t.warmup_ratio * total)

    save_dtype = stored_dtype(cfg.model)  # the final model is saved as the base was stored
    model = load_model(cfg.model, rt.device, dtype=torch.bfloat16 if precision == "bf16-pure" else torch.float32)
    classes = None
    if schedule.needs_classes:  # protect=...: which vocabulary ids are special / numbers / content
        from dftune.vocab import token_classes

        classes = token_classes(tokenizer, vocab_size=model.get_output_embeddings().weight.shape[0])
    module = CausalLMLoss(model, schedule.at(0.0), backend=t.loss_backend, chunk_size=t.chunk_size,
                          reference=reference_kind(schedule.needs_ref, cfg.model.lora_r > 0, t.log_kl),
                          token_class=classes,  # FSDP gathers bf16 copies: a bf16 reference is the same
                          ref_dtype=torch.bfloat16 if parallel == "fsdp" and precision == "bf16-mixed" else None)
    module.train()
    module = dist.parallelize(module, model, rt, parallel, mixed_bf16=precision == "bf16-mixed")
    # FSDP's MixedPrecisionPolicy computes in bf16 itself; elsewhere autocast does
    autocast = (torch.autocast(rt.device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" and parallel != "fsdp"
                else nullcontext())
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(_param_groups(module, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))

    start = 0
    if resume_from is not None:
        start = dist.load_checkpoint(rt, module, opt, resume_from)["step"]
        if rt.is_main:
            print(f"resumed from {resume_from} (step {start})")
        if start >= total and (out / "final" / "config.json").is_file():
            return out / "final"

    log = RunLog(out, t.tensorboard, t.log_every, rt.is_main, start)
    bar = None
    if rt.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc=f"train {schedule.spec}", unit="step", dynamic_ncols=True,
                   disable=None)  # None: no bar when output is not a terminal (CI logs)
    plan: dict[int, list] = {}
    t0, tokens_seen = time.perf_counter(), 0
    try:
        for step in range(start, total):
            epoch, index = divmod(step, steps_per_epoch)
            if epoch not in plan:
                plan = {epoch: epoch_steps(examples, t.global_batch, rt.world, t.micro_batch, t.seed, epoch, cfg.data)}
            # this process's micro-batches (padded, or packed rows with position_ids), and the
            # step's divisor: valid target tokens over every micro-batch and process
            micro, global_count = step_batches(examples, plan[epoch][index], rt.rank, tokenizer.pad_token_id)
            objective = schedule.at(step / total)
            dist.unwrap(module).objective = objective
            # entropy is a logged statistic only (one more pass over the logits): logging steps
            logs_entropy = step == start or (step + 1) % log.every == 0 or step + 1 == total
            dist.unwrap(module).entropy = logs_entropy

            # forward and backward, micro-batch by micro-batch; gradients sync on the last
            stats = StepStats(rt.device)
            for i, batch in enumerate(micro):
                batch = {k: v.to(rt.device) for k, v in batch.items()}
                with dist.grad_sync(module, i == len(micro) - 1):
                    with autocast:
                        res = module(**batch, num_items=global_count / rt.world)
                    res.loss.backward()
                stats.add(res, batch["attention_mask"])
            sums = stats.reduce(rt)

            # norm=weight: divide by the step's summed weights instead of its token count
            factor = 1.0
            if objective.normalize == "weights":
                factor = normalize_gradients_(params, sums["tokens"], sums["weight"])

            # clip, check, step
            grad_norm = dist.clip_grad_norm(params, t.grad_clip)
            if not (math.isfinite(sums["objective"]) and math.isfinite(grad_norm)):
                kept = dist.checkpoints(out)
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {step + 1} (loss sum {sums['objective']}, grad norm "
                    f"{grad_norm}); the update was not applied; last good checkpoint: {kept[-1] if kept else 'none'}")
            lr = t.lr * lr_at(step, total, warmup, t.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)

            # log, save, evaluate
            tokens_seen += int(sums["input_tokens"])
            n = max(sums["tokens"], 1.0)
            rec = {"step": step + 1, "epoch": step / steps_per_epoch, "loss": sums["objective"] / n,
                   "nll": sums["nll"] / n, "mean_prob": sums["prob"] / n,
                   "weight_mean": sums["weight"] / n, "grad_norm": grad_norm, "lr": lr, "tokens": int(sums["tokens"]),
                   "tokens_per_s": tokens_seen / (time.perf_counter() - t0)}
            if logs_entropy:
                rec["entropy"] = sums["entropy"] / n
            if factor != 1.0:
                rec["norm_factor"] = factor
            if not schedule.static:
                rec.update({f"schedule_{k}": v for k, v in schedule.values(step / total).items()})
            if module_reference(module) != "none":
                rec["kl_ref"] = sums["kl_ref"] / n
            if bar is not None:
                bar.update(1)
            log.write(rec, bar)
            if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < total:
                dist.save_checkpoint(rt, module, opt, out, step + 1, t.keep_checkpoints, {"objective": schedule.spec})
            if t.eval_every and (step + 1) % t.eval_every == 0:
                _periodic_eval(rt, cfg, module, tokenizer, step + 1, out, precision)
            if on_step is not None:
                on_step(step + 1, rec)
    finally:
        log.close()
        if bar is not None:
            bar.close()
    dist.save_checkpoint(rt, module, opt, out, total, t.keep_checkpoints, {"objective": schedule.spec})
    return _export(rt, module, tokenizer, out, save_dtype)


def module_reference(module) -> str:
    return dist.unwrap(module).reference


def _export(rt: dist.Runtime, module, tokenizer, out: Path, save_dtype: torch.dtype) -> Path:
    """save_pretrained (+ tokenizer) in the base checkpoint's dtype, so transformers and vLLM
    load it; gathered from FSDP shards; LoRA is merged (the adapter is kept beside it)."""
    final = out / "final"
    model = dist.unwrap(module).model
    lora = hasattr(model, "merge_and_unload")
    state = None if lora else dist.full_state_dict(rt, module)  # collective under FSDP
    if rt.is_main:
        tmp = out / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if lora:  # keep the adapter, ship a merged model
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload().to(save_dtype)
            state = None
        else:
            prefix = "model."
            state = {k[len(prefix):]: v.to(save_dtype) for k, v in state.items() if k.startswith(prefix)}
            for name in _tied_duplicates(model):  # gathered shards are separate copies: keep one, like save_pretrained
                state.pop(name, None)
        model.config.use_cache = True  # generation wants the KV cache; training turned it off
        model.save_pretrained(tmp, state_dict=state)
        model.config.dtype = save_dtype  # save_pretrained wrote the in-memory (fp32) dtype: say what is stored
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    rt.barrier()
    return final


def _tied_duplicates(model) -> list[str]:
    """Names of parameters that are the same tensor as an earlier one (tied embeddings)."""
    seen, dups = set(), []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            dups.append(name)
        seen.add(id(p))
    return dups


def _periodic_eval(rt: dist.Runtime, cfg: Config, module, tokenizer, step: int, out: Path, precision: str) -> None:
    """A short evaluation (subset, few samples) for learning curves; main process only."""
    if rt.is_main:
        from dftune.eval.run import quick_eval
        from dftune.files import append_jsonl

        model = dist.unwrap(module).model
        model.eval()
        amp = torch.autocast(rt.device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
        with amp:
            result = quick_eval(model, tokenizer, cfg.eval)
        model.train()
        append_jsonl(out / "eval_curve.jsonl", [{"step": step, **result}])
    rt.barrier()
