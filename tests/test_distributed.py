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
    return [f"model.name_or_path={model}", f"data.path={data}", "data.max_length=128", "train.global_batch=8",
            "train.micro_batch=4", "train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=5",
            f"train.out={out}", "train.tensorboard=false", "train.lr=3e-3", "train.objective=dft",
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


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_accumulation_and_resume_exactly(parallel, tied_dir, problems_file, tmp_path):
    from dftune.config import load_config
    from dftune.train import train

    # one process, accumulation 2: the reference step
    single = tmp_path / "single"
    train(load_config(None, _args(tied_dir, problems_file, single)))

    # two processes, uninterrupted
    full = tmp_path / "full"
    r = _launch(tmp_path, 2, _args(tied_dir, problems_file, full, [f"train.parallel={parallel}"]))
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = _log(single), _log(full)
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["nll"] == pytest.approx(rb["nll"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    wa, wb = load_file(str(single / "final" / "model.safetensors")), load_file(str(full / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)

    # two processes killed after step 2, then resumed: bit-identical to the uninterrupted run
    part = tmp_path / "part"
    args = _args(tied_dir, problems_file, part, [f"train.parallel={parallel}"])
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
