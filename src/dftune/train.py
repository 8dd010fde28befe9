"""The one training loop. Objectives differ only in the per-token function.

    dftune train configs/tiny_cpu.yaml train.objective=dft
    accelerate launch --num_processes 8 -m dftune.cli train configs/paper/qwen2.5-math-1.5b.yaml

Normalisation: every micro-batch's summed loss is divided by the number of valid target
tokens of the whole optimizer step, counted over all accumulation micro-batches and all
processes (not a mean of micro-batch means, which over-weights short sequences). DDP
averages gradients over processes, so each process scales its loss by the world size.

Resuming: the data order is a pure function of (seed, epoch), so the data position is
the step number; the checkpoint holds weights, optimizer, scheduler and every process's
RNG state (accelerate's save_state), written to a temporary folder and renamed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from dftune.config import Config, save_config
from dftune.data import build_dataset, collate, count_targets, plan_epoch
from dftune.model import CausalLMLoss, load_model, load_tokenizer, reference_kind
from dftune.objectives import get_objective


class NonFiniteError(RuntimeError):
    """The loss or gradient became NaN/inf: training stops before the bad update."""


def cosine_schedule(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # biases and norms: no decay
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Log:
    """JSONL (every step), TensorBoard (optional) and a printed line every ``every`` steps."""

    def __init__(self, out: Path, tensorboard: bool, every: int, enabled: bool):
        self.enabled, self.every, self.tb = enabled, max(1, every), None
        if not enabled:
            return
        self.file = (out / "log.jsonl").open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:
                print("tensorboard is not installed: logging to log.jsonl only")

    def write(self, rec: dict, bar) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", nll=f"{rec['nll']:.3f}", p=f"{rec['mean_prob']:.3f}")
        if rec["step"] % self.every == 0 or rec.get("final"):
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())
            (bar.write if bar is not None else print)(text)

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb:
                self.tb.close()


def _checkpoints(out: Path) -> list[Path]:
    return sorted((p for p in (out / "checkpoints").glob("step_*") if (p / "state.json").is_file()),
                  key=lambda p: int(p.name.split("_")[1]))


def _save_checkpoint(acc, out: Path, step: int, keep: int) -> None:
    final = out / "checkpoints" / f"step_{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    if acc.is_main_process:
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        if final.exists():  # the same step saved again (a finished run resumed)
            shutil.rmtree(final)
        tmp.rename(final)  # atomic: a checkpoint folder exists only once complete
        for old in _checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()


def train(cfg: Config, on_step=None) -> Path:
    """Run training as configured; return the folder of the final model.

    on_step(step, record) is called after each optimizer step (tests use it to stop a
    run part-way, as a kill would).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = cfg.train
    objective = get_objective(t.objective)  # bad names fail before anything loads
    # DeepSpeed runs the accumulation itself (and divides the loss by it): tell it the count
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    ds_accum = t.global_batch // (t.micro_batch * int(os.environ.get("WORLD_SIZE", "1"))) if deepspeed else 1
    acc = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=max(1, ds_accum))  # cpu: gloo DDP
    world, rank = acc.num_processes, acc.process_index
    out = Path(t.out_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    set_seed(t.seed)

    # data first: every row is validated before the model's weights are read
    tokenizer = load_tokenizer(cfg.model)
    examples, summary = build_dataset(cfg.data, tokenizer, seed=t.seed)
    if acc.is_main_process:
        print(f"data: {summary}")
        (out / "data_summary.json").write_text(json.dumps(summary.__dict__, indent=1))
    lengths = [len(e.input_ids) for e in examples]
    if len(examples) < t.global_batch:
        raise ValueError(f"{len(examples)} usable examples is fewer than one global batch ({t.global_batch})")
    steps_per_epoch = len(examples) // t.global_batch
    total = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    accum = t.global_batch // (t.micro_batch * world)

    model = load_model(cfg.model, acc.device)
    ref = reference_kind(objective, cfg.model.lora_r > 0, t.log_kl)
    wrapped = CausalLMLoss(model, objective, backend=t.loss_backend, chunk_size=t.chunk_size, reference=ref)
    opt = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))
    warmup = int(t.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_schedule(s, total, warmup, t.min_lr_ratio))
    wrapped.train()
    wrapped, opt = acc.prepare(wrapped, opt)
    acc.register_for_checkpointing(sched)  # not prepared: accelerate would step it once per process

    start = 0
    if t.resume and _checkpoints(out):
        last = _checkpoints(out)[-1]
        acc.load_state(str(last))
        start = json.loads((last / "state.json").read_text())["step"]
        if acc.is_main_process:
            print(f"resumed from {last} (step {start})")

    log = _Log(out, t.tensorboard, t.log_every, acc.is_main_process)
    bar = None
    if acc.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc=f"train {objective.name}", unit="step", dynamic_ncols=True,
                   disable=None)  # None: no bar when output is not a terminal (CI logs)
    plans: dict[int, list] = {}
    params = [p for p in wrapped.parameters() if p.requires_grad]
    t0, tokens_seen = time.perf_counter(), 0
    try:
        for step in range(start, total):
            epoch, index = divmod(step, steps_per_epoch)
            if epoch not in plans:
                plans = {epoch: plan_epoch(len(examples), t.global_batch, world, t.micro_batch, t.seed, epoch, lengths)}
            micro = [[examples[i] for i in mb] for mb in plans[epoch][index][rank]]
            count = torch.tensor([float(count_targets(sum(micro, [])))], device=acc.device)
            global_count = float(acc.reduce(count, reduction="sum").item())
            sums = torch.zeros(7, dtype=torch.float64, device=acc.device)
            for i, exs in enumerate(micro):
                batch = {k: v.to(acc.device) for k, v in collate(exs, tokenizer.pad_token_id).items()}
                sync = nullcontext() if i == len(micro) - 1 else acc.no_sync(wrapped)
                with sync:
                    res = wrapped(**batch, num_items=global_count)
                    acc.backward(res.loss * world * ds_accum)
                s = res.sums()
                sums += torch.tensor([s["objective"], s["nll"], s["prob"], s["entropy"], s.get("kl_ref", 0.0),
                                      s["tokens"], float(batch["attention_mask"].sum())], dtype=torch.float64, device=acc.device)
            sums = acc.reduce(sums, reduction="sum")
            grad_norm = acc.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
            grad_norm = float("nan") if grad_norm is None else float(grad_norm)  # None: DeepSpeed clips itself
            if not (math.isfinite(float(sums[0])) and (deepspeed or math.isfinite(grad_norm))):
                kept = _checkpoints(out)
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {step + 1} (loss sum {float(sums[0])}, grad norm {grad_norm}); "
                    f"the update was not applied; last good checkpoint: {kept[-1] if kept else 'none'}"
                )
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tokens_seen += int(sums[6])
            n = max(float(sums[5]), 1.0)
            rec = {
                "step": step + 1, "epoch": step / steps_per_epoch, "loss": float(sums[0]) / n, "nll": float(sums[1]) / n,
                "mean_prob": float(sums[2]) / n, "entropy": float(sums[3]) / n, "grad_norm": grad_norm, "lr": lr,
                "tokens": int(sums[5]), "tokens_per_s": tokens_seen / (time.perf_counter() - t0),
            }
            if ref != "none":
                rec["kl_ref"] = float(sums[4]) / n
            if bar is not None:
                bar.update(1)
            log.write(rec, bar)
            if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < total:
                _save_checkpoint(acc, out, step + 1, t.keep_checkpoints)
            if t.eval_every and (step + 1) % t.eval_every == 0:
                _periodic_eval(acc, cfg, model, tokenizer, step + 1, out)
            if on_step is not None:
                on_step(step + 1, rec)
    finally:
        log.close()
        if bar is not None:
            bar.close()
    _save_checkpoint(acc, out, total, t.keep_checkpoints)
    return _save_final(acc, wrapped, tokenizer, out)


