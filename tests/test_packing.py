"""Packed rows (data.packing): exact against the same examples unpacked, in float64, on
Llama- and Qwen2-style models; the plan, the token count, multi-process runs and resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dftune.batching import (
    collate_packed,
    collate_rows,
    epoch_steps,
    pack,
    plan_epoch,
    plan_packed_epoch,
    step_batches,
)
from dftune.config import DataConfig, load_config
from dftune.data import build_dataset
from dftune.model import CausalLMLoss, PackingError, check_packing
from dftune.objective_spec import get_objective
from dftune.tiny import build_model, build_tokenizer
from dftune.train import train
from tests.conftest import PROBLEMS, write_jsonl
from tests.test_distributed import _args, _launch, tied_dir  # noqa: F401  (tied_dir: a fixture)

# lengths from ~30 to ~110 tokens, so rows hold different numbers of examples
ROWS = [{"problem": f"What is {a} plus {b}?", "solution": f"We add {a} and {b} to get {a + b}. " * (1 + (a * b) % 4)}
        for a in range(1, 9) for b in range(2, 6)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packing")
    tok = build_tokenizer([r["problem"] + " " + r["solution"] for r in ROWS + PROBLEMS] * 3, 320)
    data, _ = build_dataset(DataConfig(path=str(write_jsonl(folder / "rows.jsonl", ROWS)), cache=False), tok)
    return tok, data


def _model(tok, arch, impl):
    model = build_model(len(tok), hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, arch=arch,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=1).double()
    model.config._attn_implementation = impl
    return model


def _run(model, objective, batch, num_items):
    model.zero_grad(set_to_none=True)
    res = CausalLMLoss(model, get_objective(objective))(**batch, num_items=num_items)
    res.loss.backward()
    return res, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("objective", ["dft", "talr"])  # talr: a per-sequence statistic (the examples, not the rows)
def test_packed_batch_equals_the_same_examples_unpacked(setup, arch, impl, objective):
    tok, data = setup
    rows = pack(data.lengths[:12], 160)  # several examples per row, rows of unequal fill
    assert max(len(r) for r in rows) >= 3 and len(rows) >= 3
    order = [i for row in rows for i in row]
    packed = collate_packed(data, rows, tok.pad_token_id)
    padded = collate_rows(data, [[i] for i in order], tok.pad_token_id)
    count = int(data.targets[order].sum())
    model = _model(tok, arch, impl)
    rp, gp = _run(model, objective, packed, count)
    ru, gu = _run(model, objective, padded, count)
    # the same target tokens, in the same order (row-major over the examples), the same log-probs
    assert rp.num_tokens == ru.num_tokens == count
    torch.testing.assert_close(rp.logp[rp.mask], ru.logp[ru.mask], rtol=0, atol=1e-12)
    torch.testing.assert_close(rp.loss, ru.loss, rtol=1e-12, atol=0)
    tol = 1e-9 if impl == "sdpa" else 1e-6  # transformers' eager attention takes its softmax in fp32
    for name in gu:
        torch.testing.assert_close(gp[name], gu[name], rtol=tol, atol=tol * float(gu[name].abs().max()), msg=name)


def test_packed_rows_layout(setup):
    tok, data = setup
    rows = [[0, 1, 2], [3]]
    b = collate_packed(data, rows, tok.pad_token_id)
    lens = [int(data.lengths[i]) for i in (0, 1, 2)]
    pos, labels, ids = b["position_ids"][0], b["labels"][0], b["input_ids"][0]
    starts = np.cumsum([0] + lens[:-1])
    for s, n, i in zip(starts, lens, (0, 1, 2)):
        assert pos[s:s + n].tolist() == list(range(n))
        assert ids[s:s + n].tolist() == data[i].input_ids
        assert labels[s] == -100  # never predicted from the previous example's last token
        assert labels[s + 1:s + n].tolist() == data[i].labels[1:]
    n3 = int(data.lengths[3])
    assert b["attention_mask"][1].sum() == n3 and (b["labels"][1, n3:] == -100).all()
    assert b["position_ids"][1, n3:].tolist() == list(range(sum(lens) - n3))  # padding: a segment of its own
    empty = collate_packed(data, [], tok.pad_token_id)  # a process with no rows this micro-batch
    assert empty["input_ids"].shape == (1, 1) and (empty["labels"] == -100).all()


def test_pack_is_best_fit_decreasing_and_deterministic():
    lengths = [(i * 37) % 101 + 5 for i in range(200)]
    rows = pack(lengths, 128)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    assert rows == pack(lengths, 128)
    # best fit: no example could move to an earlier row that has room for it
    assert len(rows) <= -(-sum(lengths) // 128) + 2
    with pytest.raises(ValueError, match="does not fit"):
        pack([200], 128)


@pytest.mark.parametrize("world, micro", [(1, 4), (2, 2), (4, 1)])
def test_packed_plan_keeps_each_steps_examples_and_balances_processes(world, micro):
    lengths = [(i * 37) % 101 + 1 for i in range(100)]
    padded = plan_epoch(100, 16, 1, 16, 3, 0, lengths)
    packed = plan_packed_epoch(100, 16, world, micro, 3, 0, lengths, 128)
    one = plan_packed_epoch(100, 16, 1, 4, 3, 0, lengths, 128)
    assert len(packed) == len(padded) == 6
    for p, u, o in zip(packed, padded, one):
        examples = sorted(i for rank in p for mb in rank for row in mb for i in row)
        assert examples == sorted(sum(u[0], []))  # the same examples as without packing
        # the same rows whatever the number of processes: only their placement differs
        assert sorted(map(tuple, (row for rank in p for mb in rank for row in mb))) == \
            sorted(map(tuple, (row for rank in o for mb in rank for row in mb)))
        assert len({len(rank) for rank in p}) == 1  # every process runs the same number of micro-batches
        assert all(len(mb) <= micro for rank in p for mb in rank)
        assert all(sum(lengths[i] for i in row) <= 128 for rank in p for mb in rank for row in mb)


def test_step_count_is_exact_and_the_same_packed_or_not(setup):
    tok, data = setup
    cfg = DataConfig(max_length=256)
    for world in (1, 2):
        padded = epoch_steps(data, 8, world, 2, 0, 0, cfg)
        cfg.packing = True
        packed = epoch_steps(data, 8, world, 2, 0, 0, cfg)
        cfg.packing = False
        for sp, su in zip(packed, padded):
            bp, cp = step_batches(data, sp, 0, tok.pad_token_id)
            bu, cu = step_batches(data, su, 0, tok.pad_token_id)
            examples = [data[i] for rank in su.rows for mb in rank for row in mb for i in row]
            assert cp == cu == sum(sum(lab != -100 for lab in e.labels[1:]) for e in examples)
            if world == 1:  # all the step's tokens are here: the packed labels count the same targets
                assert sum(int((b["labels"][:, 1:] != -100).sum()) for b in bp) == cp
            assert all("position_ids" in b for b in bp) and not any("position_ids" in b for b in bu)


def test_attention_that_ignores_position_ids_is_refused(setup):
    """A user-registered attention gets no packed mask from transformers: it really attends
    across examples, so packing on it is refused rather than silently wrong."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("dftune_test_plain", sdpa_attention_forward)
    tok, data = setup
    model = _model(tok, "llama", "dftune_test_plain")
    b = collate_packed(data, [[0, 1]], tok.pad_token_id)
    n0 = int(data.lengths[0])
    alone = collate_rows(data, [[1]], tok.pad_token_id)
    with torch.no_grad():
        leaky = model.model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).last_hidden_state
        right = model.model(input_ids=alone["input_ids"], use_cache=False).last_hidden_state
    assert (leaky[0, n0:] - right[0]).abs().max() > 1e-3  # the second example saw the first
    with pytest.raises(PackingError, match="dftune_test_plain"):
        CausalLMLoss(model, get_objective("dft"))(**b)
    assert check_packing(_model(tok, "qwen2", "sdpa")) == "sdpa"


