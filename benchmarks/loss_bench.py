"""DFT through token_loss (chunked) vs a full-logits DFT in the style of TRL's dft_loss.

Forward + backward at Qwen2.5 LM-head shapes; prints time and peak memory of each and the
ratios, in one run. Each measurement runs in its own subprocess so that peak memory (RSS
on CPU, max_memory_allocated on CUDA) belongs to that variant alone.

    python benchmarks/loss_bench.py                      # CPU, H=896 and 1536, a few token counts
    python benchmarks/loss_bench.py --dtype bf16-mixed     # the training path on GPUs
    python benchmarks/loss_bench.py --variants full_logits,dftune,dftune_noent   # + the entropy's cost
    python benchmarks/loss_bench.py --device cuda --tokens 4096,8192,16384 --dtype bf16-mixed

Precision (--dtype): ``fp32``; ``bf16-mixed`` = what ``train.precision=bf16-mixed`` runs: bf16
hidden states from the decoder, the fp32 master LM head, both losses under
``torch.autocast(bf16)`` (fp32 weight gradient); ``bf16`` = pure bf16 (weights stored in bf16).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from contextlib import nullcontext

import torch

DTYPES = {"fp32": (torch.float32, torch.float32), "bf16-mixed": (torch.bfloat16, torch.float32),
          "bf16": (torch.bfloat16, torch.bfloat16)}  # --dtype: (hidden dtype, weight dtype)


def _inputs(n, h, v, device, dtype):
    torch.manual_seed(0)
    hdt, wdt = DTYPES[dtype]
    hidden = (torch.randn(n, h, device=device) * 0.5).to(hdt).requires_grad_(True)  # (N, H)
    weight = (torch.randn(v, h, device=device) * 0.02).to(wdt).requires_grad_(True)  # (V, H)
    labels = torch.randint(0, v, (n,), device=device)  # (N,)
    labels[: n // 4] = -100  # a prompt part, as in completion-only training
    return hidden, weight, labels


def _precision(device, dtype):
    return torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16-mixed" else nullcontext()


def full_logits_dft(hidden, weight, labels):
    """What TRL's dft_loss does: materialise logits, log-softmax, gather, weight by sg(p)."""
    logits = (hidden @ weight.T).float()  # (N, V)
    logp_all = logits.log_softmax(-1)
    mask = labels != -100
    logp = logp_all.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    loss = -(logp.detach().exp() * logp)
    return (loss * mask).sum() / mask.sum()


CHUNK = 0  # --chunk: tokens per chunk for dftune (0: its default, 2^25 // V)


def ours(hidden, weight, labels, backend="chunked", entropy=True):
    from dftune.loss import token_loss

    return token_loss(hidden, weight, labels, "dft", backend=backend, entropy=entropy, chunk_size=CHUNK or None).loss


def ours_without_entropy(hidden, weight, labels):
    """What a training step computes between logging steps: the entropy statistic skipped."""
    return ours(hidden, weight, labels, entropy=False)


def liger_dft(hidden, weight, labels):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(use_token_scaling=True)(weight, hidden, labels)


def cce_dft(hidden, weight, labels):
    """dftune's cce backend with no gradient filtering (CCE 25.1.1 accumulates in bf16)."""
    return ours(hidden, weight, labels, backend="cce:accum=bf16")


def cce_filtered_dft(hidden, weight, labels):
    """The same with CCE's own default, gradient filtering (filter_eps=high): CCE as shipped."""
    return ours(hidden, weight, labels, backend="cce:accum=bf16,filter_eps=high")


def liger_exact_dft(hidden, weight, labels):
    """dftune's liger backend, exact by default: fp32 logits, p and gradients."""
    return ours(hidden, weight, labels, backend="liger")


VARIANTS = {"full_logits": full_logits_dft, "dftune": ours, "dftune_noent": ours_without_entropy, "liger": liger_dft,
            "dftune_cce": cce_dft, "dftune_cce_filtered": cce_filtered_dft, "dftune_liger": liger_exact_dft}
