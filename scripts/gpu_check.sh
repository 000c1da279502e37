#!/usr/bin/env bash
# One GPU session's checks: the gpu-marked tests and the kernel benchmarks (ENGINE_BENCH=1: the engine's
# too), with results under $OUT.
# Run on a CUDA machine from the repo root, e.g. through the device tool with `.whl` carried:
#   bash scripts/gpu_check.sh            (OUT defaults to ./gpu-out)
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels the GPU image lacks (../shared/gpu/fetch-wheels.sh)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/models/test_parity_gpu.py \
  tests/models/test_cuda_graphs_gpu.py --junitxml="$OUT/gpu-tests.xml" 2>&1 | tail -40 | tee "$OUT/gpu-tests.txt"
python3 bench/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
python3 bench/skinny_linear.py --json "$OUT/skinny-linear.json" 2>&1 | tee "$OUT/skinny-linear.txt"
if [ "${ENGINE_BENCH:-0}" = 1 ]; then  # the end-to-end engine benchmarks: ~3-4 minutes a shape on an H100
  for shape in llama-3.2-1b llama-3.1-8b gpt2-xl; do
    python3 bench/engine.py --shape "$shape" --json "$OUT/engine-$shape.json" 2>&1 | tee "$OUT/engine-$shape.txt"
  done
fi