def _save_final(acc, wrapped, tokenizer, out: Path) -> Path:
    """save_pretrained (+ tokenizer) so transformers and vLLM load it; LoRA is merged."""
    final = out / "final"
    model = acc.unwrap_model(wrapped).model
    state = acc.get_state_dict(wrapped)  # gathers FSDP/DeepSpeed shards on the main process
    if acc.is_main_process:
        tmp = out / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if hasattr(model, "merge_and_unload"):  # LoRA: keep the adapter, ship a merged model
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()
            model.save_pretrained(tmp)
        else:
            prefix = "model."
            model.save_pretrained(tmp, state_dict={k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    acc.wait_for_everyone()
    return final


def _periodic_eval(acc, cfg: Config, model, tokenizer, step: int, out: Path) -> None:
    """A short evaluation (subset, few samples) for learning curves; main process only."""
    if not acc.is_main_process:
        return
    from dftune.eval.run import quick_eval

    t = cfg.train
    model.eval()
    result = quick_eval(acc.unwrap_model(model), tokenizer, benchmarks=t.eval_benchmarks.split(","), limit=t.eval_limit,
                        n=t.eval_n, max_new_tokens=t.eval_max_new_tokens, data_dir=t.eval_data_dir or None, seed=t.seed)
    model.train()
    with (out / "eval_curve.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, **result}) + "\n")
