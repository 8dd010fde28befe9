"""The GPU acceptance check: every GPU-only claim of dftune, measured in one run, one table.

    bash scripts/gpu_check.sh                     # on one GPU; prints its time estimate first
    bash scripts/gpu_check.sh --budget 900        # a longer budget: fewer stages skipped
    python benchmarks/gpu_check.py --smoke        # the same stages at toy sizes on a CPU (CI runs this)

Everything it needs is made in its scratch folder (``--work``): models, tokenizers, training
rows and the evaluation's problems come from the project itself (``dftune.tiny``,
``dftune.testbed.tasks``), so it runs from a clone with nothing beside it. The parent process
never touches GPU memory: every measurement runs in a child process, so the memory is free
when vLLM starts, and vLLM's ``gpu_memory_utilization`` is set from the memory free then.

Stages (each isolated: a failure is a row of the table, not the end of the run; a stage that
cannot run here, or that would not fit in what is left of ``--budget``, is a SKIPPED row
with the reason):
  gpu-tests   pytest -m gpu (CCE / Liger backends and the bf16 GEMM path against references)
  loss        DFT forward+backward at a Qwen2.5 head (V=151,936, H=1536, 16K tokens), in
              bf16-mixed (bf16 hidden states, the fp32 master head under autocast: what
              training runs) and pure bf16: dftune (chunked), full logits, Liger as shipped,
              dftune's cce (no gradient filtering) and cce with CCE's own filtering, dftune's
              exact liger; time, peak memory, gradient error against float64
  train       dftune train on a random model of Qwen2.5-1.5B's shape (GQA 12/2, tied),
              bf16-mixed, seq 2048: tokens/s and MFU (6N + 12 L H T, stated in the row)
  fsdp        dftune train with train.parallel=fsdp under torchrun on this one GPU
  eval        dftune eval on a tiny local benchmark (vLLM when installed, else the HF backend)
  ppo         dftune baseline ppo on verl, 2 steps on a tiny model (when verl and vLLM are installed)
Targets: loss memory <= 1.5 GiB at 16K tokens and time <= 1.1x CCE (as shipped), MFU >= 40%.
"""

from __future__ import annotations

import argparse
import importlib.util
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

# Dense bf16 peak (TFLOPS, no sparsity) by device-name fragment, most specific first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
                    ("GH200", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0))
# Seconds each stage is expected to take: on one H100 (estimated from its parts: process
# starts, model writes, vLLM start-up; not yet measured) and at --smoke sizes on the 2-core
# development CPU (measured). A stage runs only if its estimate fits in what is left.
ESTIMATE_S = {"gpu-tests": (120, 5), "loss": (150, 60), "train": (180, 90), "fsdp": (60, 60), "eval": (150, 60),
              "ppo": (300, 5)}
LOSS_VARIANTS = ("full_logits", "dftune", "dftune_cce_filtered", "dftune_cce", "liger", "dftune_liger")


class Skip(Exception):
    """A stage (or a row) that cannot run here: the message is the reason."""


def peak_tflops(name: str) -> float:
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), 989.0)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def _run(a, cmd, cap: float, env=None) -> subprocess.CompletedProcess:
    """Run a child within the stage's cap and what is left of the budget."""
    timeout = max(1.0, min(cap, a.deadline - time.monotonic()))
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**_env(), **(env or {})},
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {timeout:.0f} s (stage cap or --budget)")


def _tail(r: subprocess.CompletedProcess) -> str:
    lines = (r.stderr or r.stdout).strip().splitlines()
    return lines[-1][:140] if lines else f"exit {r.returncode}"


def gpu_memory() -> tuple[str, int, int]:
    """(device name, free bytes, total bytes), asked of a child process so that this one
    never creates a CUDA context (which would hold memory vLLM then cannot have)."""
    code = "import torch, json; f, t = torch.cuda.mem_get_info(); print(json.dumps([torch.cuda.get_device_name(), f, t]))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    name, free, total = json.loads(r.stdout.strip().splitlines()[-1])
    return name, free, total


def vllm_share(free: int, total: int, cap: float = 0.9) -> float:
    """vLLM's gpu_memory_utilization (a share of the card's total it may take): what is
    free now less 1 GiB of headroom, at most ``cap``."""
    share = min(cap, (free - 2**30) / total)
    if share < 0.05:
        raise Skip(f"only {free / 2**30:.1f} GiB of {total / 2**30:.0f} GiB free for vLLM")
    return round(share, 2)


# ---- loss: one child process per precision, every variant in it, one JSON line each -------------


