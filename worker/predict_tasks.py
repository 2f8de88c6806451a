"""Celery tasks that embed images and predict: imports, Retrieve predictions, the annotator's open task."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from common import queues
from common.collections import collection_of
from common.dispatch import Dispatcher
from common.label_config import LabelConfigError
from worker.celery_app import app
from worker.pipeline import EmbedOutcome, from_bytes, to_bytes
from worker.results import build_prediction
from worker.runtime import Runtime, runtime
from worker.writeback import WriteBackError

log = logging.getLogger(__name__)

RETRYABLE = (WriteBackError, ConnectionError, TimeoutError)


def predict_from_features(
    rt: Runtime, pid: int, version: str, features: Mapping[int, np.ndarray]
) -> dict[int, dict[str, Any]]:
    """Postprocess: the project's model of `version` turns features into Label Studio predictions."""
    if not features:
        return {}
    config = rt.label_config(pid)
    ids = list(features)
    matrix = np.stack([features[t] for t in ids])
    model = rt.project_model(pid, version)
    probs = rt.embedder.head_probabilities(matrix) if model.head_map else None
    refs = rt.store.task_images(pid, ids)
    collections = [collection_of(refs.get(t, "")) for t in ids]
    per_task = model.predict(matrix, probs, rt.embedder.backbone.class_names, collections)
    return {tid: build_prediction(choices, config, version) for tid, choices in zip(ids, per_task, strict=True)}


def store_and_deliver(
    rt: Runtime, pid: int, version: str, predictions: Mapping[int, dict[str, Any]], deliver_via_api: bool
) -> dict[int, str]:
    """Keep the predictions for /predict, then write them to Label Studio (or let the API hand the
    annotator's open task over first, and write only what it did not)."""
    rt.store.save_predictions(pid, version, predictions)
    with_result = [t for t, p in predictions.items() if p["result"]]
    if not with_result or rt.writeback is None:
        return {}
    if deliver_via_api:
        deliver.apply_async(
            kwargs={"project": pid, "version": version, "task_ids": with_result},
            countdown=rt.settings.predict_wait_seconds + 1,
            queue=queues.INTERACTIVE,
        )
        return {}
    return rt.writeback.write(pid, version, {t: predictions[t] for t in with_result})


def record(rt: Runtime, job_id: str | None, pid: int, done: Iterable[int], errors: Mapping[int, str]) -> None:
    for tid, reason in errors.items():
        log.warning("project %s task %s failed: %s", pid, tid, reason)
    if job_id:
        rt.store.job_progress(job_id, done=[t for t in done if t not in errors], errors=errors)


