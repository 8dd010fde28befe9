"""scripts/gpu_check.sh's stages at toy sizes on the CPU: the script a GPU session runs first
must not fail on its own bugs (device time is short). Nothing outside the clone is read."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _check(tmp_path, *args, timeout=900):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--work", str(tmp_path),
                        *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| stage")]
    return r, [[c.strip() for c in ln.strip("|").split("|")] for ln in table]


def test_gpu_check_runs_every_stage_at_smoke_sizes(tmp_path):
    r, rows = _check(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    first = r.stdout.splitlines()[1]
    assert first.startswith("# estimate:") and "budget 900 s" in first and "gpu-tests skipped (needs CUDA)" in first
    assert {row[0] for row in rows} == {"gpu-tests", "loss", "train", "fsdp", "eval", "ppo"}
    by = {(row[0], row[1]): row for row in rows}
    assert by[("gpu-tests", "")][2:] == ["needs CUDA", "", "SKIPPED"]
    for precision in ("bf16-mixed", "bf16"):  # the training path beside pure bf16, gradients checked in both
        for var in ("full_logits", "dftune"):
            row = by[("loss", f"{var}, {precision}, N=512 H=64 V=4096")]
            assert "grad err" in row[2] and float(row[2].split("grad err ")[1].split(",")[0]) < 0.05, row
        for var in ("dftune_cce", "dftune_cce_filtered", "liger", "dftune_liger"):  # optional: skipped, with why
            row = by[("loss", f"{var}, {precision}, N=512 H=64 V=4096")]
            assert row[4] == "SKIPPED" and row[2] in ("needs CUDA", "cut-cross-entropy not installed",
                                                      "liger-kernel not installed"), row
    train = next(row for row in rows if row[0] == "train")
    assert "tokens/s" in train[2] and "6N + 12 L H T" in train[2] and "without the input embedding" in train[2]
    assert all(row[4] != "NO" for row in rows)


def test_gpu_check_skips_and_says_what_does_not_fit_the_budget(tmp_path):
    r, rows = _check(tmp_path, "--stages", "fsdp,ppo", "--budget", "30", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert rows[0][0] == "fsdp" and rows[0][4] == "SKIPPED" and rows[0][2].startswith("budget: ~60 s needed"), rows
    assert rows[1][0] == "ppo" and rows[1][4] == "SKIPPED"
    assert not (tmp_path / "fsdp_run").exists()  # skipped before anything ran


def test_vllm_share_is_set_from_free_memory_and_peak_from_the_card():
    from gpu_check import Skip, peak_tflops, vllm_share

    gib = 2**30
    assert vllm_share(70 * gib, 80 * gib) == 0.86  # free less 1 GiB, as a share of the total
    assert vllm_share(79.5 * gib, 80 * gib) == 0.9  # never above the cap
    assert vllm_share(79.5 * gib, 80 * gib, cap=0.3) == 0.3
    with pytest.raises(Skip, match="free for vLLM"):
        vllm_share(1 * gib, 80 * gib)
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0


def test_gpu_check_ppo_command_resolves_on_a_cpu(tmp_path):
    """The PPO stage runs only with verl on a GPU: its command's keys are checked here, with
    launch=false (the data and verl's command are written, nothing is launched)."""
    import os
    import types

    from gpu_check import ppo_command

    a = types.SimpleNamespace(work=tmp_path)
    r = subprocess.run(ppo_command(a, 0.3, launch=False), capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0, r.stderr[-3000:]
    launch = (tmp_path / "ppo" / "launch.sh").read_text()
    assert "trainer.total_training_steps=2" in launch and "gpu_memory_utilization=0.3" in launch
