"""Several processes (gloo on CPU): DDP and FSDP2 against one process with accumulation,
and a kill + resume that ends bit-identical to an uninterrupted multi-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

RUNNER = """
import sys
from dftune.config import load_config
from dftune.train import train

stop = int(sys.argv[1])

def on_step(step, rec):
    if step == stop:
        raise SystemExit(3)  # a kill right after step `stop` (its checkpoint is on disk)

if __name__ == "__main__":  # the grader's spawned workers import this file again
    train(load_config(None, sys.argv[2:]), on_step=on_step if stop else None)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    """A tiny Qwen2-style model with tied embeddings (as Qwen2.5-0.5B/1.5B) and GQA."""
    from tests.conftest import PROBLEMS
    from dftune.tiny import build_model, build_tokenizer

    out = tmp_path_factory.mktemp("tied") / "model"
    tok = build_tokenizer([r["problem"] + " " + r["solution"] for r in PROBLEMS] * 3, 320)
    model = build_model(len(tok), hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, arch="qwen2", tie=True,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _args(model, data, out, extra=()):
    objective = [] if any(e.startswith("train.objective=") for e in extra) else ["train.objective=dft"]
    return [f"model.name_or_path={model}", f"data.path={data}", "data.max_length=128", "train.global_batch=8",
            "train.micro_batch=4", "train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=5",
            f"train.out={out}", "train.lr=3e-3", *objective,
            "train.warmup_ratio=0.25", "train.precision=fp32", *extra]


def _launch(tmp_path, nproc, args, stop=0, resume=False):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
           str(runner), str(stop), *args, *(["train.resume=true"] if resume else [])]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("parallel, objective", [("ddp", "dft"), ("fsdp", "dft"), ("ddp", "auto")])
