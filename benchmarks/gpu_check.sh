#!/usr/bin/env bash
# GPU check for an NVIDIA machine (no network needed): gpt-124m in bf16 + torch.compile through
# llmctl's trainer, tokens/s and MFU against the datasheet and a timed bf16 matmul, and the
# 2-process DDP check when there are two or more GPUs.
#
# It uses the machine's own Python and PyTorch. Packages missing there can travel as wheels in
# .whl/ (see the device tool's README); they are installed into /tmp/site first.
#   bash benchmarks/gpu_check.sh [--steps 30] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" benchmarks/gpu_check.py "$@"
