#!/usr/bin/env bash
# GPU benchmarks in one lease and one run of at most 7 minutes (the timeouts below add up to 420 s), for a
# CUDA machine that has only torch and transformers installed: the repository goes on PYTHONPATH, nothing
# is pip-installed, no Ray. bench/gpu.py prints one table (engine bf16 and fp16 by batch and context, the
# end-to-end smoke, Mimi fp32) and the conversation sweep (reuse on and off); see its docstring.
#   bash bench/gpu.sh                  # the tables that go into bench/RESULTS.md
#   GPU_DRY_RUN=1 bash bench/gpu.sh    # or --dry-run: the same code on CPU at tiny sizes (the test runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

if [ "${GPU_DRY_RUN:-0}" = 1 ] || [ "${1:-}" = --dry-run ]; then
    exec timeout 300 "$PY" bench/gpu.py --dry-run
fi

# 10 s + 410 s = 420 s. The driver keeps to its own budget of 380 s (each section stops early to fit, the
# conversation sweep gets what is left); the outer timeout is only the hard stop, with room for imports.
timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 410 "$PY" bench/gpu.py --budget-s 380