class JobTask(app.Task):
    """When a task gives up (retries exhausted, or a bug), its job says so for each of its tasks."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        job_id = kwargs.get("job_id")
        if job_id:
            items = [t["id"] for t in kwargs.get("tasks", [])] or kwargs.get("task_ids") or [kwargs.get("project")]
            runtime().store.job_progress(job_id, errors={t: f"{type(exc).__name__}: {exc}" for t in items})


@app.task(name=queues.PREDICT_TASKS, base=JobTask, bind=True, autoretry_for=RETRYABLE, retry_backoff=5, max_retries=5)
def predict_tasks(
    self: Any,
    project: int,
    tasks: Sequence[Mapping[str, Any]],
    job_id: str | None = None,
    deliver_via_api: bool = False,
    embed_only: bool = False,
) -> dict[str, int]:
    """Embed and predict a chunk of tasks, storing what is done every few batches.

    A bulk chunk gives way to interactive work: when the interactive queue has a message, the chunk
    stops after the batch in progress and sends its unstarted tasks back to the bulk queue.
    """
    rt = runtime()
    store = rt.store
    ids = [t["id"] for t in tasks]
    try:
        config = rt.label_config(project)
    except (LookupError, LabelConfigError) as exc:
        record(rt, job_id, project, [], {t: str(exc) for t in ids})
        return {"done": 0, "failed": len(ids)}
    version = store.current_version(project)
    known = {t: from_bytes([b])[0] for t, b in store.embeddings(project, ids).items()}
    commit_every = 4 * rt.embedder.batch_size
    stop = None if deliver_via_api else rt.interactive_waiting
    pending = EmbedOutcome()
    failed = commit(rt, project, version, job_id, EmbedOutcome(), deliver_via_api, embed_only, known=known)
    done, computed, cache_hits, unstarted = len(known), 0, len(known), []
    for part in rt.pipeline.stream([t for t in tasks if t["id"] not in known], config.image_key, stop):
        pending.merge(part)
        done, computed, cache_hits = done + len(part.features), computed + part.computed, cache_hits + part.cache_hits
        unstarted += part.unstarted
        if len(pending) >= commit_every:
            failed += commit(rt, project, version, job_id, pending, deliver_via_api, embed_only)
            pending = EmbedOutcome()
    failed += commit(rt, project, version, job_id, pending, deliver_via_api, embed_only)
    if unstarted:
        Dispatcher(app, store, rt.settings).send_chunk(project, unstarted, job_id or "", embed_only=embed_only)
        log.info("project %s: interactive work waiting, %d tasks back to the bulk queue", project, len(unstarted))
    if computed:
        maybe_refit_for_new_tasks(rt, project, computed)
    log.info(
        "project %s: %d tasks, %d embedded, %d from cache, %d failed",
        project,
        len(ids) - len(unstarted),
        computed,
        cache_hits,
        failed,
    )
    return {"done": done, "failed": failed}


def commit(
    rt: Runtime,
    pid: int,
    version: str,
    job_id: str | None,
    outcome: EmbedOutcome,
    deliver_via_api: bool,
    embed_only: bool,
    known: Mapping[int, np.ndarray] | None = None,
) -> int:
    """Store what part of a chunk settled: features, predictions (written back), job progress. `known`:
    tasks whose features were stored before, predicted without being stored again."""
    features = {**(known or {}), **outcome.features}
    if not features and not outcome.errors:
        return 0
    rt.store.save_embeddings(pid, {t: to_bytes(v) for t, v in outcome.features.items()}, outcome.refs)
    errors = dict(outcome.errors)
    if errors:
        rt.store.unmark_queued(pid, version, errors)
    if not embed_only:
        predictions = predict_from_features(rt, pid, version, features)
        errors.update(store_and_deliver(rt, pid, version, predictions, deliver_via_api))
    record(rt, job_id, pid, features, errors)
    return len(errors)


def maybe_refit_for_new_tasks(rt: Runtime, pid: int, new: int) -> None:
    """Clusters go stale as a project grows: refit once the tasks added since the last fit reach a
    quarter of those it was fitted on (at least 50)."""
    since = rt.store.count_new_tasks(pid, new)
    model = rt.project_model(pid, rt.store.current_version(pid))
    fitted_on = int(model.stats.get("tasks", 0))
    if fitted_on and since >= max(50, fitted_on // 4) and rt.store.refit_scheduled(pid, 60):
        from worker.learn_tasks import refit

        job = rt.store.create_job("refit", pid, 1)
        refit.apply_async(kwargs={"project": pid, "force": True, "job_id": job}, queue=queues.BULK)


@app.task(name=queues.DELIVER, autoretry_for=RETRYABLE, retry_backoff=5, max_retries=5)
def deliver(project: int, version: str, task_ids: list[int]) -> int:
    """Write what the API did not hand to Label Studio in its /predict reply."""
    rt = runtime()
    predictions = rt.store.predictions(project, version, task_ids)
    errors = rt.writeback.write(project, version, predictions) if rt.writeback else {}
    for tid, reason in errors.items():
        log.warning("project %s task %s: %s", project, tid, reason)
    return len(predictions) - len(errors)


@app.task(name=queues.FAN_OUT, bind=True, autoretry_for=RETRYABLE, retry_backoff=5, max_retries=5)
def fan_out(self: Any, project: int, job_id: str, embed_only: bool = False) -> int:
    """Split a parked import into chunk messages. Runs again after a crash: a chunk sent twice only
    repeats work (embeddings are cached, predictions are claimed once)."""
    rt = runtime()
    tasks = rt.store.parked_job_tasks(job_id)
    if tasks is None:
        return 0
    dispatcher = Dispatcher(app, rt.store, rt.settings)
    size = max(1, rt.settings.chunk_size)
    rt.store.mark_queued(project, rt.store.current_version(project), [t["id"] for t in tasks])
    with app.producer_or_acquire() as producer:
        for start in range(0, len(tasks), size):
            dispatcher.send_chunk(
                project, tasks[start : start + size], job_id, embed_only=embed_only, producer=producer
            )
    rt.store.drop_parked_job_tasks(job_id)
    return len(tasks)
