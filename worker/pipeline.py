"""Preprocess + inference for a batch of tasks: downloads run in threads and overlap with the forward
pass; image content already embedded (same bytes, same backbone and size) is never embedded again."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.images import ImageError, ImageFetcher, decode_image, image_reference, to_model_input

if TYPE_CHECKING:  # torch stays out of the Celery main process, which never runs the model
    from worker.embedder import Embedder

log = logging.getLogger(__name__)

FEATURE_DTYPE = np.float16


def to_bytes(features: np.ndarray) -> bytes:
    return np.asarray(features, FEATURE_DTYPE).tobytes()


def from_bytes(blobs: Sequence[bytes]) -> np.ndarray:
    return np.stack([np.frombuffer(b, FEATURE_DTYPE) for b in blobs]).astype(np.float32)


@dataclass
class Prepared:
    task_id: int
    ref: str
    digest: str
    pixels: np.ndarray | None = None  # None when the cache had the features
    features: np.ndarray | None = None


@dataclass
class EmbedOutcome:
    features: dict[int, np.ndarray] = field(default_factory=dict)
    refs: dict[int, str] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    computed: int = 0
    cache_hits: int = 0


class EmbeddingPipeline:
    def __init__(self, embedder: Embedder, fetcher: ImageFetcher, store: Any, workers: int, max_pixels: int) -> None:
        self.embedder = embedder
        self.fetcher = fetcher
        self.store = store
        self.max_pixels = max_pixels
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="download")

    def _prepare(self, task: Mapping[str, Any], image_key: str) -> Prepared:
        ref = image_reference(task, image_key)
        data = self.fetcher.fetch(ref)
        digest = hashlib.sha256(data).hexdigest()
        cached = self.store.cached_embedding(digest)
        if cached is not None:
            return Prepared(task["id"], ref, digest, features=from_bytes([cached])[0])
        img = decode_image(data, self.max_pixels)
        return Prepared(task["id"], ref, digest, pixels=to_model_input(img, self.embedder.image_size))

    def run(self, tasks: Sequence[Mapping[str, Any]], image_key: str) -> EmbedOutcome:
        out = EmbedOutcome()
        pending: set[Future[Prepared]] = set()
        owner: dict[Future[Prepared], int] = {}
        for task in tasks:
            fut = self.pool.submit(self._prepare, task, image_key)
            pending.add(fut)
            owner[fut] = task["id"]
        ready: list[Prepared] = []
        first_with: dict[str, int] = {}  # content digest -> the task embedded for it in this run
        copies: dict[int, str] = {}
        batch = self.embedder.batch_size
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                tid = owner.pop(fut)
                try:
                    prepared = fut.result()
                except ImageError as exc:
                    out.errors[tid] = str(exc)
                    continue
                except Exception as exc:  # a bug or an unexpected library error: still only this task
                    log.exception("task %s: unexpected error preparing its image", tid)
                    out.errors[tid] = f"unexpected error: {type(exc).__name__}: {exc}"
                    continue
                out.refs[tid] = prepared.ref
                if prepared.features is not None:
                    out.features[tid] = prepared.features
                    out.cache_hits += 1
                elif prepared.digest in first_with:
                    copies[tid] = prepared.digest
                    out.cache_hits += 1
                else:
                    first_with[prepared.digest] = tid
                    ready.append(prepared)
            # The forward pass runs while the remaining downloads go on in their threads.
            while len(ready) >= batch or (ready and not pending):
                self._embed(ready[:batch], out)
                ready = ready[batch:]
        for tid, digest in copies.items():
            out.features[tid] = out.features[first_with[digest]]
        return out

    def _embed(self, items: list[Prepared], out: EmbedOutcome) -> None:
        features = self.embedder.embed([p.pixels for p in items])
        fresh: dict[str, bytes] = {}
        for prepared, vec in zip(items, features, strict=True):
            out.features[prepared.task_id] = vec
            fresh[prepared.digest] = to_bytes(vec)
        self.store.cache_embeddings(fresh)
        out.computed += len(items)
