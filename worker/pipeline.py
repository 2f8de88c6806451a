"""Preprocess + inference for a batch of tasks: downloads run in threads and overlap with the forward
pass; image content already embedded (same bytes, same backbone and size) is never embedded again."""

from __future__ import annotations

import hashlib
import logging
import queue
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from worker import metrics
from worker.images import ImageError, ImageFetcher, decode_image, image_reference, to_model_input

if TYPE_CHECKING:  # torch stays out of the Celery main process, which never runs the model
    from worker.embedder import Embedder

log = logging.getLogger(__name__)

FEATURE_DTYPE = np.float16

# Images read from this host's disk are prepared by one thread (READ_WORKERS), this many in a row, handed
# back as one future. Reading, decoding and padding a particle is Python that holds the GIL: one future a
# particle woke the model's thread for nearly every particle, and more threads only took turns with the GIL
# at each system call (one process: 0.50 ms of CPU a particle with one download thread and 0.70 with four,
# against 0.21 ms for the same steps in a plain loop; bench/RESULTS.md, *The host side of a GPU worker*).
# Downloads over the network, which wait, run DOWNLOAD_WORKERS at a time, one a future; so does a file the
# read thread did not find on this disk (fetched from Label Studio then, as on a host without the folder).
LOCAL_GROUP = 16


def to_bytes(features: np.ndarray) -> bytes:
    return np.asarray(features, FEATURE_DTYPE).tobytes()


def from_bytes(blobs: Sequence[bytes]) -> np.ndarray:
    return np.stack([np.frombuffer(b, FEATURE_DTYPE) for b in blobs]).astype(np.float32)


@dataclass
class Prepared:
    task_id: int
    ref: str
    digest: str
    pixels: np.ndarray


@dataclass
class EmbedOutcome:
    features: dict[int, np.ndarray] = field(default_factory=dict)
    refs: dict[int, str] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    transient: set[int] = field(default_factory=set)  # of `errors`: those worth retrying later
    computed: int = 0
    cache_hits: int = 0
    # Tasks not embedded because the run was asked to stop (their downloads, if any, are dropped).
    unstarted: list[Mapping[str, Any]] = field(default_factory=list)

    def merge(self, other: EmbedOutcome) -> None:
        self.features.update(other.features)
        self.refs.update(other.refs)
        self.errors.update(other.errors)
        self.transient |= other.transient
        self.computed += other.computed
        self.cache_hits += other.cache_hits
        self.unstarted.extend(other.unstarted)

    def __len__(self) -> int:
        """Tasks settled (embedded, from the cache, or failed)."""
        return len(self.features) + len(self.errors)


