#!/usr/bin/env bash
# The GPU acceptance check: gpu tests, loss and training benchmarks (MFU), FSDP2 on one GPU,
# an evaluation smoke; one table. It prints its time estimate first and keeps to --budget
# (default 660 s: a stage that would not fit is skipped, and said). Its data is made in its
# scratch folder: a clone with nothing beside it is enough. Record its figures, with the
# card, in docs/benchmarks.md ("What the first GPU run will record").
#   bash scripts/gpu_check.sh                 # uses .venv if present, else the current python
#   bash scripts/gpu_check.sh --budget 900    # more time: fewer stages skipped
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
"$PY" -c "import dftune" 2>/dev/null || "$PY" -m pip install -q -e . --no-deps
exec "$PY" benchmarks/gpu_check.py "$@"
