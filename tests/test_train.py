"""The training loop on tiny real models, offline."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dftune.batching import collate
from dftune.config import Config, DataConfig, ModelConfig, TrainConfig
from dftune.data import build_dataset
from dftune.interop import compute_loss_func
from dftune.model import CausalLMLoss
from dftune.objective_spec import get_objective
from dftune.settings import load
from dftune.train import NonFiniteError, train

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tiny_dir, data, out, **train_kw):
    t = dict(objective="dft", lr=3e-3, global_batch=8, micro_batch=4, max_steps=4, out=str(out),
             warmup_ratio=0.25)
    t.update(train_kw)
    return Config(model=ModelConfig(name_or_path=str(tiny_dir)), data=DataConfig(path=str(data), max_length=128),
                  train=TrainConfig(**t))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def test_loss_decreases_on_real_math_data(tiny_dir, shared_data, tmp_path):
    cfg = _cfg(tiny_dir, shared_data / "train" / "gsm8k_train.jsonl", tmp_path / "run", objective="nll", max_steps=12,
               lr=3e-3, global_batch=8, micro_batch=8)
    cfg.data.select = "first:96"
    cfg.data.max_length = 768
    final = train(cfg)
    log = _log(tmp_path / "run")
    assert len(log) == 12
    assert log[-1]["nll"] < log[0]["nll"] - 0.5
    for key in ("loss", "nll", "mean_prob", "entropy", "grad_norm", "lr", "tokens_per_s"):
        assert key in log[0]
    # entropy (a statistic, one more pass over the logits) on the first, printed and last steps only
    every = cfg.train.log_every
    assert [r["step"] for r in log if "entropy" in r] == sorted({1, 12} | {s for s in range(1, 13) if s % every == 0})
    vocab = AutoModelForCausalLM.from_pretrained(final).config.vocab_size
    assert all(0 < r["entropy"] < math.log(vocab) for r in log if "entropy" in r)
    # the final model loads back with transformers and the saved config is the resolved one
    AutoModelForCausalLM.from_pretrained(final)
    AutoTokenizer.from_pretrained(final)
    assert "objective: nll" in (tmp_path / "run" / "config.yaml").read_text()
    assert json.loads((tmp_path / "run" / "data_summary.json").read_text())["kept"] == 96


def test_kill_and_resume_ends_with_the_same_weights(tiny_dir, problems_file, tmp_path):
    full = train(_cfg(tiny_dir, problems_file, tmp_path / "a", max_steps=5, save_every=1))

    class Killed(Exception):
        pass

    def kill_after_3(step, rec):
        if step == 3:
            raise Killed

    cfg = _cfg(tiny_dir, problems_file, tmp_path / "b", max_steps=5, save_every=1)
    with pytest.raises(Killed):
        train(cfg, on_step=kill_after_3)
    assert not (tmp_path / "b" / "final").exists()
    cfg.train.resume = True
    resumed = train(cfg)
    wa, wb = _weights(full), _weights(resumed)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la, lb = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_ddp_two_processes_equal_one_process_with_accumulation(tiny_dir, problems_file, tmp_path):
    """2 gloo processes x micro 4 and 1 process x accumulation 2 see the same step."""
    script = tmp_path / "cfg.yaml"
    outs = {}
    for name, nproc in (("single", 1), ("ddp", 2)):
        out = tmp_path / name
        args = [f"model.name_or_path={tiny_dir}", f"data.path={problems_file}", "data.max_length=128",
                "train.global_batch=8", "train.micro_batch=4", "train.max_steps=2", f"train.out={out}", "train.lr=3e-3", "train.objective=dft"]
        script.write_text("{}\n")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
               "-m", "dftune.cli", "train", str(script), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = out
    a, b = _log(outs["single"]), _log(outs["ddp"])
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["nll"] == pytest.approx(rb["nll"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    wa, wb = _weights(outs["single"] / "final"), _weights(outs["ddp"] / "final")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_non_finite_loss_stops_before_the_update(tiny_dir, problems_file, tmp_path):
    bad = tmp_path / "bad_model"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("inf")
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(bad)
    with pytest.raises(NonFiniteError, match="non-finite loss or gradient at step 1"):
        train(_cfg(bad, problems_file, tmp_path / "run"))
    assert not (tmp_path / "run" / "final").exists()


def _batch(tiny_dir, problems_file, n=4):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    exs, _ = build_dataset(DataConfig(path=str(problems_file)), tok)
    return collate(exs[:n], tok.pad_token_id)


def test_all_masked_micro_batch_is_zero_not_nan(tiny_dir, problems_file):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    batch = _batch(tiny_dir, problems_file)
    batch["labels"][:] = -100
    res = CausalLMLoss(model, get_objective("talr"))(**batch, num_items=0)
    res.loss.backward()
    assert res.loss.item() == 0.0
    assert all(p.grad is None or not p.grad.abs().sum() for p in model.parameters())


@pytest.mark.parametrize("spec", ["iw_sft", "iw_sft:level=token", "asft:lam=0.1"])
def test_reference_objectives_against_float64(tiny_dir, problems_file, spec):
    """Weights and KL on a real model's batch, against a float64 computation from its logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    wrapped = CausalLMLoss(model, get_objective(spec), reference="copy")
    with torch.no_grad():  # move away from the reference so that weights and KL are not trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = _batch(tiny_dir, problems_file)
    res = wrapped(**batch)
    ref_model = wrapped._ref[0].model
    with torch.no_grad():
        lp = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits.double().log_softmax(-1)[:, :-1]
        rlp = ref_model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits.double().log_softmax(-1)[:, :-1]
    lab = batch["labels"][:, 1:]
    mask = lab != -100
    tgt = lab.clamp_min(0)[..., None]
    logp, ref_logp = lp.gather(-1, tgt).squeeze(-1), rlp.gather(-1, tgt).squeeze(-1)
    kl = (rlp.exp() * (rlp - lp)).sum(-1)
    if spec == "iw_sft":
        seq_w = ((logp - ref_logp) * mask).sum(1) / mask.sum(1)
        w = seq_w.exp().clamp(0, 16)[:, None].expand_as(logp)
        want = (-(w * logp) * mask).sum() / mask.sum()
    elif spec == "iw_sft:level=token":
        w = (logp - ref_logp).exp().clamp(0.2, 1.8)
        want = (-(w * logp) * mask).sum() / mask.sum()
    else:
        want = ((-logp.exp() * logp + 0.1 * kl) * mask).sum() / mask.sum()
    assert res.loss.item() == pytest.approx(want.item(), rel=1e-4)
    torch.testing.assert_close(res.kl[res.mask].double(), kl[mask], rtol=1e-3, atol=1e-6)
    assert kl[mask].mean() > 1e-3


