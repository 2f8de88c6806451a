#!/usr/bin/env bash
# GPU figures for bench/RESULTS.md, run on a lent GPU machine (the `device` tool), which has torch but
# no Redis, Celery or Flask and no network: those travel as wheels (.whl/) and a Redis binary (.gpu/),
# the particles as a copy (.gpu/data). Prepared on the dev machine by: bash bench/gpu_prepare.sh
set -euo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
LD_LIBRARY_PATH=$PWD/.gpu/lib .gpu/redis-server --port 6379 --bind 127.0.0.1 --save "" --appendonly no --daemonize yes
export PLANKTON_DATA_DIR=$PWD/.gpu/data BENCH_REDIS_URL=redis://127.0.0.1:6379/12
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"
[ -n "${SKIP_GPU_CHECK:-}" ] || python3 bench/gpu_check.py --count 1024 2>&1 | tee "$OUT/gpu_check.txt"
# Model-only images/s per input size (the GPU column of RESULTS.md "Input size"; quality is measured on CPU).
python3 bench/input_size.py --device cuda --speed-only --json "$OUT/input-size.json" 2>&1 | tee "$OUT/input-size.txt"
python3 -c "import torch, torchvision; torch.save(torchvision.models.resnet50(weights=None).state_dict(), '/tmp/r50.pth')"
# One worker process per 2 cores: downloads and decoding are Python (one core per process), the GPU is shared.
export WORKER_CONCURRENCY=$(( $(nproc) / 2 )) CHUNK_SIZE=256 BATCH_SIZE=256
python3 bench/throughput.py --device cuda --image-size 224 --baseline-count 300 \
  --json "$OUT/effnet-224.json" 2>&1 | tee "$OUT/throughput-effnet-224.txt"
WEIGHTS=/tmp/r50.pth python3 bench/throughput.py --backbone resnet50 --device cuda --image-size 224 \
  --baseline-count 300 --json "$OUT/resnet50-224.json" 2>&1 | tee "$OUT/throughput-resnet50-224.txt"