# the optional library each variant needs: (module, package)
NEEDS = {"liger": ("liger_kernel", "liger-kernel"), "dftune_liger": ("liger_kernel", "liger-kernel"),
         "dftune_cce": ("cut_cross_entropy", "cut-cross-entropy"),
         "dftune_cce_filtered": ("cut_cross_entropy", "cut-cross-entropy")}


def measure(variant, n, h, v, device, dtype, reps):
    hidden, weight, labels = _inputs(n, h, v, device, dtype)
    fn, amp = VARIANTS[variant], _precision(device, dtype)
    with amp:
        loss = fn(hidden, weight, labels)
    loss.backward()  # warm-up
    hidden.grad = weight.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        with amp:
            loss = fn(hidden, weight, labels)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        hidden.grad = weight.grad = None
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:  # the warm-up already reached the steady-state peak: measure it in a fresh process instead
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"time_s": min(times), "peak_bytes": peak}


def measure_cpu_peak(variant, n, h, v, dtype):
    """CPU peak: RSS growth of one forward+backward in a fresh process after allocating inputs."""
    hidden, weight, labels = _inputs(n, h, v, "cpu", dtype)
    weight.grad = torch.zeros_like(weight)  # the gradient buffer exists in training anyway
    hidden.grad = torch.zeros_like(hidden)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with _precision("cpu", dtype):
        loss = VARIANTS[variant](hidden, weight, labels)
    loss.backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def child(args):
    global CHUNK
    CHUNK = args.chunk
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        peak = measure_cpu_peak(args.variant, args.n, args.h, args.v, args.dtype)
        timing = measure(args.variant, args.n, args.h, args.v, "cpu", args.dtype, args.reps)
        timing["peak_bytes"] = peak
    else:
        timing = measure(args.variant, args.n, args.h, args.v, "cuda", args.dtype, args.reps)
    print(json.dumps(timing))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--hidden", default="896,1536")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tokens", default="512,1024,2048")
    ap.add_argument("--variants", default=None, help="default: full_logits,dftune (+liger,dftune_cce on CUDA)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=0, help="dftune's tokens per chunk (0: its default)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--h", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--v", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    variants = (args.variants or ("full_logits,dftune,liger,dftune_cce" if args.device == "cuda" else "full_logits,dftune")).split(",")
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    print(f"# DFT loss, forward+backward, V={args.vocab}, {args.dtype}, {dev}, dftune chunk {args.chunk or 'default'}")
    print("| H | tokens | variant | time (s) | peak (MiB) | time vs full | memory vs full |")
    print("|---|---|---|---|---|---|---|")
    for h in map(int, args.hidden.split(",")):
        for n in map(int, args.tokens.split(",")):
            rows = {}
            for var in variants:
                cmd = [sys.executable, __file__, "--child", "--variant", var, "--n", str(n), "--h", str(h),
                       "--v", str(args.vocab), "--device", args.device, "--dtype", args.dtype,
                       "--reps", str(args.reps), "--threads", str(args.threads), "--chunk", str(args.chunk)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"| {h} | {n} | {var} | failed: {out.stderr.strip().splitlines()[-1][:80]} | | | |")
                    continue
                rows[var] = json.loads(out.stdout.strip().splitlines()[-1])
            full = rows.get("full_logits")
            for var, r in rows.items():
                ratio_t = f"{r['time_s'] / full['time_s']:.2f}x" if full else "-"
                ratio_m = f"{r['peak_bytes'] / max(full['peak_bytes'], 1):.3f}x" if full else "-"
                print(f"| {h} | {n} | {var} | {r['time_s']:.3f} | {r['peak_bytes'] / 2**20:.0f} | {ratio_t} | {ratio_m} |", flush=True)


if __name__ == "__main__":
    main()