def test_compute_loss_func_matches_our_loop_loss(tiny_dir, problems_file):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    batch = _batch(tiny_dir, problems_file)
    for spec in ("dft", "nll", "prob_power:alpha=0.5", "talr"):
        ours = CausalLMLoss(model, get_objective(spec))(**batch)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        n = int((batch["labels"][:, 1:] != -100).sum())
        theirs = compute_loss_func(spec)(out, batch["labels"], num_items_in_batch=torch.tensor(n))
        assert theirs.item() == pytest.approx(ours.loss.item(), rel=1e-5)
        # half the batch with the global count: accumulation-exact
        half = compute_loss_func(spec)(model(input_ids=batch["input_ids"][:2], attention_mask=batch["attention_mask"][:2]),
                                       batch["labels"][:2], num_items_in_batch=n)
        assert half.item() < theirs.item()
    with pytest.raises(ValueError, match="reference"):
        compute_loss_func("asft")


def test_lora_run_with_asft_saves_merged_model_and_adapter(tiny_dir, problems_file, tmp_path):
    cfg = _cfg(tiny_dir, problems_file, tmp_path / "lora", objective="asft", max_steps=2)
    cfg.model.lora_r = 4
    final = train(cfg)
    log = _log(tmp_path / "lora")
    assert "kl_ref" in log[0] and log[0]["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # adapters start at zero
    assert log[1]["kl_ref"] > 0
    assert (final / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), base.state_dict().values()))


