#!/usr/bin/env bash
# A short GPU run for when little device time is left: resnet50 at 224 px end to end (no peer baseline).
set -euo pipefail
OUT=${OUT:-/tmp/gpu-out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
LD_LIBRARY_PATH=$PWD/.gpu/lib .gpu/redis-server --port 6379 --bind 127.0.0.1 --save "" --appendonly no --daemonize yes
export PLANKTON_DATA_DIR=$PWD/.gpu/data BENCH_REDIS_URL=redis://127.0.0.1:6379/12
export WORKER_CONCURRENCY=$(( $(nproc) / 2 )) CHUNK_SIZE=256 BATCH_SIZE=256
python3 -c "import torch, torchvision; torch.save(torchvision.models.resnet50(weights=None).state_dict(), '/tmp/r50.pth')"
WEIGHTS=/tmp/r50.pth timeout 75 python3 bench/throughput.py --backbone resnet50 --device cuda --image-size 224 \
  --count 2000 --reads direct --skip-baseline --model-passes 1 --json "$OUT/resnet50-224.json" 2>&1 | tee "$OUT/throughput-resnet50-224.txt"