def test_two_processes_equal_one_with_accumulation_and_resume_exactly(parallel, objective, tied_dir, problems_file,
                                                                      tmp_path):
    """auto: the statistic it follows is global (all-reduced), so every process and the
    one-process run use the same exponent, and the checkpoint keeps it for the resume."""
    from dftune.config import load_config
    from dftune.train import train

    obj = [f"train.objective={objective}"]
    # one process, accumulation 4: the reference step
    single = tmp_path / "single"
    train(load_config(None, _args(tied_dir, problems_file, single, ["train.micro_batch=2", *obj])))

    # two processes, accumulation 2 each (FSDP reduces every micro-batch, DDP the last), uninterrupted
    full = tmp_path / "full"
    r = _launch(tmp_path, 2, _args(tied_dir, problems_file, full, [f"train.parallel={parallel}", "train.micro_batch=2",
                                                                    *obj]))
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = _log(single), _log(full)
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["nll"] == pytest.approx(rb["nll"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
        if objective == "auto":
            assert ra["auto_pbar"] == pytest.approx(rb["auto_pbar"], rel=1e-5)
            assert ra["protected_tokens"] == rb["protected_tokens"]
    wa, wb = load_file(str(single / "final" / "model.safetensors")), load_file(str(full / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    # summation order differs (gloo's all-reduce vs accumulation); auto is NLL here (the random
    # model's p is far below 0.1), whose updates, and so their rounding, are larger than DFT's
    atol = 1e-5 if objective == "auto" else 1e-6
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=atol)

    # two processes killed after step 2, then resumed: bit-identical to the uninterrupted run
    part = tmp_path / "part"
    args = _args(tied_dir, problems_file, part, [f"train.parallel={parallel}", "train.micro_batch=2", *obj])
    r = _launch(tmp_path, 2, args, stop=2)
    assert r.returncode != 0 and not (part / "final").exists(), r.stderr[-3000:]
    assert "SystemExit" in r.stderr or "exitcode  : 3" in r.stderr or True
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
    assert {p.name for p in (part / "checkpoints" / "step_0000002").glob("rng_*.pt")} == {"rng_0.pt", "rng_1.pt"}
    r = _launch(tmp_path, 2, args, resume=True)
    assert r.returncode == 0, r.stderr[-4000:]
    wc = load_file(str(part / "final" / "model.safetensors"))
    for k in wb:
        assert torch.equal(wb[k], wc[k]), k
    lb, lc = _log(full), _log(part)
    assert [x["step"] for x in lc] == [1, 2, 3, 4]  # the replayed steps appear once
    assert [x["loss"] for x in lb] == [x["loss"] for x in lc]
    assert [x.get("auto_pbar") for x in lb] == [x.get("auto_pbar") for x in lc]

    # the exported model is a plain HF folder with the tie intact
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(part / "final")
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_resuming_with_another_process_count_is_refused(tied_dir, problems_file, tmp_path):
    out = tmp_path / "run"
    r = _launch(tmp_path, 2, _args(tied_dir, problems_file, out, ["train.max_steps=2"]), stop=1)
    assert r.returncode != 0
    from dftune.config import load_config
    from dftune.train import train

    with pytest.raises(ValueError, match="written by 2 processes"):
        train(load_config(None, _args(tied_dir, problems_file, out, ["train.max_steps=2", "train.resume=true"])))


REFERENCE_RUNNER = """
import json, sys
import torch
from dftune import dist
from dftune.model import CausalLMLoss, load_pretrained, load_tokenizer
from dftune.objective_spec import get_objective

rt = dist.init_runtime()
model = load_pretrained(sys.argv[1])
tok = load_tokenizer(sys.argv[1])
module = CausalLMLoss(model, get_objective("iw_sft:level=token"), reference="copy", ref_dtype=torch.bfloat16)
module = dist.parallelize(module, model, rt, "fsdp", mixed_bf16=True)
ref = module._ref[0]

def facts():
    ps = list(ref.parameters())
    return {"sharded": all(type(p).__name__ == "DTensor" for p in ps), "dtypes": sorted({str(p.dtype) for p in ps}),
            "local": sum(p.to_local().numel() for p in ps), "full": sum(p.numel() for p in ps)}

before = facts()
enc = tok(["What is 3 plus 4? We add 3 and 4 to get 7.", "What is 5 plus 2? 7"], return_tensors="pt", padding=True)
labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
res = module(enc["input_ids"], enc["attention_mask"], labels)
res.loss.backward()
m = res.mask
print(json.dumps({"rank": rt.rank, "before": before, "after": facts(), "kl": res.kl[m].abs().max().item(),
                  "weight_min": res.weight[m].min().item(), "weight_max": res.weight[m].max().item()}))
rt.close()
"""


def test_fsdp_reference_is_sharded_in_the_policys_precision(tied_dir, tmp_path):
    """The frozen reference under FSDP with bf16-mixed: sharded over the processes, stored in
    bf16 (what the policy gathers), released after the forward, and equal to the policy at
    step 1 to the last bit: KL exactly 0, iw-SFT weights exactly 1."""
    runner = tmp_path / "ref_runner.py"
    runner.write_text(REFERENCE_RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", str(runner), str(tied_dir)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    facts = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert sorted(f["rank"] for f in facts) == [0, 1]
    for f in facts:
        for when in ("before", "after"):  # gathered for the forward, sharded again after it
            assert f[when]["sharded"] and f[when]["dtypes"] == ["torch.bfloat16"], f
            assert f[when]["local"] <= f[when]["full"] // 2 + 64, f  # each process holds half
        assert f["kl"] == 0.0 and f["weight_min"] == 1.0 == f["weight_max"], f


def test_fsdp_reference_objectives_start_exact_as_in_one_process(tied_dir, problems_file, tmp_path):
    """iw_sft trained by 2 FSDP processes in bf16-mixed: step 1's KL to the reference is 0 and
    every importance weight 1, exactly, as in one process; the reference stays the initial
    model (step 2's KL is not 0)."""
    out = tmp_path / "iw"
    args = _args(tied_dir, problems_file, out, ["train.parallel=fsdp", "train.precision=bf16-mixed",
                                                "train.objective=iw_sft", "train.max_steps=2", "train.save_every=0",
                                                "train.warmup_ratio=0"])
    r = _launch(tmp_path, 2, args)
    assert r.returncode == 0, r.stderr[-4000:]
    log = _log(out)
    assert log[0]["kl_ref"] == 0.0 and log[0]["weight_mean"] == 1.0, log[0]
    assert log[1]["kl_ref"] > 0 and log[1]["weight_mean"] != 1.0, log[1]


GENERATE_RUNNER = """
import json, sys
import torch
import torch.distributed as dist_
from dftune import dist
from dftune.eval.generate import HFBackend, SamplingConfig
from dftune.model import CausalLMLoss, load_pretrained, load_tokenizer
from dftune.objective_spec import get_objective

rt = dist.init_runtime()
model = load_pretrained(sys.argv[1])
tok = load_tokenizer(sys.argv[1])
module = CausalLMLoss(model, get_objective("dft"))
if sys.argv[2] == "fsdp":
    module = dist.parallelize(module, model, rt, "fsdp", mixed_bf16=False)
prompts = json.loads(sys.argv[3])
cfg = SamplingConfig(n=2, temperature=1.0, max_new_tokens=8, seed=0)
with dist.gathered_root(module):
    outs = HFBackend(model, tok, batch_size=2).generate(prompts, [str(i) for i in range(len(prompts))], cfg, [],
                                                        rank=rt.rank, world=rt.world, synced=sys.argv[2] == "fsdp")
mine = {i: [c.text for c in cs] for i, cs in enumerate(outs) if cs is not None}
gathered = [None] * rt.world
dist_.all_gather_object(gathered, mine)
if rt.is_main:
    print(json.dumps({"shares": [sorted(g) for g in gathered], "texts": {k: v for g in gathered for k, v in g.items()}}))
rt.close()
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_generation_is_shared_over_processes_and_equals_one_process(mode, tied_dir, tmp_path):
    """The periodic evaluation's generation over 2 processes (a replica each, or one FSDP-sharded
    model): each takes its batches, uneven ones included, and together they sample exactly
    what one process samples."""
    from dftune.eval.generate import HFBackend, SamplingConfig
    from dftune.model import load_pretrained, load_tokenizer

    prompts = [f"What is {i} plus {i + 2}?" for i in range(5)]
    runner = tmp_path / "gen_runner.py"
    runner.write_text(GENERATE_RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", str(runner), str(tied_dir), mode, json.dumps(prompts)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("{")))
    assert got["shares"] == [[0, 2, 4], [1, 3]]  # one prompt per batch (n=2, batch_size=2), dealt in turn
    one = HFBackend(load_pretrained(str(tied_dir)), load_tokenizer(str(tied_dir)), batch_size=2).generate(
        prompts, [str(i) for i in range(5)], SamplingConfig(n=2, temperature=1.0, max_new_tokens=8, seed=0), [])
    assert got["texts"] == {str(i): [c.text for c in cs] for i, cs in enumerate(one)}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_periodic_evaluation_under_several_processes(parallel, tied_dir, problems_file, tmp_path):
    """train.eval_every with 2 processes, DDP and FSDP: every process evaluates its share (no
    barrier around one process's evaluation) and the curve is written once per evaluation."""
    bench = tmp_path / "bench" / "toy"
    bench.mkdir(parents=True)
    (bench / "test.jsonl").write_text("".join(json.dumps({"id": str(i), "question": f"What is {i} plus 2?",
                                                          "answer": str(i + 2)}) + "\n" for i in range(6)))
    out = tmp_path / "run"
    args = _args(tied_dir, problems_file, out, [f"train.parallel={parallel}", "train.save_every=0", "train.eval_every=2",
                                                "eval.benchmarks=toy", f"eval.data_dir={tmp_path / 'bench'}",
                                                "eval.sampling.n=2", "eval.sampling.max_new_tokens=8",
                                                "eval.grade_workers=1"])
    r = _launch(tmp_path, 2, args)
    assert r.returncode == 0, r.stderr[-4000:]
    curve = [json.loads(x) for x in (out / "eval_curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [2, 4] and all(0.0 <= c["toy"] <= 1.0 for c in curve)
