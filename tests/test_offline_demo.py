"""The offline demo's wiring: GRPO's documented schedule, the learning-rate budgets as the
optimizers applied them, and the held-out measurements (first error, movement, log-prob changes)."""

import math
from pathlib import Path

import numpy as np
import pytest

from dftune.files import read_json, read_jsonl
from dftune.testbed import offline_analysis as oa
from tests.conftest import write_jsonl

GOLD = "Ava starts with 7 pens.\n7 + 5 = 12.\n12 - 3 = 9.\nThe answer is \\boxed{9}."


@pytest.mark.parametrize("completion, where", [
    ("Ava starts with 7 cards.\n7 + 5 = 12.\n12 - 3 = 9.\nThe answer is \\boxed{9}.", None),  # items may differ
    ("Ava starts with 7 pens.\n7 + 5 = 13.\n13 - 3 = 10.\nThe answer is \\boxed{10}.", "3.\n13 -"),  # 12 -> 13
    ("Ava starts with 7 pens.\n7 + 4 = 11.\n11 - 2 = 9.\nThe answer is \\boxed{9}.", "4 = 11"),  # lucky
    ("Ava starts with 7 pens.\n7 + 5 = 12.", "end"),  # stops short of the derivation
    ("Ava starts with 7 pens.\n7 + 5 = 12.\n12 - 3 = 9.\nThe answer is \\boxed{9}. 5", "5"),  # a digit too many
])
def test_first_error_is_the_first_digit_off_the_gold_derivation(completion, where):
    got = oa.first_error(completion, GOLD)
    if where is None:
        assert got is None
    elif where == "end":
        assert got == len(completion)
    else:
        assert got == completion.rindex(where) if where == "5" else got == completion.index(where)


@pytest.fixture(scope="module")
def trl_runs(tiny_dir, tmp_path_factory):
    """Three-step DPO (cosine) and GRPO (the demo's constant schedule) runs on TRL, and a
    three-step dftune train run, each with a one-step warm-up."""
    pytest.importorskip("trl")
    from dftune.config import Config, DataConfig, ModelConfig, TrainConfig
    from dftune.offline.baselines import BaselineConfig, baseline_training, run_dpo, run_grpo
    from dftune.train import train

    root = tmp_path_factory.mktemp("budget")
    qa = write_jsonl(root / "qa.jsonl", [{"question": f"What is {a} plus 2?", "answer": f"#### {a + 2}"} for a in range(4)])
    pairs = write_jsonl(root / "dpo.jsonl", [{"prompt": f"What is {a} plus 2?", "chosen": f"\\boxed{{{a + 2}}}",
                                              "rejected": "\\boxed{0}"} for a in range(8)])
    def training(batch: int, out: str):
        return baseline_training(lr=1e-3, max_steps=3, warmup_ratio=0.3, log_every=1, global_batch=batch,
                                 micro_batch=batch, out=str(root / out))

    dpo = run_dpo(BaselineConfig(model=str(tiny_dir), data=str(pairs), train=training(2, "dpo")))
    grpo = run_grpo(BaselineConfig(model=str(tiny_dir), data=str(qa), train=training(4, "grpo"), num_generations=2,
                                   beta=0.0, max_completion_length=8, lr_scheduler="constant"))
    rft = write_jsonl(root / "rft.jsonl", [{"prompt": f"What is {a} plus 2?", "completion": f"\\boxed{{{a + 2}}}"}
                                           for a in range(8)])
    train(Config(model=ModelConfig(name_or_path=str(tiny_dir)), data=DataConfig(path=str(rft)),
                 train=TrainConfig(objective="nll", lr=1e-3, global_batch=2, micro_batch=2, max_steps=3,
                                   warmup_ratio=0.34, out=str(root / "rft"))))
    return root, dpo, grpo


def test_trl_runs_record_the_rate_each_step_applied(trl_runs):
    """budget.json holds the rate every optimizer step used: transformers' warm-up starts at
    0, then DPO decays by a cosine (1, 0.25 of the peak) while GRPO stays at the peak."""
    root, _, _ = trl_runs
    dpo, grpo = read_json(root / "dpo" / "budget.json"), read_json(root / "grpo" / "budget.json")
    assert dpo["lr"] == pytest.approx([0.0, 1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 2))])
    assert grpo["lr"] == pytest.approx([0.0, 1e-3, 1e-3])
    assert dpo["lr_sum"] == pytest.approx(sum(dpo["lr"])) and dpo["optimizer_steps"] == 3


def test_lr_budget_reads_each_runs_own_record(trl_runs):
    from dftune.testbed.demo_offline import lr_budget
    from dftune.train import lr_at

    root, _, _ = trl_runs
    assert lr_budget(root / "grpo") == {"optimizer_steps": 3, "lr_sum": pytest.approx(2e-3)}
    rft = lr_budget(root / "rft")  # dftune train: the rate of every step in log.jsonl
    assert rft == {"optimizer_steps": 3, "lr_sum": pytest.approx(sum(1e-3 * lr_at(s, 3, 1, 0.0) for s in range(3)))}
    assert len(read_jsonl(root / "rft" / "log.jsonl")) == 3