def test_decoder_with_its_own_mask_is_refused(setup):
    """Remote code that builds a causal mask from attention_mask alone ignores the restarts."""
    from transformers import LlamaModel

    class OwnMask(LlamaModel):
        def forward(self, input_ids=None, position_ids=None, **kw):
            kw.pop("attention_mask", None)
            return super().forward(input_ids=input_ids, position_ids=position_ids,
                                   attention_mask=torch.ones_like(input_ids), **kw)

    tok, _ = setup
    model = _model(tok, "llama", "sdpa")
    own = OwnMask(model.config).double()
    own.load_state_dict(model.model.state_dict())
    model.model = own
    with pytest.raises(PackingError, match="builds its own attention mask"):
        check_packing(model)


def _cfg(tiny_dir, data, out, **extra):
    overrides = [f"model.name_or_path={tiny_dir}", f"data.path={data}", "data.max_length=128", "data.packing=true",
                 "train.global_batch=8", "train.micro_batch=2", "train.max_steps=5", "train.save_every=1",
                 f"train.out={out}", "train.lr=3e-3", "train.warmup_ratio=0.25",
                 "train.precision=fp32", *[f"{k}={v}" for k, v in extra.items()]]
    return load_config(None, overrides)


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_packed_training_matches_unpacked_and_resumes_bit_identically(tiny_dir, problems_file, tmp_path):
    full = train(_cfg(tiny_dir, problems_file, tmp_path / "a"))
    unpacked = _log(train(_cfg(tiny_dir, problems_file, tmp_path / "u", **{"data.packing": "false"})).parent)
    la = _log(tmp_path / "a")
    for rp, ru in zip(la, unpacked):  # the same examples and divisor each step: the same run up to rounding
        assert rp["tokens"] == ru["tokens"]
        assert rp["loss"] == pytest.approx(ru["loss"], rel=1e-5)
        assert rp["grad_norm"] == pytest.approx(ru["grad_norm"], rel=1e-4)

    class Killed(Exception):
        pass

    def kill_after_3(step, rec):
        if step == 3:
            raise Killed

    cfg = _cfg(tiny_dir, problems_file, tmp_path / "b")
    with pytest.raises(Killed):
        train(cfg, on_step=kill_after_3)
    cfg.train.resume = True
    resumed = train(cfg)
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert [r["loss"] for r in la] == [r["loss"] for r in _log(tmp_path / "b")]


