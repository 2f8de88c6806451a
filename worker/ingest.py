"""A chunk of tasks: embed the images (streamed, a few batches at a time), store the features, predict the
unannotated tasks with the version current once they are stored, and stage the predictions for Label
Studio. A bulk chunk gives way to interactive work after the batch in progress.

Failures: an image that cannot be used fails its task with a reason (job, log, project state) and the rest
of the chunk goes on; a failure that may pass (the image server or Label Studio briefly away) is retried
in a new message with backoff, then left to the periodic reconciliation.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.label_config import LabelConfigError
from worker import metrics
from worker.pipeline import EmbedOutcome, to_bytes
from worker.predicting import predict_current, settle_import, stored_features
from worker.refitting import needs_refit
from worker.runtime import Runtime

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 6  # transient failures: retried after 2, 4, 8, 16, 32 s


def ingest_chunk(
    rt: Runtime, pid: int, tasks: Sequence[Mapping[str, Any]], job_id: str | None, interactive: bool, attempt: int
) -> dict[str, int]:
    started = time.perf_counter()
    store = rt.store
    ids = [t["id"] for t in tasks]
    try:
        config = rt.label_config(pid)
    except (LookupError, LabelConfigError) as exc:
        store.record_failures(pid, dict.fromkeys(ids, str(exc)), transient=ids, job_id=job_id)
        store.jobs.progress(job_id, errors=dict.fromkeys(ids, str(exc)))
        log.warning("project %s: %d tasks not embedded: %s", pid, len(ids), exc)
        return {"done": 0, "failed": len(ids)}
    known = stored_features(rt, pid, ids)  # a message run again after a crash
    hold = rt.settings.predict_wait_seconds + 1 if interactive else 0.0
    chunk = _Chunk(rt, pid, job_id, hold, interactive)
    chunk.commit(EmbedOutcome(), known)
    pending = EmbedOutcome()
    stop = None if interactive else rt.interactive_waiting
    for part in rt.pipeline.stream([t for t in tasks if t["id"] not in known], config.image_key, stop):
        pending.merge(part)
        if len(pending) >= 4 * rt.embedder.batch_size:
            chunk.commit(pending)
            pending = EmbedOutcome()
    chunk.commit(pending)
    by_id = {t["id"]: t for t in tasks}
    if chunk.unstarted:
        rt.dispatcher.ingest(pid, chunk.unstarted, job_id=job_id, requeue=True)
        log.info("project %s: interactive work waiting, %d tasks back to the bulk queue", pid, len(chunk.unstarted))
    if chunk.retry:
        _retry_later(rt, pid, [by_id[t] for t in chunk.retry], chunk.retry, job_id, attempt)
    if chunk.annotated_embedded and needs_refit(rt, pid):
        rt.dispatcher.after_labels_changed(pid)
    settle_import(rt, pid)
    metrics.CHUNK_SECONDS.observe(time.perf_counter() - started)
    settled = len(ids) - len(chunk.unstarted)
    log.info("project %s: %d tasks, %d embedded, %d from cache, %d failed, %d to retry", pid, settled,
             chunk.computed, chunk.cache_hits, chunk.failed, len(chunk.retry))  # fmt: skip
    return {"done": chunk.done, "failed": chunk.failed}


class _Chunk:
    def __init__(self, rt: Runtime, pid: int, job_id: str | None, hold: float, interactive: bool) -> None:
        self.rt, self.pid, self.job_id, self.hold, self.interactive = rt, pid, job_id, hold, interactive
        self.done = self.failed = self.computed = self.cache_hits = 0
        self.retry: dict[int, str] = {}
        self.unstarted: list[Mapping[str, Any]] = []
        self.annotated_embedded = False
        self.token = uuid.uuid4().hex  # counted as staging between storing features and staging predictions

    def commit(self, outcome: EmbedOutcome, known: Mapping[int, np.ndarray] | None = None) -> None:
        """Store what part of the chunk settled: features, failures, predictions, job progress."""
        store = self.rt.store
        store.note_ingest_progress()
        features = {**(known or {}), **outcome.features}
        blobs = {t: to_bytes(v) for t, v in outcome.features.items()}
        stored = store.save_embeddings(self.pid, blobs, outcome.refs, staging=self.token)
        store.unmark_pending(self.pid, known or {}, staging=self.token)
        try:
            if raced := [t for t in outcome.features if t not in stored]:
                features.update(stored_features(self.rt, self.pid, raced))  # another chunk stored them first
            self._count(outcome, len(known or {}))
            permanent = {t: e for t, e in outcome.errors.items() if t not in outcome.transient}
            transient = {t: e for t, e in outcome.errors.items() if t in outcome.transient}
            self.retry.update(transient)
            store.jobs.progress(self.job_id, errors={t: f"{e} (trying again)" for t, e in transient.items()})
            if permanent:
                store.record_failures(self.pid, permanent, job_id=self.job_id)
                store.jobs.progress(self.job_id, errors=permanent)
                for tid, reason in permanent.items():
                    log.warning("project %s task %s failed: %s", self.pid, tid, reason)
            if features:
                predict_current(self.rt, self.pid, features, job_id=self.job_id, hold=self.hold,
                                annotated_too=self.interactive, staging=self.token)  # fmt: skip
                store.jobs.progress(self.job_id, done=features)
                if outcome.features and store.annotations(self.pid, outcome.features):
                    self.annotated_embedded = True
        finally:
            if blobs or known:
                store.done_staging(self.pid, self.token)  # when nothing was staged (held back, all annotated)
        self.done += len(features)
        self.failed += len(permanent)
        self.computed += outcome.computed
        self.cache_hits += outcome.cache_hits + len(known or {})
        self.unstarted += outcome.unstarted

    @staticmethod
    def _count(outcome: EmbedOutcome, known: int) -> None:
        metrics.IMAGES.labels("embedded").inc(outcome.computed)
        metrics.IMAGES.labels("cached").inc(outcome.cache_hits + known)
        metrics.IMAGES.labels("failed").inc(len(outcome.errors))
        for reason in outcome.errors.values():
            metrics.IMAGE_FAILURES.labels(metrics.failure_reason(reason)).inc()


def _retry_later(
    rt: Runtime, pid: int, tasks: list[Mapping[str, Any]], reasons: Mapping[int, str], job_id: str | None, attempt: int
) -> None:
    if attempt + 1 < MAX_ATTEMPTS:
        wait = 2.0 ** (attempt + 1)
        rt.dispatcher.ingest(pid, tasks, job_id=job_id, requeue=True, countdown=wait, attempt=attempt + 1)
        log.info("project %s: %d tasks failed for now (%s); again in %.0f s", pid, len(tasks),
                 next(iter(reasons.values())), wait)  # fmt: skip
        return
    # Given up for now: the reason is reported, and the periodic reconciliation tries again.
    rt.store.record_failures(pid, reasons, transient=reasons, job_id=job_id)
    rt.store.jobs.progress(job_id, errors=reasons)
    for tid, reason in reasons.items():
        log.warning("project %s task %s failed %d times: %s", pid, tid, MAX_ATTEMPTS, reason)
