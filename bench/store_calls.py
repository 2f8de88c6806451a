"""The CPU a worker process spends in the Redis client per task, for the calls a chunk makes for each one:
the content cache (`cache_embeddings`, one SET a particle), its features (`save_embeddings`, one HSETNX a
task) and its prediction (`save_predictions`). On a GPU host this Python runs in the thread that feeds the
card, so its cost per task sets part of the rate (bench/RESULTS.md, *The host side of a GPU worker*).

Real Redis (a database of its own, flushed), the chunk's sizes (batches of 256, commits of 512), float16
features of 1,280 values, best of `--repeat` runs of 4,096 tasks. Which reply parser redis-py uses is printed:
hiredis when installed (it is a dependency), else its own Python one.

    .venv/bin/python bench/store_calls.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis
from redis.utils import HIREDIS_AVAILABLE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.store import Store  # noqa: E402

TASKS, BATCH, COMMIT = 4096, 256, 512


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"))
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    store = Store(client, "bench")
    rng = np.random.default_rng(0)
    blobs = {i: rng.random(1280).astype(np.float16).tobytes() for i in range(TASKS)}
    digests = {i: f"{i:064x}" for i in range(TASKS)}
    refs = {i: f"/data/local-files/?d=flowcam/particles/{i}.png" for i in range(TASKS)}
    choice = {"from_name": "class", "to_name": "image", "type": "choices", "value": {"choices": ["Plankton"]}}
    prediction = {"result": [choice], "score": 0.87, "model_version": "v"}

    def slices(size: int) -> list[list[int]]:
        return [list(range(k, min(k + size, TASKS))) for k in range(0, TASKS, size)]

    def cache() -> None:
        for ids in slices(BATCH):
            store.cached_embeddings([digests[i] for i in ids])
            store.cache_embeddings({digests[i]: blobs[i] for i in ids})

    def features() -> None:
        for ids in slices(COMMIT):
            store.save_embeddings(1, {i: blobs[i] for i in ids}, {i: refs[i] for i in ids}, staging="bench")

    def predictions() -> None:
        for ids in slices(COMMIT):
            store.save_predictions(1, "v", dict.fromkeys(ids, prediction))

    steps: list[tuple[str, Callable[[], None]]] = [
        ("content cache: look up and store (cached_embeddings, cache_embeddings)", cache),
        ("features (save_embeddings)", features),
        ("predictions (save_predictions)", predictions),
    ]
    print(f"redis-py {redis.__version__}, reply parser: {'hiredis' if HIREDIS_AVAILABLE else 'Python (no hiredis)'}")
    total = 0.0
    for name, step in steps:
        best = float("inf")
        for _ in range(args.repeat):
            client.flushdb()
            started = time.process_time()
            step()
            best = min(best, time.process_time() - started)
        total += best / TASKS
        print(f"{name:72s} {best / TASKS * 1e6:6.1f} us of CPU a task")
    print(f"{'all three':72s} {total * 1e6:6.1f} us of CPU a task")
    client.flushdb()
    return 0


if __name__ == "__main__":
    sys.exit(main())
