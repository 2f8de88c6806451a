"""Celery tasks that learn from annotations: refit the project's model, then re-predict its tasks."""

from __future__ import annotations

import logging
from typing import Any

from common import queues
from worker.celery_app import app
from worker.pipeline import from_bytes, to_bytes
from worker.predict_tasks import RETRYABLE, JobTask, predict_from_features, record, store_and_deliver
from worker.project_model import fit_project_model
from worker.runtime import Runtime, runtime

log = logging.getLogger(__name__)


def _embed_missing(rt: Runtime, pid: int, task_ids: list[int], image_key: str) -> dict[int, str]:
    """Annotated tasks whose webhook was missed have no features yet: embed them from their image."""
    refs = rt.store.task_images(pid, task_ids)
    tasks = [{"id": t, "data": {image_key: refs[t]}} for t in task_ids if t in refs]
    outcome = rt.pipeline.run(tasks, image_key)
    rt.store.save_embeddings(pid, {t: to_bytes(v) for t, v in outcome.features.items()}, outcome.refs)
    return outcome.errors


@app.task(name=queues.REFIT, base=JobTask, bind=True, autoretry_for=RETRYABLE, retry_backoff=5, max_retries=3)
def refit(self: Any, project: int, force: bool = False, job_id: str | None = None) -> dict[str, Any]:
    rt = runtime()
    store = rt.store
    with store.lock(project, "refit", timeout=900):
        store.clear_refit_schedule(project)
        seen = store.changes_since_fit(project)
        labels = store.labels(project)
        if not force and seen <= 0:
            record(rt, job_id, project, [project], {})
            return {"status": "nothing new"}
        config = rt.label_config(project)
        missing = [t for t in labels if not store.embeddings(project, [t])]
        if missing:
            _embed_missing(rt, project, missing, config.image_key)
        blobs = store.embeddings(project)
        if not blobs or (not labels and not rt.head_map):
            store.reset_changes(project, seen)
            record(rt, job_id, project, [project], {})
            return {"status": "nothing to learn from", "tasks": len(blobs), "annotated": len(labels)}
        task_ids = sorted(blobs)
        features = from_bytes([blobs[t] for t in task_ids])
        version = store.next_version(project)
        model = fit_project_model(
            version, features, task_ids, labels, config, clusters=rt.settings.kmeans_clusters, head_map=rt.head_map
        )
        model.save(rt.project_dir(project))
        # Only now, with the model completely on disk, does the new version become current.
        store.publish_version(project, version, {"reason": "refit", **model.stats})
        store.reset_changes(project, seen)
        store.reset_new_tasks(project)
        log.info("project %s: fitted %s on %s", project, version, model.stats)
        unannotated = [t for t in task_ids if t not in labels]
        chunk = max(1, rt.settings.chunk_size)
        job = store.create_job("repredict", project, len(unannotated))
        for start in range(0, len(unannotated), chunk):
            repredict.apply_async(
                kwargs={
                    "project": project,
                    "version": version,
                    "task_ids": unannotated[start : start + chunk],
                    "job_id": job,
                },
                queue=queues.BULK,
            )
        record(rt, job_id, project, [project], {})
        return {"status": "fitted", "version": version, "repredict_job": job, **model.stats}


@app.task(name=queues.REPREDICT, base=JobTask, autoretry_for=RETRYABLE, retry_backoff=5, max_retries=5)
def repredict(project: int, version: str, task_ids: list[int], job_id: str | None = None) -> int:
    """Predict from stored features: no download, no forward pass. Skipped once a newer version exists."""
    rt = runtime()
    if rt.store.current_version(project) != version:
        record(rt, job_id, project, task_ids, {})
        return 0
    labelled = rt.store.labels(project)
    blobs = rt.store.embeddings(project, [t for t in task_ids if t not in labelled])
    features = {t: v for t, v in zip(blobs, from_bytes(list(blobs.values())), strict=True)} if blobs else {}
    predictions = predict_from_features(rt, project, version, features)
    errors = store_and_deliver(rt, project, version, predictions, deliver_via_api=False)
    record(rt, job_id, project, task_ids, errors)
    return len(predictions)