def test_the_demos_grpo_runs_a_constant_rate_and_dpo_a_cosine(tmp_path):
    """The demo's own configurations: GRPO constant after its warm-up (docs/design.md), DPO
    cosine, each passed to transformers as such."""
    pytest.importorskip("trl")
    from dftune.offline.baselines import _common_args
    from dftune.testbed.demo_config import DemoConfig
    from dftune.testbed.demo_offline import dpo_config, grpo_config

    cfg = DemoConfig(mode="offline")
    grpo = grpo_config(cfg, tmp_path, tmp_path / "base", tmp_path / "g", seed=0)
    dpo = dpo_config(cfg, tmp_path, tmp_path / "base", tmp_path / "d", seed=0)
    assert (grpo.lr_scheduler, grpo.train.warmup_ratio, grpo.train.lr) == ("constant", 0.1, cfg.offline.grpo_lr)
    assert _common_args(grpo)["lr_scheduler_type"] == "constant_with_warmup"
    assert _common_args(dpo)["lr_scheduler_type"] == "cosine"
    assert grpo.train.global_batch == cfg.offline.grpo_questions * cfg.offline.grpo_group == grpo.train.micro_batch


def test_measure_is_zero_against_itself_and_sees_a_changed_model(trl_runs, tiny_dir, tmp_path):
    """A model measured against itself moved nowhere; a trained one moved, and the per-sample
    changes add up from the per-token ones."""
    root, dpo, _ = trl_runs
    rows = [{"prompt": "What is 1 plus 2?", "completion": c, "kind": k, "error": e, "benchmark": "id", "id": "p"}
            for c, k, e in [("\\boxed{3}", "clean", None), ("\\boxed{4}", "wrong", 7), ("\\boxed{3}", "lucky", 7)]]
    out = oa.measure(tiny_dir, {"self": tiny_dir, "dpo": dpo}, rows)
    same = out["self"]
    assert same["weight_change"] == 0 and same["kl_per_token"] == pytest.approx(0, abs=1e-6)  # float32 sums
    assert same["dlogp_seq_wrong"] == pytest.approx(0, abs=1e-9) and same["dlogp_error_token"] == pytest.approx(0, abs=1e-9)
    moved = out["dpo"]
    assert moved["weight_change"] > 0 and moved["kl_per_token"] > 0
    assert moved["samples"] == {"clean": 1, "wrong": 1, "lucky": 1}
    from dftune.model import load_tokenizer

    n_wrong = len(load_tokenizer(str(tiny_dir))("\\boxed{4}", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert sum(b["tokens"] for b in moved["by_base_p"]["wrong"]) == n_wrong  # every wrong token in one bin
    hist = moved["hist_wrong"]
    assert sum(hist["base"]) == pytest.approx(1) and sum(hist["model"]) == pytest.approx(1)


def test_error_token_index_points_at_the_digit(tiny_dir):
    from dftune.model import load_tokenizer

    tok = load_tokenizer(str(tiny_dir))
    completion = "7 + 5 = 13."
    rows = [{"prompt": "q", "completion": completion, "kind": "wrong", "error": completion.index("13")}]
    exs, where = oa.examples(rows, tok)
    ids = tok(completion, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[where[0]]).strip().startswith("1")
    targets = [x for x in exs[0].labels if x != -100]
    assert targets == ids + [tok.eos_token_id] and np.all(np.asarray(targets[:-1]) == np.asarray(ids))


@pytest.mark.parametrize("objective", ["dft", "nll"])
def test_on_the_models_own_samples_dft_sharpens_and_nll_is_neutral(objective):
    """Why DFT-on-RFT moves the model more than RFT on the same samples (docs/testbed.md): the
    expected gradient over y ~ p of DFT's token loss (the project's, float64) is the gradient of
    -1/2 sum_y p_y^2 (a step raises the collision probability: sharpening); NLL's is zero, so
    on its own samples only the correctness filter moves it."""
    import torch

    from dftune.loss import token_loss

    torch.manual_seed(0)
    logits = torch.randn(1, 7, dtype=torch.float64)
    head = torch.eye(7, dtype=torch.float64)
    p = logits.softmax(-1)[0].detach()
    expected = torch.zeros(7, dtype=torch.float64)
    for y in range(7):  # E_{y ~ p}[grad of the loss of token y]
        z = logits.clone().requires_grad_(True)
        token_loss(z, head, torch.tensor([y]), objective, num_items=1).loss.backward()
        expected += p[y] * z.grad[0]
    z = logits.clone().requires_grad_(True)
    (-0.5 * (z.softmax(-1) ** 2).sum()).backward()
    want = z.grad[0] if objective == "dft" else torch.zeros(7, dtype=torch.float64)
    assert torch.allclose(expected, want, atol=1e-7)  # entries ~0.1


def test_held_out_rows_sort_the_bases_samples_into_clean_lucky_and_wrong(tmp_path):
    gold = "Ava starts with 7 pens.\n7 + 5 = 12.\nThe answer is \\boxed{12}."
    samples = [("Ava starts with 7 cards.\n7 + 5 = 12.\nThe answer is \\boxed{12}.", True),  # clean
               ("Ava starts with 7 pens.\n7 + 4 = 12.\nThe answer is \\boxed{12}.", True),  # lucky
               ("Ava starts with 7 pens.\n7 + 5 = 13.\nThe answer is \\boxed{13}.", False)]
    write_jsonl(tmp_path / "samples.jsonl", [{"benchmark": "id", "id": "p0", "sample": i, "completion": c, "correct": ok}
                                             for i, (c, ok) in enumerate(samples)])
    rows = oa.held_out_rows(tmp_path, {("id", "p0"): ("Ava has 7 pens. ...", gold)}, "\nBox it.")
    assert [r["kind"] for r in rows] == ["clean", "lucky", "wrong"]
    assert rows[0]["error"] is None and rows[2]["error"] == samples[2][0].index("3.\nThe")
    assert rows[1]["prompt"] == "Ava has 7 pens. ...\nBox it."
