"""The deliverer: makes Label Studio hold, for every task, exactly one prediction of the live version, with the
current model's answer, in bulk.

One deliverer per project runs at a time (a leased lock). For each due entry of the current version it
claims the task (HSETNX `writing`), writes the batch with one request, and marks what Label Studio stored
as `written` (and, in `keys.shown`, whose answer it now shows). A task that already shows an older answer is
revised: its prediction is replaced (common/revisions.py decides which tasks need it). A write whose outcome
is unknown (a timeout, a worker killed mid-request) leaves `writing` claims behind; the next attempt first
lists those tasks in Label Studio and writes only where the answer is not there. While Label Studio fails,
the entries stay in the outbox and are retried with backoff, however long it takes; entries of a superseded
version are dropped (its successor stages what it changes).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from common.delivery import BY_API, REFUSED, WRITING, WRITTEN
from common.revisions import NEXT_OUT, handed_out_order, labels_digest, misleads, relabels, shown_as
from common.store import ours
from worker import metrics
from worker.label_studio import LabelStudioApi, Row, is_transient, missing_task_error
from worker.predicting import restage
from worker.runtime import Runtime
from worker.showing import switch_when_complete

log = logging.getLogger(__name__)

LOCK_LEASE = 30.0
BACKOFF_CAP = 60.0
# While an import is being embedded, a partial write waits until it is this many times older than Label
# Studio's last write took (at least DELIVER_LINGER_SECONDS, at most MAX_LINGER): Label Studio then spends at
# most about a tenth of the import on the fixed cost of our requests, whatever the project's size.
LINGER_PER_WRITE_SECOND = 10.0
MAX_LINGER = 60.0
# Revisions (tasks whose answer changed) per request, and the share of Label Studio's time they may take while
# more are due: after a revision write of T seconds, the next waits T (1 - share) / share. Deleting a
# prediction costs Label Studio about 10 ms whatever the batch (a receiver per row, bench/RESULTS.md), and on
# SQLite its delete holds the database's write lock throughout: 20 keep that near 0.2 s (0.5 s when Label
# Studio is busy), well under the 5 s another writer waits before failing. At 50, an annotator's next-task
# call failed once in a 20,000-task project ("database is locked").
REVISION_BATCH = 20
REVISION_SHARE = 0.5
# Once no version has been published for this long (nobody annotating), revisions take a larger share of Label
# Studio's time, in larger requests: a revision's fixed cost is spread over more rows (at 20,000 tasks, 15 ms of
# its CPU a row at 20 a request, 12.7 at 100; `bench/ls_prediction_api.py --revise-sizes`), and a delete of 100
# holds SQLite's write lock about a second, still well under the 5 s a person's next task would wait for it.
QUIET_AFTER_SECONDS = 60.0
QUIET_REVISION_SHARE = 0.9
QUIET_REVISION_BATCH = 100


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
        return {"status": "again later", "written": written}
    return {"status": "done", "written": written, "live_version_shown": switch_when_complete(rt, api, pid)}


def _drain(rt: Runtime, api: LabelStudioApi, pid: int) -> tuple[int, float | None]:
    """Write due entries until none is left; returns how many were written, and when to come back: Label
    Studio failed (backoff), too few are due for a full write yet (DELIVER_LINGER_SECONDS), or a revision was
    written and Label Studio gets a pause as long as it took before the next (REVISION_SHARE)."""
    store, outbox = rt.store, rt.store.delivery
    batch = rt.settings.deliver_batch_size
    linger = linger_for(rt.settings.deliver_linger_seconds, outbox.last_write_seconds(pid))
    live = store.live_version()
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
        shown = store.shown(pid, predictions)
        claims = outbox.claims(pid, version, predictions)
        settled = [
            t
            for t in tasks
            if t not in predictions
            or claims.get(t, ("",))[0] in (WRITTEN, BY_API, REFUSED)
            or (t not in claims and not misleads(predictions[t], shown.get(t)))
        ]
        outbox.done(pid, [(t, version) for t in settled])
        quiet = is_quiet(rt, pid)
        todo = _within_revision_batch(
            [t for t in tasks if t not in settled], shown, QUIET_REVISION_BATCH if quiet else REVISION_BATCH
        )
        if not todo:
            continue
        try:
            took, stored = _write(rt, api, pid, version, live, {t: predictions[t] for t in todo}, shown, claims)
        except Exception as exc:
            if missing_task_error(exc):
                _forget_deleted(rt, api, pid, version, todo)
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
        refused = [t for t in todo if t not in stored]
        if refused:
            _report_refused(rt, pid, version, refused)
        outbox.done(pid, [(t, version) for t in todo])
        revised = sum(1 for t in stored if t in shown)
        relabelled = sum(1 for t in stored if t in shown and relabels(predictions[t], shown[t]))
        log.info("project %s: %d predictions of %s written to Label Studio as %s (%d revised: %d for their labels, "
                 "%d for their score) in %.2f s", pid, len(stored), version, live, revised, relabelled,
                 revised - relabelled, took)  # fmt: skip
        total += len(stored)
        metrics.WRITEBACK.labels("written").inc(len(stored) - revised)
        metrics.WRITEBACK.labels("revised").inc(revised)
        metrics.WRITEBACK.labels("refused").inc(len(refused))
        if store.current_version(pid) != version:
            # A version published while this one was written may have compared itself with what Label Studio
            # showed before: compare again for what was written.
            restage(rt, pid, stored)
        if revised and outbox.due(pid, time.time(), 1):
            share = QUIET_REVISION_SHARE if quiet else REVISION_SHARE
            return total, time.time() + took * (1 - share) / share


def is_quiet(rt: Runtime, pid: int) -> bool:
    """No version published for QUIET_AFTER_SECONDS: nobody is annotating, and revisions may take more of
    Label Studio's time (the suggestions converge sooner) in larger requests; while annotators work, their own
    requests come first."""
    created = float(rt.store.version_meta(pid, rt.store.current_version(pid)).get("created", 0))
    return time.time() - created >= QUIET_AFTER_SECONDS


def _within_revision_batch(todo: list[int], shown: dict[int, Any], limit: int) -> list[int]:
    """The entries to write now, in order: every new one, and at most `limit` revisions (each costs Label
    Studio a listing, a delete and a write: a smaller request leaves its other users a turn sooner)."""
    kept, revisions = [], 0
    for task in todo:
        if task in shown:
            if revisions == limit:
                continue
            revisions += 1
        kept.append(task)
    return kept


def _write(
    rt: Runtime,
    api: LabelStudioApi,
    pid: int,
    version: str,
    live: str,
    predictions: dict[int, dict[str, Any]],
    shown: dict[int, Any],
    claims: dict[int, tuple[str, float]],
) -> tuple[float, set[int]]:
    """Make Label Studio hold exactly one prediction of `live` per task, with `version`'s answer; returns the
    request's time and the tasks that now hold it.

    A task that shows an older answer (or whose last write's outcome is unknown) is listed first: a
    prediction of `live` already matching is kept; otherwise its predictions go (all of them in one
    request, when every one is ours; one by one, ours only, when another model's or a person's is there) and
    the new one is written with the others in one request. The tasks Label Studio hands out next whose one
    prediction is ours have it changed in place instead (common/revisions.py NEXT_OUT)."""
    outbox = rt.store.delivery
    unsure = {t for t, (state, _) in claims.items() if state == WRITING}
    listed = api.rows(pid, [t for t in predictions if t in shown or t in unsure])
    already = {t for t in unsure if _holds(listed.get(t, []), live, predictions[t])}
    outbox.set(pid, version, already, WRITTEN)
    rt.store.set_shown(pid, {t: shown_as(version, predictions[t]) for t in already})
    fresh = outbox.claim_many(pid, version, [t for t in predictions if t not in claims], WRITING)
    todo = {t: predictions[t] for t in [*fresh, *(unsure - already)]}
    if not todo:
        return 0.0, already
    whole = [t for t in todo if listed.get(t) and all(ours(row.model_version) for row in listed[t])]
    partly = [row.id for t in todo if t not in whole for row in listed.get(t, []) if ours(row.model_version)]
    in_place = _handed_out_next(rt, pid, [t for t in whole if len(listed[t]) == 1])
    bulk = {t: p for t, p in todo.items() if t not in in_place}
    started = time.perf_counter()
    for task in sorted(in_place):
        api.replace_prediction(listed[task][0].id, live, todo[task])
    api.delete_task_predictions(pid, [t for t in whole if t not in in_place])
    for row_id in partly:
        api.delete_prediction(row_id)
    created = api.import_predictions(pid, live, bulk) if bulk else 0
    took = time.perf_counter() - started
    rt.store.delivery.succeeded(pid, took)
    if created == len(bulk):
        stored = set(todo)
    else:
        held = api.rows(pid, todo)
        stored = {t for t in todo if _holds(held.get(t, []), live, todo[t])}
    handed = [t for t, (state, _) in outbox.claims(pid, version, stored).items() if state == BY_API]
    if handed:
        _remove_second_copies(api, pid, live, handed)
    outbox.set(pid, version, stored, WRITTEN)
    rt.store.set_shown(pid, {t: shown_as(version, todo[t]) for t in stored})
    return took, stored | already


def _handed_out_next(rt: Runtime, pid: int, tasks: list[int]) -> set[int]:
    """Those of `tasks` that Label Studio hands out next (the first NEXT_OUT by its sequential and by its
    uncertainty sampling, among the unannotated tasks it shows a prediction of ours for)."""
    if not tasks:
        return set()
    annotated = rt.store.annotated_tasks(pid)
    shown = {t: s for t, s in rt.store.shown(pid).items() if t not in annotated}
    return set(tasks).intersection(handed_out_order(shown, NEXT_OUT))


def _remove_second_copies(api: LabelStudioApi, pid: int, live: str, tasks: list[int]) -> None:
    """/predict handed these tasks over while this write was under way: Label Studio may hold two copies."""
    for rows in api.rows(pid, tasks).values():
        for row in sorted((r for r in rows if r.model_version == live), key=lambda r: r.id)[1:]:
            api.delete_prediction(row.id)


def _holds(rows: list[Row], live: str, prediction: dict[str, Any]) -> bool:
    """Exactly one prediction of `live`, and it is this one (its labels, its score)."""
    mine = [row for row in rows if row.model_version == live]
    return (
        len(mine) == 1
        and labels_digest({"result": mine[0].result}) == labels_digest(prediction)
        and abs(mine[0].score - float(prediction["score"])) < 1e-3
    )


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