class EmbeddingPipeline:
    """Downloads and decodes in threads, a few batches ahead of the model, so that the forward pass
    never waits for the network once the first batch is in; the model runs in the calling thread. Local
    files (`ImageFetcher.reads_locally`) go to `read_workers` threads of their own, the rest to `workers`."""

    def __init__(
        self,
        embedder: Embedder,
        fetcher: ImageFetcher,
        store: Any,
        workers: int,
        max_pixels: int,
        lookahead_batches: int = 3,
        read_workers: int = 1,
    ) -> None:
        self.embedder = embedder
        self.fetcher = fetcher
        self.store = store
        self.max_pixels = max_pixels
        self.lookahead = max(1, lookahead_batches) * embedder.batch_size
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="download")
        self.local_pool = ThreadPoolExecutor(max_workers=max(1, read_workers), thread_name_prefix="read")

    def close(self) -> None:
        self.pool.shutdown()
        self.local_pool.shutdown()

    def _local(self, task: Mapping[str, Any], image_key: str) -> bool:
        try:
            return self.fetcher.reads_locally(image_reference(task, image_key))
        except ImageError:
            return False  # fails in a download thread like any other

    def _prepare_group(
        self, tasks: Sequence[Mapping[str, Any]], image_key: str, disk_only: bool
    ) -> list[Prepared | Exception | None]:
        """Each task's image prepared, or the exception that stopped it (the others go on); with `disk_only`,
        None for a file not on this disk."""
        out: list[Prepared | Exception | None] = []
        for task in tasks:
            try:
                out.append(self._prepare(task, image_key, disk_only))
            except Exception as exc:
                out.append(exc)
        return out

    def _prepare(self, task: Mapping[str, Any], image_key: str, disk_only: bool) -> Prepared | None:
        """Read or download, hash, decode and preprocess, in a read or download thread. The content cache is
        asked later, once per batch: most images of an import are new, and one Redis call per image cost
        more than decoding the few that turn out to be cached."""
        ref = image_reference(task, image_key)
        with metrics.DOWNLOAD_SECONDS.time():
            data = self.fetcher.read_from_disk(ref) if disk_only else self.fetcher.fetch(ref)
        if data is None:
            return None
        digest = hashlib.sha256(data).hexdigest()
        limits = self.fetcher.settings  # IMAGE_MAX_SIDE, IMAGE_MAX_ASPECT (IMAGE_MAX_PIXELS is max_pixels)
        img = decode_image(data, self.max_pixels, max_side=limits.image_max_side, max_aspect=limits.image_max_aspect)
        pixels = to_model_input(img, self.embedder.image_size, resize=not self.embedder.resize_on_device)
        return Prepared(task["id"], ref, digest, pixels=pixels)

    def run(self, tasks: Sequence[Mapping[str, Any]], image_key: str) -> EmbedOutcome:
        out = EmbedOutcome()
        for part in self.stream(tasks, image_key):
            out.merge(part)
        return out

    def stream(
        self, tasks: Sequence[Mapping[str, Any]], image_key: str, stop: Callable[[], bool] | None = None
    ) -> Iterator[EmbedOutcome]:
        """Yields what each model batch settled (and the cache hits and failures that came in meanwhile).

        `stop` is asked after every batch: when it says yes, the rest of `tasks` is yielded as
        `unstarted`, within one batch of the question, so that waiting interactive work can go first.
        """
        run = _Run(tasks, self.store)
        batch = self.embedder.batch_size

        def submit(pool: ThreadPoolExecutor, group: list[Mapping[str, Any]]) -> None:
            fut = pool.submit(self._prepare_group, group, image_key, pool is self.local_pool)
            run.in_flight[fut] = [t["id"] for t in group]
            run.flying += len(group)
            fut.add_done_callback(run.completed.put)

        def top_up() -> None:
            local: list[Mapping[str, Any]] = []
            while run.flying + len(local) + len(run.fresh) + len(run.ready) < self.lookahead:
                task = next(run.todo, None)
                if task is None:
                    break
                if not self._local(task, image_key):
                    submit(self.pool, [task])
                    continue
                local.append(task)
                if len(local) == LOCAL_GROUP:
                    submit(self.local_pool, local)
                    local = []
            if local:
                submit(self.local_pool, local)

        top_up()
        while run.in_flight or run.fresh or run.ready:
            if run.in_flight and len(run.fresh) + len(run.ready) < batch:
                for task in run.settle_completed():
                    submit(self.pool, [task])
                top_up()
                continue
            run.check_cache()
            if len(run.ready) >= batch or (run.ready and not run.in_flight):
                items, run.ready = run.ready[:batch], run.ready[batch:]
                self._embed(items, run)
                top_up()  # before yielding: the downloads go on while the caller stores this part
                yield run.take_part()
                if stop is not None and (run.in_flight or run.fresh or run.ready) and stop():
                    yield run.abandon()
                    return
        if len(run.part):
            yield run.take_part()

    def _embed(self, items: list[Prepared], run: _Run) -> None:
        started = time.perf_counter()
        with metrics.MODEL_SECONDS.time():
            features = self.embedder.embed([p.pixels for p in items])
        fresh: dict[str, bytes] = {}
        for prepared, vec in zip(items, features, strict=True):
            run.embedded(prepared, vec)
            fresh[prepared.digest] = to_bytes(vec)
        self.store.cache_embeddings(fresh)
        run.part.computed += len(items)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)