@pytest.mark.parametrize("parallel, max_length", [("ddp", 128), ("fsdp", 1024)])
def test_packed_two_processes_equal_one(parallel, max_length, tied_dir, problems_file, tmp_path):  # noqa: F811
    """2 processes with packing = 1 process with packing and accumulation. At max_length
    1024 a step's 8 examples fill one row: the second process runs the empty micro-batch."""
    extra = [f"data.max_length={max_length}", "data.packing=true"]
    single = tmp_path / "single"
    train(load_config(None, _args(tied_dir, problems_file, single, extra)))
    full = tmp_path / "full"
    args = _args(tied_dir, problems_file, full, [*extra, f"train.parallel={parallel}"])
    r = _launch(tmp_path, 2, args)
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = _log(single), _log(full)
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    wa, wb = load_file(str(single / "final" / "model.safetensors")), load_file(str(full / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    if parallel == "ddp":  # killed after step 2 and resumed: bit-identical to the uninterrupted run
        part = tmp_path / "part"
        args = _args(tied_dir, problems_file, part, [*extra, f"train.parallel={parallel}"])
        assert _launch(tmp_path, 2, args, stop=2).returncode != 0
        r = _launch(tmp_path, 2, args, resume=True)
        assert r.returncode == 0, r.stderr[-4000:]
        wc = load_file(str(part / "final" / "model.safetensors"))
        for k in wb:
            assert torch.equal(wb[k], wc[k]), k
        assert [x["loss"] for x in b] == [x["loss"] for x in _log(part)]
