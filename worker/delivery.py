"""The deliverer: writes a project's outbox to Label Studio in bulk, exactly once per task and version.

One deliverer per project runs at a time (a leased lock). For each due entry of the current version it
claims the task (HSETNX `writing`), writes the batch with one request, and marks what Label Studio stored
as `written`. A write whose outcome is unknown (a timeout, a worker killed mid-request) leaves `writing`
claims behind; the next attempt first asks Label Studio which of those tasks hold the version, and writes
only the others. While Label Studio fails, the entries stay in the outbox and are retried with backoff,
however long it takes; entries of a superseded version are dropped (its successor's are staged).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from common.delivery import BY_API, REFUSED, WRITING, WRITTEN
from worker import metrics
from worker.label_studio import LabelStudioApi, is_transient, missing_task_error
from worker.runtime import Runtime

log = logging.getLogger(__name__)

LOCK_LEASE = 30.0
BACKOFF_CAP = 60.0
# While an import is being embedded, a partial write waits until it is this many times older than Label
# Studio's last write took (at least DELIVER_LINGER_SECONDS, at most MAX_LINGER): Label Studio then spends at
# most about a tenth of the import on the fixed cost of our requests, whatever the project's size.
LINGER_PER_WRITE_SECOND = 10.0
MAX_LINGER = 60.0


def linger_for(settings_linger: float, last_write: float) -> float:
    if settings_linger <= 0:
        return 0.0
    return min(MAX_LINGER, max(settings_linger, LINGER_PER_WRITE_SECOND * last_write))


def backoff(attempt: int) -> float:
    return min(BACKOFF_CAP, 2.0 ** max(0, attempt - 1))


def deliver_outbox(rt: Runtime, pid: int) -> dict[str, Any]:
    api = rt.label_studio
    if api is None:
        return {"status": "no Label Studio configured"}
    written, later = 0, None
    while True:
        with rt.store.lock(pid, "deliver", lease=LOCK_LEASE) as held:
            if not held:
                # The holder looks at the outbox again after releasing the lock: it will see our entries.
                return {"status": "another deliverer is running", "written": written}
            n, later = _drain(rt, api, pid)
            written += n
        if later is not None or not rt.store.delivery.due(pid, time.time(), 1):
            break
    if later is not None:
        rt.dispatcher.deliver(pid, countdown=max(0.5, later - time.time()))
    return {"status": "again later" if later else "done", "written": written}


def _drain(rt: Runtime, api: LabelStudioApi, pid: int) -> tuple[int, float | None]:
    """Write due entries until none is left; returns how many were written, and when to come back: Label
    Studio failed (backoff), or too few are due for a full write yet (DELIVER_LINGER_SECONDS)."""
    store, outbox = rt.store, rt.store.delivery
    batch = rt.settings.deliver_batch_size
    linger = linger_for(rt.settings.deliver_linger_seconds, outbox.last_write_seconds(pid))
    total = 0
    while True:
        version = store.current_version(pid)
        now = time.time()
        coming = more_on_its_way(rt, pid, now, linger)  # first: what a chunk staged before it said so is read next
        entries = outbox.due(pid, now, batch)
        if not entries:
            return total, None
        oldest = outbox.next_due(pid) or now
        if len(entries) < batch and now - oldest < linger and coming:
            # A fuller write a moment later costs Label Studio less: its cost per request grows with the
            # project's size.
            return total, oldest + linger
        tasks = outbox.drop_versions_except(pid, version, entries)
        annotated = store.annotated_tasks(pid)
        predictions = store.predictions(pid, version, [t for t in tasks if t not in annotated])
        claims = outbox.claims(pid, version, predictions)
        settled = [t for t in tasks if t not in predictions or claims.get(t, ("",))[0] in (WRITTEN, BY_API, REFUSED)]
        outbox.done(pid, [(t, version) for t in settled])
        todo: dict[int, dict[str, Any]] = {}
        try:
            unsure = [t for t, (state, _) in claims.items() if state == WRITING]
            held = api.tasks_holding(pid, version, unsure) if unsure else set()
            outbox.set(pid, version, held, WRITTEN)
            outbox.done(pid, [(t, version) for t in held])
            fresh = outbox.claim_many(pid, version, [t for t in predictions if t not in claims], WRITING)
            todo = {t: predictions[t] for t in [*fresh, *(set(unsure) - held)]}
            if not todo:
                continue
            started = time.perf_counter()
            created = api.import_predictions(pid, version, todo)
            took = time.perf_counter() - started
        except Exception as exc:
            if missing_task_error(exc):
                _forget_deleted(rt, api, pid, version, list(todo))
                continue
            attempt = outbox.failed_attempt(pid)
            wait = backoff(attempt)
            pending = [(t, version) for t in tasks if t not in settled]
            outbox.postpone(pid, pending, time.time() + wait)
            metrics.WRITEBACK_FAILURES.labels("transient" if is_transient(exc) else "error").inc()
            metrics.WRITEBACK_RETRIES.inc(len(pending))
            level = logging.WARNING if is_transient(exc) else logging.ERROR
            log.log(level, "project %s: writing %d predictions to Label Studio failed (attempt %d, again in %.0f s): "
                    "%s: %s", pid, len(pending), attempt, wait, type(exc).__name__, str(exc)[:300])  # fmt: skip
            return total, time.time() + wait
        outbox.succeeded(pid, took)
        stored = set(todo) if created == len(todo) else api.tasks_holding(pid, version, todo)
        outbox.set(pid, version, stored, WRITTEN)
        refused = [t for t in todo if t not in stored]
        if refused:
            _report_refused(rt, pid, version, refused)
        outbox.done(pid, [(t, version) for t in todo])
        log.info("project %s: %d predictions of %s written to Label Studio in %.2f s", pid, len(stored), version, took)
        total += len(stored)
        metrics.WRITEBACK.labels("written").inc(len(stored))
        metrics.WRITEBACK.labels("refused").inc(len(refused))


def more_on_its_way(rt: Runtime, pid: int, now: float, linger: float) -> bool:
    """Tasks of the project are queued for embedding, or a chunk has stored features and not yet staged their
    predictions, and the workers are taking chunks. Tasks queued behind a retry's backoff, or whose message
    is lost, are no reason to hold back what is ready."""
    store = rt.store
    if now - store.last_ingest_progress() >= linger:
        return False
    return store.pending_count(pid) > 0 or store.staging_chunks(pid, now) > 0


def _forget_deleted(rt: Runtime, api: LabelStudioApi, pid: int, version: str, tasks: list[int]) -> None:
    """Tasks deleted in Label Studio while their predictions waited: forget them, write the others."""
    gone = set(tasks) - api.existing_tasks(pid, tasks)
    if gone:
        log.info("project %s: %d tasks were deleted in Label Studio; forgotten", pid, len(gone))
        rt.store.forget_tasks(pid, gone)
    rt.store.delivery.release(pid, version, set(tasks) - gone)


def _report_refused(rt: Runtime, pid: int, version: str, tasks: list[int]) -> None:
    reason = "Label Studio refused the prediction (is it valid for the project's label config?)"
    rt.store.delivery.set(pid, version, tasks, REFUSED)
    for pair, job_id in rt.store.delivery.jobs_of(pid, [(t, version) for t in tasks]).items():
        rt.store.jobs.progress(job_id, errors={pair[0]: reason})
    log.error("project %s: %s, for tasks %s", pid, reason, tasks[:20])
