#!/usr/bin/env bash
# GPU benchmarks in one go (about 8 minutes at most), for a CUDA machine that has only torch and
# transformers installed: the repository goes on PYTHONPATH, nothing is pip-installed, no Ray.
#   bash bench/gpu.sh            # prints the tables that go into bench/RESULTS.md
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
STREAMS="${STREAMS:-1,8,32,64,128}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'

echo "== engine: csm-1b shape, random weights, bf16, CUDA graphs =="
if ! timeout 330 "$PY" bench/engine.py --preset csm-1b --device cuda --dtype bf16 \
        --streams "$STREAMS" --frames 48 --arrival-gap 0 --prefill-chunk 1024 --no-peer --floor; then
    echo "== engine with CUDA graphs failed or timed out; the same run eagerly =="
    timeout 150 "$PY" bench/engine.py --preset csm-1b --device cuda --dtype bf16 \
        --streams 1,8,32 --frames 24 --arrival-gap 0 --prefill-chunk 1024 --no-peer --floor --no-cuda-graphs
fi

if [ -f bench/codec.py ]; then
    echo "== codec: Mimi at real dims, random weights =="
    timeout 90 "$PY" bench/codec.py --preset mimi --device cuda --dtype bfloat16 --streams 1,8,32,64
fi
