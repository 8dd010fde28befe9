"""A training run's folder: claimed before anything loads, continued only with the same
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
from dftune.errors import UserError
from dftune.settings import config_diff, save_config


class RunFolderError(UserError, ValueError):
    """The run folder holds another run, or a resume asks for different settings."""


# Settings a resumed run may change: they alter logging, saving or speed, not the run.
RESUMABLE_CHANGES = ("train.resume", "train.overwrite", "train.log_every", "train.tensorboard", "train.save_every",
                     "train.keep_checkpoints", "train.loss_backend", "train.chunk_size", "train.eval_every", "eval.",
                     "train.save_dtype",
                     "model.attn_implementation", "model.gradient_checkpointing", "data.cache", "data.workers")
RUN_FILES = ("config.yaml", "log.jsonl", "eval_curve.jsonl", "data_summary.json", "checkpoints", "final", "final.tmp", "tb")



def open_run_folder(cfg: Config, rt: dist.Runtime) -> Path | None:
    """Check the run folder before anything loads; return the checkpoint to resume from.

    A folder that holds a run is continued only with ``train.resume`` (and only with the
    same settings, up to RESUMABLE_CHANGES), or cleared with ``train.overwrite``.
    """
    import yaml

    t, out = cfg.train, Path(cfg.train.out)
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
                                 "train.out, or --overwrite to start again")
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    rt.barrier()
    kept = dist.checkpoints(out)
    return kept[-1] if (t.resume and kept) else None



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

