#!/usr/bin/env bash
# The GPU acceptance check: gpu tests, loss and training benchmarks (MFU), FSDP2 on one GPU,
# an evaluation smoke; one table. Under 8 minutes on one H100. Record its figures, with the
# card, in docs/benchmarks.md.
#   bash scripts/gpu_check.sh            # uses .venv if present, else the current python
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
"$PY" -c "import dftune" 2>/dev/null || "$PY" -m pip install -q -e . --no-deps
exec "$PY" benchmarks/gpu_check.py "$@"
