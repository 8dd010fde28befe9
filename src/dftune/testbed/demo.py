"""`dftune demo`: the capability continuum and DFT's failure modes on a CPU in minutes.

    dftune demo                      # the continuum: weak and strong prior, nll/dft/auto, about 1,040 s of CPU
    dftune demo offline              # the paper's offline-RL table in miniature (demo_offline.py)
    dftune demo --full               # firmer numbers: more seeds and problems

1. Task data (``tasks.py``): the demonstrations (a share with a wrong last step, as real
   SFT sets hold wrong solutions) and in/out-of-distribution test splits.
2. Two tiny bases pretrained on the same arithmetic (``bases.py``): ``weak`` in another
   surface form (plain-text notes, no box, never an EOS), ``strong`` in the demonstrations'
   own format. Cached on disk under a hash of their recipe.
3. The probe of each base on the demonstrations (what it predicts, before any training).
4. Fine-tuning of each base with every objective and seed (the one training loop), with
   periodic evaluation for learning curves at the priors in ``curve_priors``.
5. Evaluation of bases and fine-tuned models on every split (the harness, hf backend, the
   paper's prompt, several samples at temperature 1.0).
6. Token analysis (with the end-of-turn token's probability) per model, then the tables
   (``results.md``, ``tables.json``: accuracy with intervals, paired differences to NLL,
   how samples end, learning curves) and report.html.

Steps 2, 4-5 and 6 are jobs run ``workers`` at a time, in processes of one thread each.

Nothing is special-cased for the toy: every step is the code a real run uses.
"""

from __future__ import annotations

from pathlib import Path

from dftune.settings import ConfigError, Problems
from dftune.testbed.demo_config import DemoConfig, apply_full, apply_mode


def validate_demo(cfg: DemoConfig) -> None:
    """Every problem with the demo's settings, raised together before anything is pretrained
    or written (the mode's own checks included: priors, objective specs, splits)."""
    p = Problems()
    p.one_of("mode", cfg.mode, ("continuum", "offline"))
    p.at_least("seeds", cfg.seeds, 1)
    p.fraction("wrong_demos", cfg.wrong_demos)
    p.at_least("workers", cfg.workers, 0)
    for key in ("pretrain_steps", "pretrain_examples", "pretrain_batch", "finetune_examples", "finetune_steps",
                "finetune_batch", "eval_problems", "eval_n", "max_new_tokens", "eval_batch", "curve_every",
                "curve_problems", "curve_n", "hidden", "layers", "heads", "analysis_examples"):
        p.at_least(key, getattr(cfg, key), 1)
    for key in ("pretrain_lr", "finetune_lr"):
        p.positive(key, getattr(cfg, key))
    if cfg.mode == "offline":
        from dftune.testbed.demo_offline import _objectives
        from dftune.testbed.stages import splits_of

        checks = [lambda: _objectives(cfg), lambda: splits_of(cfg)]
    else:
        from dftune.testbed.continuum import _check

        checks = [lambda: _check(cfg)] if cfg.mode == "continuum" else []
    for check in checks:
        try:
            check()
        except ConfigError as e:
            p.append(str(e))
    p.raise_all()


def run_demo(cfg: DemoConfig) -> Path:
    """Run the demo ``cfg.mode`` asks for; return the report's path."""
    apply_mode(apply_full(cfg))
    validate_demo(cfg)
    if not cfg.out:
        cfg.out = "out/demo-offline" if cfg.mode == "offline" else "out/demo"
    if cfg.mode == "offline":
        from dftune.testbed.demo_offline import run_offline

        return run_offline(cfg)
    from dftune.testbed.continuum import run_continuum

    return run_continuum(cfg)