def test_cli_train_errors_before_loading(tmp_path, capsys):
    from dftune.cli import main

    assert main(["train", "--show"]) == 0
    assert "train.objective" in capsys.readouterr().out
    assert main(["train", str(ROOT / "configs" / "tiny_cpu.yaml"), "train.lrr=1"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_logit_scale_is_applied_and_softcap_refused(tiny_dir, problems_file):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    batch = _batch(tiny_dir, problems_file, n=2)
    base = CausalLMLoss(model, get_objective("nll"))(**batch).loss
    model.config.logits_scaling = 0.5  # Granite-style: logits / 0.5
    scaled = CausalLMLoss(model, get_objective("nll"))(**batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double() / 0.5
    lab = batch["labels"][:, 1:]
    m = lab != -100
    want = -logits[:, :-1].log_softmax(-1).gather(-1, lab.clamp_min(0)[..., None]).squeeze(-1)[m].mean()
    assert scaled.loss.item() == pytest.approx(want.item(), rel=1e-4) and scaled.loss.item() != pytest.approx(base.item())
    del model.config.logits_scaling
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="softcapping"):
        CausalLMLoss(model, get_objective("nll"))(**batch)


def test_periodic_evaluation_writes_a_learning_curve(tiny_dir, problems_file, tmp_path):
    bench = tmp_path / "bench" / "toy"
    bench.mkdir(parents=True)
    write = "".join(json.dumps({"id": str(i), "question": f"What is {i} plus 2?", "answer": str(i + 2)}) + "\n" for i in range(3))
    (bench / "test.jsonl").write_text(write)
    # the eval section is dftune eval's own config, filled by the same overrides
    base = _cfg(tiny_dir, problems_file, tmp_path / "run", max_steps=4, eval_every=2)
    cfg = load(Config, None, [f"model.name_or_path={tiny_dir}", f"data.path={problems_file}", "data.max_length=128",
                              *(f"train.{k}={v}" for k, v in dataclasses.asdict(base.train).items()),
                              "eval.benchmarks=toy", "eval.limit=3", "eval.sampling.n=2", "eval.sampling.max_new_tokens=8",
                              f"eval.data_dir={tmp_path / 'bench'}"])
    assert cfg.eval.sampling.n == 2 and cfg.eval.backend == "hf" and cfg.train.eval_every == 2
    train(cfg)
    curve = [json.loads(x) for x in (tmp_path / "run" / "eval_curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [2, 4] and all(0.0 <= c["toy"] <= 1.0 for c in curve)
    saved = load(Config, tmp_path / "run" / "config.yaml", [])
    assert saved.eval == cfg.eval


@pytest.mark.parametrize("override, match", [
    ("eval.backend=vllm", "live model"),
    ("eval.model=some/model", "being trained"),
    ("eval.benchmarks=", "name at least one"),
])
def test_periodic_evaluation_settings_it_cannot_honour_are_refused_first(tiny_dir, problems_file, tmp_path, override,
                                                                         match):
    from dftune.settings import ConfigError

    cfg = _cfg(tiny_dir, problems_file, tmp_path / "run", eval_every=2)
    section, _, rest = override.partition(".")
    key, _, value = rest.partition("=")
    setattr(cfg.eval, key, [v for v in value.split(",") if v] if key == "benchmarks" else value)
    with pytest.raises(ConfigError, match=match):
        train(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing written: refused before any work


# ---- precision ------------------------------------------------------------------------------


def _one_step(tiny_dir, data, out, precision, lr):
    cfg = _cfg(tiny_dir, data, out, max_steps=1, lr=lr, warmup_ratio=0.0, precision=precision, weight_decay=0.0)
    return _weights(train(cfg))


def test_bf16_mixed_step_matches_fp32_and_keeps_tiny_updates(tiny_dir, problems_file, tmp_path):
    """fp32 master weights: at lr 1e-6 every weight with a gradient moves (pure bf16 would
    round 0.02 + 1e-6 back to 0.02), and the step equals the fp32 step to bf16 accuracy."""
    init = {k: v.float() for k, v in _weights(tiny_dir).items()}
    w32 = _one_step(tiny_dir, problems_file, tmp_path / "fp32", "fp32", 1e-6)
    wmix = _one_step(tiny_dir, problems_file, tmp_path / "mixed", "bf16-mixed", 1e-6)
    moved32 = moved_mix = agree = total = 0
    for k, w0 in init.items():
        d32, dmix = w32[k] - w0, wmix[k] - w0
        assert wmix[k].dtype == torch.float32  # saved in the base checkpoint's dtype (fp32 here)
        has_grad = d32 != 0
        total += int(has_grad.sum())
        moved32 += int(has_grad.sum())
        moved_mix += int((dmix[has_grad] != 0).sum())
        # AdamW's first step is -lr * g / |g|: the same step wherever bf16 keeps g's sign
        agree += int(torch.isclose(dmix[has_grad], d32[has_grad], rtol=1e-2, atol=1e-9).sum())
    assert total > 0.5 * sum(v.numel() for v in init.values())
    assert moved_mix / total > 0.99
    assert agree / total > 0.9
    l32, lmix = _log(tmp_path / "fp32")[0], _log(tmp_path / "mixed")[0]
    assert lmix["loss"] == pytest.approx(l32["loss"], rel=2e-2)
    assert lmix["grad_norm"] == pytest.approx(l32["grad_norm"], rel=5e-2)


def test_bf16_pure_loses_small_updates(tiny_dir, problems_file, tmp_path):
    """What bf16-mixed exists to avoid (and why bf16-pure is documented as lossy)."""
    init = _weights(tiny_dir)
    w = _one_step(tiny_dir, problems_file, tmp_path / "pure", "bf16-pure", 1e-6)
    changed = sum(int((w[k].float() != init[k].to(torch.bfloat16).float()).sum()) for k in init)
    assert changed / sum(v.numel() for v in init.values()) < 0.1


def test_fp16_is_refused_before_anything_loads(tiny_dir, problems_file, tmp_path):
    from dftune.settings import ConfigError

    with pytest.raises(ConfigError, match="fp16 is not supported"):
        train(_cfg(tiny_dir, problems_file, tmp_path / "x", precision="fp16-mixed"))
    assert not (tmp_path / "x").exists()


# ---- run folders and checkpoints ----------------------------------------------------------


def test_run_folder_is_never_mixed(tiny_dir, problems_file, tmp_path):
    from dftune.settings import ConfigError

    out = tmp_path / "run"
    train(_cfg(tiny_dir, problems_file, out, max_steps=2, save_every=1))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(_cfg(tiny_dir, problems_file, out, max_steps=2))
    with pytest.raises(ConfigError, match=r"train.lr: saved 0.003, now 0.001"):
        train(_cfg(tiny_dir, problems_file, out, max_steps=2, lr=1e-3, resume=True))
    # harmless differences are allowed; a finished run resumed is returned as it is
    final = train(_cfg(tiny_dir, problems_file, out, max_steps=2, resume=True, log_every=5, keep_checkpoints=1))
    assert final == out / "final" and [r["step"] for r in _log(out)] == [1, 2]
    # --overwrite starts clean: no old checkpoint survives to be resumed later
    train(_cfg(tiny_dir, problems_file, out, max_steps=1, overwrite=True, lr=1e-3))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000001"]
    assert [r["step"] for r in _log(out)] == [1]


def test_a_failed_start_does_not_block_the_corrected_one(tiny_dir, problems_file, tmp_path):
    """A start that fails after claiming the folder (the weights do not load) leaves no
    progress: the corrected command runs there without --overwrite."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    out = tmp_path / "run"
    with pytest.raises(Exception):
        train(_cfg(broken, problems_file, out, max_steps=1))
    assert (out / "config.yaml").is_file() and not (out / "log.jsonl").exists()
    assert train(_cfg(tiny_dir, problems_file, out, max_steps=1)) == out / "final"
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["name_or_path"] == str(tiny_dir)


def test_resume_needs_a_complete_checkpoint(tiny_dir, problems_file, tmp_path):
    from dftune.settings import ConfigError

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="holds no run to resume; start it without --resume"):
        train(_cfg(tiny_dir, problems_file, out, max_steps=3, resume=True))
    assert not out.exists()

    def stop(step, rec):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_dir, problems_file, out, max_steps=3), on_step=stop)  # save_every=0: no checkpoint
    with pytest.raises(ConfigError, match="saved no complete checkpoint .log.jsonl reaches step 2"):
        train(_cfg(tiny_dir, problems_file, out, max_steps=3, resume=True))
    assert [r["step"] for r in _log(out)] == [1, 2]  # the refusal kept the log as it was


def test_ctrl_c_names_the_checkpoint_and_the_command(tiny_dir, problems_file, tmp_path):
    from dftune.cli import interrupted_message
    from dftune.errors import Interrupted

    def stop(step, rec):
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(Interrupted) as e:
        train(_cfg(tiny_dir, problems_file, out, max_steps=5, save_every=2), on_step=stop)
    assert e.value.resume == out / "checkpoints" / "step_0000002"
    text = interrupted_message("train", ["cfg.yaml", "lr=1e-3", "--overwrite"], e.value, "")
    assert f"the last checkpoint is {out / 'checkpoints' / 'step_0000002'}" in text
    assert text.endswith("continue with: dftune train cfg.yaml lr=1e-3 --resume")


def test_resume_ignores_unfinished_checkpoints_and_replays_log_once(tiny_dir, problems_file, tmp_path):
    class Killed(Exception):
        pass

    def kill_after_3(step, rec):
        if step == 3:
            raise Killed

    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(_cfg(tiny_dir, problems_file, out, max_steps=5, save_every=2), on_step=kill_after_3)
    assert [r["step"] for r in _log(out)] == [1, 2, 3]  # step 3 was logged, not checkpointed
    # a crash while step 4 was being saved leaves a .tmp folder, even one holding state.json
    tmp = out / "checkpoints" / "step_0000004.tmp"
    tmp.mkdir()
    (tmp / "state.json").write_text('{"step": 4}')
    train(_cfg(tiny_dir, problems_file, out, max_steps=5, save_every=2, resume=True))
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4, 5]


def test_keep_checkpoints_must_be_positive(tiny_dir, problems_file, tmp_path):
    from dftune.settings import ConfigError

    with pytest.raises(ConfigError, match="keep_checkpoints"):
        train(_cfg(tiny_dir, problems_file, tmp_path / "run", keep_checkpoints=0))
    assert not (tmp_path / "run").exists()


def test_checkpoint_metadata_cannot_run_code(tiny_dir, problems_file, tmp_path):
    import pickle

    from dftune.dist import UnsafeCheckpointError

    out = tmp_path / "run"
    train(_cfg(tiny_dir, problems_file, out, max_steps=2, save_every=1))
    ckpt = out / "checkpoints" / "step_0000001"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload()))
    shutil.rmtree(out / "checkpoints" / "step_0000002")
    with pytest.raises(UnsafeCheckpointError, match="not checkpoint metadata"):
        train(_cfg(tiny_dir, problems_file, out, max_steps=2, save_every=1, resume=True))
    assert not marker.exists()


class _RunsCode:
    """Unpickled, it creates ``marker``: what a hostile checkpoint item would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_items_cannot_run_code(tiny_dir, problems_file, tmp_path):
    """A checkpoint whose non-tensor items (AdamW's lr) are pickles that run code: DCP's own
    loader would run them (checked, so the payload is real); resume refuses, and nothing runs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from dftune.dist import UnsafeCheckpointError, _safe_reader

    out = tmp_path / "run"
    train(_cfg(tiny_dir, problems_file, out, max_steps=2, save_every=1))
    ckpt = out / "checkpoints" / "step_0000001"
    shutil.rmtree(out / "checkpoints" / "step_0000002")
    dcp_to_torch_save(ckpt, tmp_path / "whole.pt")  # our own clean checkpoint, as one dict
    sd = torch.load(tmp_path / "whole.pt", weights_only=True)
    marker = tmp_path / "pwned"
    groups = sd["optim"]["param_groups"]
    groups[0]["lr"] = _RunsCode(marker)  # the item DCP stores as a pickle, not a tensor
    for f in list(ckpt.glob("*.distcp")) + [ckpt / ".metadata"]:
        f.unlink()
    dcp.save(sd, checkpoint_id=str(ckpt), no_dist=True)

    with pytest.raises(UnsafeCheckpointError, match=r"lr.*not plain data"):
        train(_cfg(tiny_dir, problems_file, out, max_steps=2, save_every=1, resume=True))
    assert not marker.exists()

    # DCP's default planner would have run it: the test's payload is a real one
    target = {"optim": {"param_groups": [{"lr": 0.0}]}}
    dcp.load(target, storage_reader=_safe_reader(ckpt), planner=dcp.DefaultLoadPlanner(allow_partial_load=True),
             no_dist=True)
    assert marker.exists()


def test_final_model_is_saved_in_the_base_checkpoints_dtype(tiny_dir, problems_file, tmp_path, capsys):
    """A bf16 release fine-tuned with fp32 master weights ships as bf16 (config and tensors)."""
    base = tmp_path / "bf16_base"
    AutoModelForCausalLM.from_pretrained(tiny_dir).to(torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(base)
    final = train(_cfg(base, problems_file, tmp_path / "run", max_steps=1, precision="bf16-mixed"))
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(v.dtype == torch.bfloat16 for v in _weights(final).values())
    said = capsys.readouterr().out
    assert f"final model: {final}, written in bfloat16, the base checkpoint's stored dtype; training kept " \
           "float32 master weights (train.save_dtype=fp32 writes them as trained)" in said

    # train.save_dtype=fp32: the master weights as trained, said so
    final = train(_cfg(base, problems_file, tmp_path / "run32", max_steps=1, precision="bf16-mixed", save_dtype="fp32"))
    assert json.loads((final / "config.json").read_text())["dtype"] == "float32"
    assert all(v.dtype == torch.float32 for v in _weights(final).values())
    assert "written in float32 (train.save_dtype=fp32)" in capsys.readouterr().out
    from dftune.settings import ConfigError

    with pytest.raises(ConfigError, match="train.save_dtype"):  # refused before anything loads
        train(_cfg(base, problems_file, tmp_path / "bad", save_dtype="int8"))
    assert not (tmp_path / "bad").exists()


def test_schedule_weight_normalisation_and_protect_in_the_loop(tiny_dir, problems_file, tmp_path):
    """Objective schedules move per step; norm=weight rescales the step's gradient by N / sum(w)
    over all micro-batches (accumulation 2 here); protect=special reaches token_loss."""
    train(_cfg(tiny_dir, problems_file, tmp_path / "sched", objective_schedule="nll@0.5,dft"))
    log = _log(tmp_path / "sched")
    assert [r["schedule_objective"] for r in log] == ["nll", "nll", "dft", "dft"]
    assert log[0]["weight_mean"] == pytest.approx(1.0) and log[2]["weight_mean"] < 1.0

    train(_cfg(tiny_dir, problems_file, tmp_path / "dft", max_steps=1))
    train(_cfg(tiny_dir, problems_file, tmp_path / "norm", max_steps=1, objective="dft:norm=weight"))
    plain, normed = _log(tmp_path / "dft")[0], _log(tmp_path / "norm")[0]
    assert normed["norm_factor"] == pytest.approx(1 / plain["weight_mean"], rel=1e-6)
    assert normed["grad_norm"] == pytest.approx(plain["grad_norm"] * normed["norm_factor"], rel=1e-5)

    train(_cfg(tiny_dir, problems_file, tmp_path / "prot", max_steps=1, objective="dft:protect=special"))
    prot = _log(tmp_path / "prot")[0]
    # EOS targets are trained with NLL: their weight is 1 instead of p, so the mean weight rises
    assert prot["weight_mean"] > plain["weight_mean"] and prot["loss"] != pytest.approx(plain["loss"])


def test_trackers_get_every_step_and_the_settings(tiny_dir, problems_file, tmp_path, monkeypatch):
    """train.report_to: TensorBoard, W&B (offline) and MLflow (a local store) each hold the
    run's steps; a resumed run continues the same W&B and MLflow run."""
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())  # a local store, no server
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "run"
    cfg = _cfg(tiny_dir, problems_file, out, max_steps=3, save_every=2, report_to=["tensorboard", "wandb", "mlflow"])

    def stop(step, rec):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=stop)
    cfg.train.resume = True
    train(cfg)
    tb = EventAccumulator(str(out / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("train/loss")] == [1, 2, 3]
    run_id = (out / "mlflow_run_id").read_text()
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]  # one run across the resume
    assert mlflow.get_run(run_id).data.params["train.lr"] == "0.003"
    wandb_runs = list((out / "wandb").glob("offline-run-*"))
    assert wandb_runs and all(r.name.endswith((out / "wandb_id").read_text()) for r in wandb_runs)


def test_an_unknown_or_missing_tracker_is_refused_first(tiny_dir, problems_file, tmp_path):
    from dftune.settings import ConfigError

    with pytest.raises(ConfigError, match="train.report_to: unknown tracker 'neptune'"):
        train(_cfg(tiny_dir, problems_file, tmp_path / "run", report_to=["neptune"]))
    assert not (tmp_path / "run").exists()
