"""Reconciliation with Label Studio, and the periodic checks that restart stalled work.

Label Studio sends each webhook once and never again: a backend that was down during an import, or while
people annotated, would never hear of those events. The sweep compares what Label Studio holds (tasks,
annotations, predictions, the label config; SDK, paginated) with what the backend knows, and fixes every
gap: new tasks are embedded, deleted ones forgotten, annotations learned, predictions Label Studio lacks
written again, duplicate predictions of one of our versions deleted. It runs periodically (Celery beat,
SYNC_INTERVAL_SECONDS), on Start training, and on `POST /sync`.

The tick (every few seconds, Redis only) restarts what a lost message or a killed worker left: an outbox
with due entries, a refit the annotations call for, gaps of the current version, and chunks whose message
was lost.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from common import keys, queues
from common.annotations import annotation_labels
from common.celery_app import TICK_SECONDS
from common.delivery import WRITING
from common.store import STALE, ours
from worker.label_studio import LabelStudioApi, Row
from worker.predicting import fill_gaps, gaps, restage
from worker.refitting import needs_refit, refit_project
from worker.runtime import Runtime
from worker.showing import check_switch

log = logging.getLogger(__name__)

LOCK_LEASE = 60.0
# A delivery Label Studio lacks is written again only if it was made this long before the listing began
# (Label Studio stores a /predict reply a moment after we answer).
DELIVERY_GRACE = 60.0
# Webhooks are timed by the API's clock, the listing by this worker's: an annotation a webhook changed this
# long before the listing began is still left as the webhook left it (the next sweep reconciles it).
CLOCK_SKEW_SECONDS = 5.0
# The periodic sync's listings take at most this share of Label Studio's time, however large the project.
LISTING_SHARE = 0.1
# Tasks lacking the live version are not listed while the backend itself has more than this many still to write
# (an import under way): the listing would be those tasks, about 1 ms of Label Studio's CPU each, to learn what
# the backend knows. A write Label Studio lost among them is found by the sweep after the import is written.
UNWRITTEN_LISTING_LIMIT = 1000


def sync_project(rt: Runtime, pid: int, retrain: bool, reason: str, asked: bool = False) -> dict[str, Any]:
    """One sync at a time per project. A sync `asked` for (keys.sync_asked) that finds another running is
    done after it (the one running sends it again when it ends), and one whose ask a sync begun since has
    done is not run twice."""
    store = rt.store
    report: dict[str, Any] = {"project": pid, "reason": reason, "started": time.time()}
    api = rt.label_studio
    with store.lock(pid, "sync", lease=LOCK_LEASE) as held:
        if not held:
            return {"status": "another sync of this project is running" + ("; this one follows it" if asked else "")}
        seen = store.sync_asked(pid)
        if asked and seen is None:
            return {"status": "done by a sync that began after it was asked for"}
        retrain = retrain or bool(seen and seen.retrain)
        if api is not None:
            if not api.project_exists(pid):
                store.drop_project(pid)
                store.sync_done(pid, seen)
                log.warning("project %s is gone from Label Studio: no more periodic work for it", pid)
                return {"status": "project deleted in Label Studio"}
            report.update(_reconcile(rt, api, pid))
    if retrain or needs_refit(rt, pid):
        report["refit"] = refit_project(rt, pid, force=retrain, reason="training" if retrain else "annotations")
    report["predicted"] = fill_gaps(rt, pid)
    if store.delivery.size(pid):
        rt.dispatcher.deliver(pid)
    report["seconds"] = round(time.time() - report["started"], 3)
    store.set_last_sync(pid, report)
    log.info("project %s: sync (%s): %s", pid, reason, {k: v for k, v in report.items() if k != "started"})
    if store.sync_done(pid, seen) and not store.locked(pid, "sync"):
        rt.dispatcher.sync_again(pid, reason="asked for while a sync ran")
    return report


def _written_since(rt: Runtime, pid: int, version: str, started: float, tasks: set[int]) -> set[int]:
    """Those of `tasks` that a version (the one current when the sweep began, or one published since)
    claimed or wrote after the sweep's listing may have read them: what Label Studio showed then is no
    evidence against them. A listing of 50,000 tasks takes minutes; while one ran, the import's first
    version was written, and its tasks, read as lacking it, were written again beside it."""
    cutoff = started - DELIVERY_GRACE
    store = rt.store
    recent = {version, store.current_version(pid)}
    recent |= {str(v["version"]) for v in store.versions(pid) if float(v.get("created", 0)) >= cutoff}
    return {t for v in recent if v for t, (_, at) in store.delivery.claims(pid, v, tasks).items() if at >= cutoff}


def _reconcile(rt: Runtime, api: LabelStudioApi, pid: int) -> dict[str, Any]:
    """Find, with filtered listings whose cost grows with what changed and with the annotations, not with the
    project: tasks created or deleted without our hearing of it, the annotations, unannotated tasks lacking
    the live version (unless the backend has more than UNWRITTEN_LISTING_LIMIT to write itself), and tasks
    holding two copies of it. Every task's id is listed only when the project's task count disagrees with what
    the backend knows."""
    store, outbox = rt.store, rt.store.delivery
    started = time.time()
    secured = _secure_webhooks(rt, api, pid)
    xml = api.label_config(pid)
    config_changed = bool(xml) and store.set_label_config(pid, xml)
    config = rt.label_config(pid)
    live, version = store.live_version(), store.current_version(pid)
    known = store.known_tasks(pid) | store.featured_tasks(pid)
    listing = time.time()
    heard = {t.id: t for t in api.tasks_after(pid, max(known, default=0))}
    annotated = {t.id: t for t in api.annotated_tasks(pid)}
    gone: set[int] = set()
    if api.task_count(pid) != len(known | set(heard)):
        ids = api.task_ids(pid)
        gone = known - ids
        heard |= {t.id: t for t in api.tasks(pid, ids - known - set(heard))}
    to_write = _still_to_write(rt, pid, (known - gone) | set(heard), set(annotated))
    lacking: dict[int, list[str]] = {}
    if len(to_write) <= UNWRITTEN_LISTING_LIMIT:
        lacking = {t: versions for t, versions in api.tasks_lacking(pid, live).items() if t not in gone}
    crowded_rows = api.crowded_tasks(pid)
    listing_seconds = time.time() - listing
    store.forget_tasks(pid, gone)
    listed = {**heard, **annotated}
    annotations: dict[int, dict[int, dict[str, list[str]]]] = {}
    for task in listed.values():
        anns = {int(a["id"]): annotation_labels(a, config) for a in task.annotations}
        live_anns = {aid: labels for aid, labels in anns.items() if labels is not None}
        if live_anns:
            annotations[task.id] = live_anns
    changed = store.replace_annotations(pid, annotations, since=started - CLOCK_SKEW_SECONDS)
    store.remember_tasks(pid, [{"id": t.id, "data": t.data} for t in listed.values()])
    featured, failures, queued = store.featured_tasks(pid), store.failures(pid), set(store.pending(pid))
    unfeatured = [
        t for t in (known - gone) | set(listed)
        if t not in featured and t not in queued and failures.get(t, {}).get("transient", True)
    ]  # fmt: skip
    job = rt.dispatcher.ingest(pid, store.tasks(pid, unfeatured), kind="sync") if unfeatured else None
    # Tasks Label Studio shows no live prediction for, or more than one, or another of our versions: written
    # again (all of a task's predictions go first when every one is ours: worker/delivery.py). A write may have
    # landed after the listing began: only a claim older than that is forgotten.
    crowded = {t for t, rows in crowded_rows.items() if _stale_copies(rows, live)}
    stale = crowded | {t for t, versions in lacking.items() if any(ours(v) for v in versions)}
    suspects = (set(lacking) | crowded) - store.annotated_tasks(pid)
    suspects -= _written_since(rt, pid, version, started, suspects)
    claims = outbox.claims(pid, version, suspects)
    redo = {t for t in suspects if outbox.forget_if_older(pid, version, t, started - DELIVERY_GRACE)}
    redo |= {
        t for t in suspects if t not in claims or (claims[t][0] == WRITING and claims[t][1] < started - DELIVERY_GRACE)
    }
    store.forget_shown(pid, redo - stale)
    store.set_shown(pid, dict.fromkeys(redo & stale, STALE))
    rewritten = restage(rt, pid, redo)
    check_switch(rt, api, pid)
    return {
        "webhooks_secured": secured,
        "tasks": len(known - gone | set(listed)),
        "listed": len(listed) + len(lacking) + len(crowded_rows),
        "to_write": len(to_write),
        "listing_seconds": round(listing_seconds, 3),
        "new": len(unfeatured),
        "ingest_job": job,
        "deleted_tasks": len(gone),
        "annotations_changed": len(changed),
        "config_changed": config_changed,
        "rewritten": rewritten,
        "cleaned": len(stale & redo),
    }


def _still_to_write(rt: Runtime, pid: int, tasks: set[int], annotated: set[int]) -> set[int]:
    """Unannotated tasks the backend has written no live prediction for (and could: their image did not fail):
    on their way to Label Studio, held until an import's model is fitted, or waiting for a first model."""
    return tasks - annotated - rt.store.annotated_tasks(pid) - rt.store.shown_tasks(pid) - set(rt.store.failures(pid))


