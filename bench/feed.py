"""How fast one worker process can feed a model that costs nothing: the host side of a GPU worker, measured
on any machine.

On a GPU the card is rarely the limit; the worker process's Python is (bench/RESULTS.md: on an H100 each
process handled 700-870 particles/s while the card waited). This runs the worker's own pipeline in this
process (`EmbeddingPipeline`: reads as Label Studio local files under LOCAL_FILES_DOCUMENT_ROOT, hashing,
decoding, padding to a square at the particle's own size as for a GPU, the content cache in Redis) in
front of a stand-in for the model: each batch gives the GIL back `--launches` times (a CUDA forward pass
launches a kernel per operator, and takes the GIL back after each) and then waits `--card-ms` with the GIL
released, as for the card. Nothing is written back; only the pipeline is timed. Local files have one
read thread of their own in each process: `--download-workers` (DOWNLOAD_WORKERS) sizes only the pool for
network downloads, which these reads no longer use.

    .venv/bin/python bench/feed.py                                   # 4000 particles, 4 download threads
    .venv/bin/python bench/feed.py --download-workers 2,4,8,32 --launches 400 --card-ms 25
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.models import embedding_space  # noqa: E402
from common.settings import Settings  # noqa: E402
from common.store import Store  # noqa: E402
from worker.images import ImageFetcher  # noqa: E402
from worker.pipeline import EmbeddingPipeline  # noqa: E402

DATA = Path(os.environ.get("PLANKTON_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")).resolve()


class StandInModel:
    """Takes the place of `Embedder` (this is not a model): zero features after `launches` small torch
    calls and a wait without the GIL, per batch of `batch_size`."""

    resize_on_device = True  # particles stay at their own size, as on a GPU

    def __init__(self, batch_size: int, image_size: int, launches: int, card_ms: float) -> None:
        self.batch_size, self.image_size, self.launches, self.card_ms = batch_size, image_size, launches, card_ms
        self._x = torch.zeros(4, 4)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        y = self._x
        for _ in range(self.launches):
            y = torch.add(y, 1.0)
        time.sleep(self.card_ms / 1000 * len(images) / self.batch_size)
        return np.zeros((len(images), 1280), np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=4000, help="particles (at most the shared ones)")
    parser.add_argument("--download-workers", default="4", help="comma-separated DOWNLOAD_WORKERS to try")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--launches", type=int, default=0, help="torch calls per batch (a forward pass's kernels)")
    parser.add_argument("--card-ms", type=float, default=0.0, help="wait per full batch, without the GIL")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each setting (the best is printed)")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    particles = sorted((DATA / "flowcam" / "particles").glob("*.png"))[: args.count]
    if not particles:
        raise SystemExit(f"no particles in {DATA / 'flowcam' / 'particles'} (PLANKTON_DATA_DIR)")
    tasks = [{"id": i + 1, "data": {"image": "/data/local-files/?" + urlencode({"d": str(p.relative_to(DATA))})}}
             for i, p in enumerate(particles)]  # fmt: skip
    settings = Settings.from_env({**os.environ, "REDIS_URL": args.redis_url, "LOCAL_FILES_DOCUMENT_ROOT": str(DATA)})
    model = StandInModel(args.batch_size, 224, args.launches, args.card_ms)
    print(f"{len(tasks)} particles read from {DATA} as local files; stand-in model: {args.launches} torch calls")
    print(f"and {args.card_ms} ms without the GIL per batch of {args.batch_size}; {os.cpu_count()} CPU cores")
    for workers in [int(w) for w in args.download_workers.split(",")]:
        rates, cpu = [], []
        for _ in range(args.repeat):
            redis.Redis.from_url(args.redis_url).flushdb()  # every particle new content: no cache hits
            store = Store.from_url(args.redis_url, embedding_space(settings))
            fetcher = ImageFetcher(settings)
            pipeline = EmbeddingPipeline(model, fetcher, store, workers, settings.image_max_pixels)  # type: ignore[arg-type]
            wall, process = time.perf_counter(), time.process_time()
            out = pipeline.run(tasks, "image")
            wall, process = time.perf_counter() - wall, time.process_time() - process
            pipeline.close()
            if out.errors:
                raise SystemExit(f"{len(out.errors)} particles failed, e.g. {next(iter(out.errors.values()))}")
            rates.append(len(out.features) / wall)
            cpu.append(1000 * process / len(tasks))
        best = int(np.argmax(rates))
        print(f"download threads {workers:3d}: {rates[best]:7.0f} particles/s, {cpu[best]:.2f} ms of CPU a particle "
              f"({len(rates)} runs: {', '.join(f'{r:.0f}' for r in rates)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
