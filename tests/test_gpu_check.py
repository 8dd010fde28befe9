"""scripts/gpu_check.sh's stages at toy sizes on the CPU: the script a GPU session runs first
must not fail on its own bugs (device time is short)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_stage_at_smoke_sizes(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--work", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| stage")]
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    stages = {ln.split("|")[1].strip() for ln in table}
    assert stages == {"gpu-tests", "loss", "train", "fsdp", "eval", "ppo"}
    rows = {ln.split("|")[1].strip() + ":" + ln.split("|")[2].strip(): ln for ln in table}
    assert "skipped: needs CUDA" in rows["gpu-tests:pytest -m gpu"]
    assert any("dftune N=" in k and "grad err" in v for k, v in rows.items())  # gradient agreement is measured
    assert any(k.startswith("train") and "tokens/s" in v for k, v in rows.items())
    assert all("| NO |" not in ln for ln in table)