def loss_child(args) -> None:
    """Measure each variant; print {"variant", "status", ...} per line (skipped/failed rows too)."""
    import loss_bench

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for var in args.variants.split(","):
        rec = {"variant": var}
        module, package = loss_bench.NEEDS.get(var, (None, None))
        try:
            if module and not importlib.util.find_spec(module):
                raise Skip(f"{package} not installed")
            if module and device != "cuda":
                raise Skip("needs CUDA")
            rec.update(loss_bench.measure(var, args.n, args.h, args.v, device, args.precision, args.reps))
            rec["grad_err"] = grad_error(var, min(args.n, 2048), args.h, args.v, device, args.precision)
            rec["status"] = "ok"
        except Skip as e:
            rec.update(status="skipped", reason=str(e))
        except Exception as e:  # noqa: BLE001 - one variant's failure is its row
            rec.update(status="failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
        if device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(rec), flush=True)


def grad_error(variant: str, n: int, h: int, v: int, device: str, precision: str) -> float:
    """Max |grad - ref| / max |ref| over hidden and weight, against float64 full logits of the
    same inputs (bf16 hidden; the head fp32 in bf16-mixed, bf16 in pure bf16)."""
    import loss_bench

    hidden, weight, labels = loss_bench._inputs(n, h, v, device, precision)
    h64, w64 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    loss_bench.full_logits_dft(h64, w64, labels).backward()
    with loss_bench._precision(device, precision):
        loss = loss_bench.VARIANTS[variant](hidden, weight, labels)
    loss.backward()
    err = 0.0
    for got, ref in ((hidden.grad, h64.grad), (weight.grad, w64.grad)):
        err = max(err, float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    return err


def stage_loss(a) -> list:
    n, h, v = (16384, 1536, 151936) if not a.smoke else (512, 64, 4096)
    rows = []
    for precision in ("bf16-mixed", "bf16"):
        got, todo = {}, list(LOSS_VARIANTS)
        while todo:  # a child that crashes (a kernel fault) loses one variant, not the rest
            cmd = [sys.executable, __file__, "--loss-child", "--precision", precision, "--variants", ",".join(todo),
                   "--n", str(n), "--h", str(h), "--v", str(v), "--reps", "3"]
            r = _run(a, cmd, 600)
            for line in r.stdout.splitlines():
                if line.startswith("{"):
                    rec = json.loads(line)
                    got[rec["variant"]] = rec
            todo = [x for x in todo if x not in got]
            if not todo:
                break
            if r.returncode == 124:  # out of time: the rest cannot run either
                got.update({x: {"status": "failed", "reason": _tail(r)} for x in todo})
                break
            got[todo.pop(0)] = {"status": "failed", "reason": f"crashed: {_tail(r)}"}
        cce = got.get("dftune_cce_filtered", {})
        for var in LOSS_VARIANTS:
            m = got[var]
            what = f"{var}, {precision}, N={n} H={h} V={v}"
            if m["status"] != "ok":
                rows.append(("loss", what, m["reason"], "", "SKIPPED" if m["status"] == "skipped" else False))
                continue
            fig = f"{m['time_s'] * 1e3:.1f} ms, {m['peak_bytes'] / 2**30:.2f} GiB, grad err {m['grad_err']:.1e}"
            target, ok = "", None
            if var == "dftune" and precision == "bf16-mixed":
                target = "<= 1.5 GiB, <= 1.1x CCE time"
                ok = m["peak_bytes"] <= 1.5 * 2**30 if not a.smoke else None
                if cce.get("status") == "ok":
                    ratio = m["time_s"] / cce["time_s"]
                    fig += f", {ratio:.2f}x CCE's time"
                    ok = None if a.smoke else (ok and ratio <= 1.1)
            rows.append(("loss", what, fig, target, ok))
    return rows


# ---- the other stages -----------------------------------------------------------------------


def stage_gpu_tests(a) -> list:
    r = _run(a, [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"], 600)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else _tail(r)
    return [("gpu-tests", "pytest -m gpu", last, "all pass", r.returncode == 0)]


def stage_train(a) -> list:
    shape = (["--hidden", "1536", "--layers", "28", "--heads", "12", "--kv-heads", "2", "--tie", "--intermediate",
              "8960", "--seq", "2048", "--micro", "4", "--accum", "2", "--steps", "6", "--grad-ckpt"] if not a.smoke else
             ["--hidden", "64", "--layers", "2", "--heads", "2", "--intermediate", "128", "--vocab", "2048",
              "--seq", "64", "--micro", "2", "--accum", "1", "--steps", "3"])
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_bench.py"), "--device", a.device, "--dtype",
           "bf16" if a.device == "cuda" else "fp32", "--no-trl", "--synthetic", "--work", str(a.work / "train_bench"),
           "--peak-tflops", str(a.peak), *shape]
    what = ("Qwen2.5-1.5B shape (GQA 12/2, tied), bf16-mixed, seq 2048, 4 x 2 sequences, grad ckpt" if not a.smoke
            else "toy shape (smoke), fp32")
    r = _run(a, cmd, 900)
    row = next((ln for ln in r.stdout.splitlines() if ln.startswith("| dftune")), "")
    if r.returncode or not row:
        return [("train", what, f"failed: {_tail(r)}", "MFU >= 40%", False)]
    cells = [c.strip() for c in row.strip("|").split("|")]
    tps, peak, mfu = cells[1], cells[2], cells[3]
    formula = next((ln[2:] for ln in r.stdout.splitlines() if ln.startswith("# MFU")), "")
    ok = float(mfu[:-1]) >= 40 if a.device == "cuda" and mfu.endswith("%") else None
    return [("train", what, f"{tps} tokens/s, peak {peak} MiB, MFU {mfu} ({formula})", "MFU >= 40%", ok)]


def _tiny_model(a) -> Path:
    from dftune.tiny import make_tiny

    folder = a.work / "tiny"
    if not (folder / "config.json").is_file():
        texts = [r["problem"] + " " + r["solution"] for r in _problems(200)]
        make_tiny(folder, texts, vocab_size=300, hidden=64, layers=2, heads=1, intermediate=128)
    return folder


def _problems(n: int) -> list[dict]:
    from dftune.testbed.tasks import TaskSpec, generate

    return generate(TaskSpec(steps=(1, 2), max_number=20), n=n, seed=0)


def _toy_data(a, n: int = 64) -> Path:
    path = a.work / f"toy_{n}.jsonl"
    path.write_text("".join(json.dumps({"problem": r["problem"], "solution": r["solution"]}) + "\n"
                            for r in _problems(n)))
    return path


def stage_fsdp(a) -> list:
    out = a.work / "fsdp_run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29533", "-m", "dftune.cli",
           "train", f"model.name_or_path={_tiny_model(a)}", f"data.path={_toy_data(a)}", "data.max_length=64",
           "train.parallel=fsdp", f"train.precision={'bf16-mixed' if a.device == 'cuda' else 'fp32'}",
           "train.global_batch=8", "train.micro_batch=4", "train.max_steps=3", f"train.out={out}",
           "train.overwrite=true", "train.lr=1e-3"]
    t = time.perf_counter()
    r = _run(a, cmd, 300)
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
    (bench / "test.jsonl").write_text("".join(json.dumps({"id": str(i), "question": r["problem"], "answer": r["answer"]})
                                              + "\n" for i, r in enumerate(_problems(16))))
    backend, note, extra = "hf", ": CPU" if a.device != "cuda" else ": vLLM not installed", []
    if a.device == "cuda" and importlib.util.find_spec("vllm"):
        _, free, total = gpu_memory()
        share = vllm_share(free, total)
        backend, note = "vllm", f", gpu_memory_utilization {share} ({free / 2**30:.1f} of {total / 2**30:.0f} GiB free)"
        extra = [f"engine.gpu_memory_utilization={share}"]
    out = a.work / "eval"
    cmd = [sys.executable, "-m", "dftune.cli", "eval", "--model", str(_tiny_model(a)), "--benchmarks", "toy",
           "--data-dir", str(a.work / "bench"), "--n", "4", "--max-new-tokens", "32", "--backend", backend,
           "--prompt", "chat", "--out", str(out), *extra]
    t = time.perf_counter()
    r = _run(a, cmd, 600)
    what = f"dftune eval ({backend}{note})"
    if r.returncode:
        return [("eval", what, f"failed: {_tail(r)}", "runs", False)]
    summary = json.loads((out / "summary.json").read_text())
    n = sum(m.get("problems", 0) for m in summary["benchmarks"].values())
    return [("eval", what, f"{n} problems x 4 samples in {time.perf_counter() - t:.0f} s", "runs", n == 16)]


def ppo_command(a, share: float, launch: bool = True) -> list[str]:
    """``dftune baseline ppo``, 2 steps on the tiny model (``launch=false``: data and launch.sh
    only, which the test suite runs on a CPU to check the command's keys)."""
    return [sys.executable, "-m", "dftune.cli", "baseline", "ppo", "configs/paper/ppo.yaml", f"model={_tiny_model(a)}",
            f"data={_toy_data(a, 256)}", "select=first:256", "global_batch=16", "mini_batch=16", "micro_batch=2",
            "gpus_per_node=1", "max_steps=2", "save_every=2", "max_completion_length=64",
            f"gpu_memory_utilization={share}", "grade_workers=2", f"out={a.work / 'ppo'}", f"launch={str(launch).lower()}"]


def stage_ppo(a) -> list:
    """PPO on verl (the paper's online baseline): 2 steps on a tiny model."""
    _, free, total = gpu_memory()
    out = a.work / "ppo"
    cmd = ppo_command(a, vllm_share(free, total, cap=0.3))
    t = time.perf_counter()
    r = _run(a, cmd, 900)
    ok = r.returncode == 0 and (out / "final" / "config.json").is_file() and (out / "log.jsonl").stat().st_size > 0
    return [("ppo", "dftune baseline ppo (verl), 2 steps", f"{time.perf_counter() - t:.0f} s" if ok else
             f"failed: {_tail(r)}", "runs, saves", ok)]


STAGES = {"gpu-tests": stage_gpu_tests, "loss": stage_loss, "train": stage_train, "fsdp": stage_fsdp, "eval": stage_eval,
          "ppo": stage_ppo}


def why_not(name: str, a) -> str | None:
    """Why a stage cannot run here at all (checked before the estimate), or None."""
    if name == "gpu-tests" and a.device != "cuda":
        return "needs CUDA"
    if name == "ppo":
        missing = [m for m in ("verl", "vllm") if not importlib.util.find_spec(m)]
        if missing:
            return f"{' and '.join(missing)} not installed"
        if a.device != "cuda":
            return "needs CUDA"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes (CPU is fine): checks the script itself")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--budget", type=float, default=0,
                    help="seconds for the whole run (default 660 on a GPU, 900 with --smoke); a stage whose estimate "
                         "does not fit in what is left is skipped, and said")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--loss-child", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--precision", "--variants"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    for flag in ("--n", "--h", "--v", "--reps"):
        ap.add_argument(flag, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.loss_child:
        return loss_child(a) or 0
    t0 = time.monotonic()
    a.device = "cuda" if torch.cuda.is_available() else "cpu"  # no CUDA context is created here
    a.budget = a.budget or (900 if a.smoke else 660)
    a.deadline = t0 + a.budget
    a.work = a.work or Path(tempfile.mkdtemp(prefix="dftune_gpu_check_"))
    a.work.mkdir(parents=True, exist_ok=True)
    device = gpu_memory()[0] if a.device == "cuda" else "CPU (no CUDA)"
    a.peak = peak_tflops(device)
    names = a.stages.split(",")
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    col = 1 if a.smoke else 0
    plan = {n: (why_not(n, a), ESTIMATE_S[n][col]) for n in names}
    total = sum(est for why, est in plan.values() if why is None)
    print(f"# dftune GPU check: {device}, torch {torch.__version__}{', smoke sizes' if a.smoke else ''}")
    print(f"# estimate: {total} s ({total / 60:.1f} min) for "
          + ", ".join(f"{n} ~{est} s" if why is None else f"{n} skipped ({why})" for n, (why, est) in plan.items())
          + f"; budget {a.budget:.0f} s (--budget): a stage that does not fit in what is left is skipped, and said",
          flush=True)
    rows = []
    for name in names:
        why, est = plan[name]
        left = a.deadline - time.monotonic()
        if why is None and est > left:
            why = f"budget: ~{est} s needed, {left:.0f} s left of --budget {a.budget:.0f}"
        if why is not None:
            rows.append((name, "", why, "", "SKIPPED"))
            continue
        t = time.monotonic()
        try:
            got = STAGES[name](a)
        except Skip as e:
            got = [(name, "", str(e), "", "SKIPPED")]
        except Exception as e:  # noqa: BLE001 - one broken stage must not hide the others
            got = [(name, "", f"error: {type(e).__name__}: {str(e)[:100]}", "", False)]
        rows += got
        print(f"  {name}: {time.monotonic() - t:.0f} s (estimated {est} s)", file=sys.stderr, flush=True)
    print("| stage | what | measured | target | ok |")
    print("|---|---|---|---|---|")
    for stage, what, fig, target, ok in rows:
        mark = ok if isinstance(ok, str) else "-" if ok is None else "yes" if ok else "NO"
        print(f"| {stage} | {what} | {fig} | {target} | {mark} |")
    print(f"total {time.monotonic() - t0:.0f} s")
    return 0 if all(r[4] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