class _Run:
    """The state of one `EmbeddingPipeline.stream`: what is downloading, what waits for the cache or the
    model, and which tasks share content with one embedded in this run."""

    def __init__(self, tasks: Sequence[Mapping[str, Any]], store: Any) -> None:
        self.store = store
        self.todo = iter(tasks)
        self.by_id = {t["id"]: t for t in tasks}
        self.in_flight: dict[Future[list[Prepared | Exception | None]], list[int]] = {}  # a group -> its tasks
        self.flying = 0  # tasks in `in_flight`
        self.completed: queue.SimpleQueue[Future[list[Prepared | Exception | None]]] = queue.SimpleQueue()
        self.fresh: list[Prepared] = []  # decoded, not yet looked up in the content cache
        self.ready: list[Prepared] = []  # not in the cache: for the model
        self.first_with: dict[str, int] = {}  # content digest -> the task embedded for it in this run
        self.vectors: dict[str, np.ndarray] = {}  # digest -> features, once known in this run
        self.copies: dict[str, list[tuple[int, str]]] = {}  # digest -> (task, ref) waiting for its first
        self.part = EmbedOutcome()

    def settle_completed(self) -> list[Mapping[str, Any]]:
        """Wait for one group of downloads to finish, then take every other finished one too. Returns the
        tasks whose files a read thread did not find on this disk: to be downloaded."""
        futures = [self.completed.get()]
        while True:
            try:
                futures.append(self.completed.get_nowait())
            except queue.Empty:
                break
        elsewhere = []
        for fut in futures:
            tids = self.in_flight.pop(fut)
            self.flying -= len(tids)
            for tid, result in zip(tids, fut.result(), strict=True):
                if result is None:
                    elsewhere.append(self.by_id[tid])
                else:
                    self.settle(tid, result)
        return elsewhere

    def settle(self, tid: int, prepared: Prepared | Exception) -> None:
        part = self.part
        if isinstance(prepared, ImageError):
            part.errors[tid] = str(prepared)
            if prepared.transient:
                part.transient.add(tid)
            return
        if isinstance(prepared, Exception):  # a bug or an unexpected library error: still only this task
            log.error("task %s: unexpected error preparing its image", tid, exc_info=prepared)
            part.errors[tid] = f"unexpected error: {type(prepared).__name__}: {prepared}"
            return
        if prepared.digest in self.vectors:
            part.refs[tid] = prepared.ref
            part.features[tid] = self.vectors[prepared.digest]
            part.cache_hits += 1
        elif prepared.digest in self.first_with:
            self.copies.setdefault(prepared.digest, []).append((tid, prepared.ref))
        else:
            self.first_with[prepared.digest] = tid
            self.fresh.append(prepared)

    def check_cache(self) -> None:
        """One Redis call for everything decoded since the last: hits are settled, the rest go to the model."""
        if not self.fresh:
            return
        fresh, self.fresh = self.fresh, []
        for prepared, blob in zip(fresh, self.store.cached_embeddings([p.digest for p in fresh]), strict=True):
            if blob is None:
                self.ready.append(prepared)
            else:
                self.embedded(prepared, from_bytes([blob])[0])
                self.part.cache_hits += 1

    def embedded(self, prepared: Prepared, vec: np.ndarray) -> None:
        self.vectors[prepared.digest] = vec
        self.part.features[prepared.task_id] = vec
        self.part.refs[prepared.task_id] = prepared.ref
        for tid, ref in self.copies.pop(prepared.digest, []):
            self.part.features[tid] = vec
            self.part.refs[tid] = ref
            self.part.cache_hits += 1

    def take_part(self) -> EmbedOutcome:
        part, self.part = self.part, EmbedOutcome()
        return part

    def abandon(self) -> EmbedOutcome:
        """Drop the downloads in progress; everything not settled goes back as `unstarted`."""
        for fut in self.in_flight:
            fut.cancel()
        wait(self.in_flight)
        part = self.take_part()
        waiting = [t for tids in self.in_flight.values() for t in tids]
        waiting += [p.task_id for p in (*self.fresh, *self.ready)]
        waiting += [tid for pairs in self.copies.values() for tid, _ in pairs]
        part.unstarted = [self.by_id[t] for t in waiting] + list(self.todo)
        return part