def _stale_copies(rows: list[Row], live: str) -> bool:
    """Two live predictions, or one of our superseded versions beside it."""
    return sum(r.model_version == live for r in rows) > 1 or any(
        ours(r.model_version) and r.model_version != live for r in rows
    )


def _secure_webhooks(rt: Runtime, api: LabelStudioApi, pid: int) -> int:
    """With WEBHOOK_SECRET set, the webhook Label Studio created must carry it (README "Connect Label Studio");
    which webhook is this deployment's, BACKEND_URL says."""
    if not rt.settings.webhook_secret:
        return 0
    if not rt.settings.backend_url:
        log.warning("project %s: WEBHOOK_SECRET is set but BACKEND_URL is not: no webhook gets the secret "
                    "header. Set BACKEND_URL to the URL Label Studio reaches this backend at (its Connect model "
                    "URL)", pid)  # fmt: skip
        return 0
    try:
        changed = api.secure_webhooks(pid, rt.settings.webhook_secret, rt.settings.backend_url)
    except Exception as exc:  # the sweep goes on; the next one tries again
        log.warning("project %s: cannot add the secret header to its webhook: %s: %s", pid, type(exc).__name__, exc)
        return 0
    if changed:
        log.info("project %s: the secret header added to webhook(s) %s", pid, changed)
    return len(changed)


