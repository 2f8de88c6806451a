#!/usr/bin/env bash
# GPU figures for bench/RESULTS.md, run on a lent GPU machine (the `device` tool) in one call of about 8
# minutes. That machine has torch but no Redis, Celery or Flask and no network: those travel as wheels
# (.whl/) and a Redis binary (.gpu/), the particles as a copy (.gpu/data). Prepared on the dev machine by
# `bash bench/gpu_prepare.sh`. Each step has its own time limit and a failed step does not stop the next.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
LD_LIBRARY_PATH=$PWD/.gpu/lib .gpu/redis-server --port 6379 --bind 127.0.0.1 --save "" --appendonly no --daemonize yes
export PLANKTON_DATA_DIR=$PWD/.gpu/data BENCH_REDIS_URL=redis://127.0.0.1:6379/12
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"

skipped() { [[ " ${SKIP:-} " == *" $1 "* ]]; }  # SKIP="gpu_check input-size": steps left out

step() {  # step NAME SECONDS COMMAND...: its output in $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  if skipped "$name"; then echo "== $name skipped"; return; fi
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "   exit $? after ${SECONDS}s in all"
  tail -n 40 "$OUT/$name.txt"
}

python3 -c "import torch, torchvision; torch.save(torchvision.models.resnet50(weights=None).state_dict(), '/tmp/r50.pth')"
# The CUDA path: batch = one by one, CUDA = CPU, resized on the card = resized on the host; model-only rates,
# for images already at 224 px and for particles at their own size (the worker's layout).
step gpu_check 90 python3 bench/gpu_check.py --sizes 224 --batches 128,256,512 --count 2048
# A steady-state import: 30,000 particles (the 4,000 shared ones, turned and mirrored: all new content) read
# where they lie, as beside Label Studio with local-files storage. One worker process per two cores: each
# process's Python (reads, decoding, padding, Redis) feeds the one GPU that all share. One TASKS_CREATED
# webhook carries the whole import, over the default MAX_TASKS_PER_REQUEST.
export WORKER_CONCURRENCY=$(( $(nproc) / 2 )) CHUNK_SIZE=512 BATCH_SIZE=256 MAX_TASKS_PER_REQUEST=50000
step throughput-effnet-224 150 python3 bench/throughput.py --device cuda --image-size 224 --count 30000 \
  --reads direct --skip-baseline --model-passes 2 --json "$OUT/effnet-224.json"
step throughput-resnet50-224 150 env WEIGHTS=/tmp/r50.pth python3 bench/throughput.py --backbone resnet50 \
  --device cuda --image-size 224 --count 30000 --reads direct --skip-baseline --model-passes 2 \
  --json "$OUT/resnet50-224.json"
# One process per core: twice the Python feeding the card (in the 8-process runs each process handled
# 700-870 images/s and half the cores were idle), twice the CUDA contexts taking turns on it; 4 download
# threads a process, enough for files on disk (bench/feed.py), instead of 2 per core in each of 16.
step throughput-resnet50-224-per-core 150 env WEIGHTS=/tmp/r50.pth WORKER_CONCURRENCY=$(nproc) DOWNLOAD_WORKERS=4 \
  python3 bench/throughput.py --backbone resnet50 --device cuda --image-size 224 --count 30000 --reads direct \
  --skip-baseline --model-passes 2 --json "$OUT/resnet50-224-per-core.json"
# Model-only images/s per input size (the GPU column of RESULTS.md "Input size"), when time is left.
step input-size 45 python3 bench/input_size.py --device cuda --speed-only --json "$OUT/input-size.json"
