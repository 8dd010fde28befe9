"""A training run's folder: checked (by reading only) with the rest of the settings, claimed
once every check has passed, continued only from a complete checkpoint with the same
settings, and the final model written into it atomically.

    runs/dft/config.yaml         the resolved settings (what the run used)
    runs/dft/log.jsonl           one record per optimizer step
    runs/dft/checkpoints/step_*  weights, optimizer and RNG state (dftune.dist)
    runs/dft/final/              the model, loadable by transformers and vLLM
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dftune import dist
from dftune.config import Config
from dftune.settings import Problems, config_diff, save_config

# Settings a resumed run may change: they alter logging, saving or speed, not the run.
RESUMABLE_CHANGES = ("train.resume", "train.overwrite", "train.log_every", "train.report_to", "train.save_every",
                     "train.keep_checkpoints", "train.loss_backend", "train.chunk_size", "train.eval_every", "eval.",
                     "train.save_dtype",
                     "model.attn_implementation", "model.gradient_checkpointing", "data.cache", "data.workers")
RUN_FILES = ("config.yaml", "log.jsonl", "eval_curve.jsonl", "data_summary.json", "checkpoints", "final", "final.tmp", "tb",
             "wandb", "wandb_id", "mlflow_run_id")


def progress(out: Path) -> list[str]:
    """What a run that got going leaves in ``out``: logged steps, checkpoints, a final model.
    A start that failed before its first step leaves none of these (at most config.yaml and
    data_summary.json), and does not block the next start."""
    found = []
    log = out / "log.jsonl"
    if log.is_file() and log.stat().st_size:
        found.append("log.jsonl")
    if any((out / "checkpoints").glob("step_*")):
        found.append("checkpoints")
    if (out / "final").is_dir():
        found.append("final")
    return found


def _last_logged_step(out: Path) -> int:
    from dftune.files import read_jsonl

    rows = read_jsonl(out / "log.jsonl") if (out / "log.jsonl").is_file() else []
    return max((r.get("step", 0) for r in rows), default=0)


def check_run_folder(cfg: Config, p: Problems) -> Path | None:
    """The run folder's problems, found by reading only; returns the checkpoint to resume.

    A folder that holds a run is continued only with ``train.resume`` (from a complete
    checkpoint, with the same settings up to RESUMABLE_CHANGES), or replaced with
    ``train.overwrite`` (when the run is claimed, not now: a failed check deletes nothing).
    """
    import yaml

    t, out = cfg.train, Path(cfg.train.out)
    if not t.out:
        return None
    if out.exists() and not out.is_dir():
        p.append(f"train.out: {out} is a file, not a run folder")
        return None
    started = progress(out)
    if t.overwrite:
        return None
    if not t.resume:
        p.check(not started, f"train.out: {out} already holds a run ({', '.join(started)}); continue it with "
                             "--resume (train.resume=true) or start again with --overwrite (train.overwrite=true)")
        return None
    kept = dist.checkpoints(out)
    if not kept:
        if not started:
            p.append(f"train.resume: {out} holds no run to resume; start it without --resume")
        elif "final" in started:
            p.append(f"train.resume: {out} holds a finished run (its model: {out / 'final'}) and no checkpoint; "
                     "use another train.out, or --overwrite to train it again")
        else:
            p.append(f"train.resume: {out} holds a run that saved no complete checkpoint (log.jsonl reaches step "
                     f"{_last_logged_step(out)}; train.save_every=0 saves only at the end); start it again with "
                     "--overwrite")
        return None
    saved = yaml.safe_load((out / "config.yaml").read_text()) if (out / "config.yaml").is_file() else None
    diff = [d for d in config_diff(saved or {}, cfg) if not d[0].startswith(RESUMABLE_CHANGES)] if saved else []
    if diff:
        lines = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in diff[:6])
        p.append(f"train.resume: cannot resume {out} with different settings ({lines}); use another train.out, "
                 "or --overwrite to start again")
    return kept[-1]


def claim_run_folder(cfg: Config, rt: dist.Runtime) -> None:
    """Make ``train.out`` this run's, once every check has passed: the old run's files go
    (--overwrite, or what a failed start left), then config.yaml, what the run uses."""
    out = Path(cfg.train.out)
    if rt.is_main:
        if cfg.train.overwrite or not progress(out):
            for name in RUN_FILES:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    rt.barrier()


def export_note(final: Path, save_dtype: torch.dtype, setting: str, master: torch.dtype) -> str:
    """The line that tells the user what dtype the final model was written in, and why."""
    name = str(save_dtype).removeprefix("torch.")
    if setting != "auto":
        return f"final model: {final}, written in {name} (train.save_dtype={setting})"
    if save_dtype == master:
        return f"final model: {final}, written in {name}, the base checkpoint's stored dtype (as trained)"
    return (f"final model: {final}, written in {name}, the base checkpoint's stored dtype; training kept "
            f"{str(master).removeprefix('torch.')} master weights (train.save_dtype=fp32 writes them as trained)")


def export_final(rt: dist.Runtime, module, tokenizer, out: Path, save_dtype: torch.dtype) -> Path:
    """save_pretrained (+ tokenizer) in ``save_dtype`` (``train.save_dtype``: by default the base
    checkpoint's), so transformers and vLLM load it; gathered from FSDP shards; LoRA is merged
    (the adapter is kept beside it)."""
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