def sync_all(rt: Runtime) -> list[int]:
    """Queue a periodic sync of every project the backend knows (one run per interval however many beats
    run), but of a large project not before its last listing has had LISTING_SHARE of the time since: a sweep
    lists every annotated task (1-2 ms of Label Studio's CPU each), and every task when the counts disagree
    (about 1 ms each, bench/RESULTS.md), time taken from the annotators."""
    interval = max(1.0, rt.settings.sync_interval_seconds * 0.9)
    if not rt.store.r.set(keys.beat_lock("sync_all"), "1", nx=True, px=int(interval * 1000)):
        return []
    queued, now = [], time.time()
    for pid in rt.store.projects():
        last = rt.store.last_sync(pid) or {}
        if now - float(last.get("started", 0)) < float(last.get("listing_seconds", 0)) / LISTING_SHARE:
            continue
        rt.dispatcher.sync(pid, reason="periodic", periodic=True)
        queued.append(pid)
    return queued


def lost_in_queue(rt: Runtime, pid: int, now: float) -> list[int]:
    """Tasks queued for embedding whose message must have been lost (Redis restarted without the last writes
    of its append-only file, or a bug): queued longer than BROKER_VISIBILITY_TIMEOUT while the bulk queue is
    empty or has not moved for as long. While chunks are being taken, a task queued long ago is waiting
    behind a large import, not lost, and is left alone (queuing it again would only add duplicate chunks)."""
    timeout = rt.settings.visibility_timeout
    old = [t for t, since in rt.store.pending(pid).items() if now - since > timeout]
    if not old:
        return []
    moving = now - rt.store.last_ingest_progress() <= timeout and rt.store.queue_length(queues.BULK) > 0
    return [] if moving else old


def tick(rt: Runtime) -> dict[int, list[str]]:
    """Redis-only checks, per project, that restart work a lost message or a killed worker left behind."""
    if not rt.store.r.set(keys.beat_lock("tick"), "1", nx=True, px=int(TICK_SECONDS * 900)):
        return {}
    store, now, started = rt.store, time.time(), {}
    for pid in store.projects():
        actions = []
        if store.delivery.due(pid, now, 1):
            rt.dispatcher.deliver(pid)
            actions.append("deliver")
        if store.label_config(pid) and needs_refit(rt, pid):
            if rt.dispatcher.after_labels_changed(pid):
                actions.append("refit")
        elif store.label_config(pid) and gaps(rt, pid, store.current_version(pid)):
            rt.dispatcher.fill_gaps(pid)
            actions.append("fill gaps")
        ask = store.sync_asked(pid)
        if ask and now - ask.at > rt.settings.visibility_timeout and not store.locked(pid, "sync"):
            rt.dispatcher.sync(pid, reason="asked for, its message lost")  # renews the ask's time
            actions.append("sync")
        stale = lost_in_queue(rt, pid, now)
        retry = [t for t, f in store.failures(pid).items()
                 if f.get("transient") and now - f.get("at", 0) > rt.settings.sync_interval_seconds]  # fmt: skip
        if stale or retry:
            rt.dispatcher.ingest(pid, store.tasks(pid, stale + retry), kind="retry")
            actions.append(f"ingest {len(stale) + len(retry)}")
        if actions:
            started[pid] = actions
    return started
