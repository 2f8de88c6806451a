"""Celery tasks that learn from annotations: refit the project's model, then re-predict its tasks."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from common import queues
from common.collections import PER_BUCKET, collection_of
from common.label_config import LabelConfig
from worker.celery_app import app
from worker.pipeline import from_bytes, to_bytes
from worker.predict_tasks import RETRYABLE, JobTask, predict_from_features, record, store_and_deliver
from worker.project_model import CollectionModels, ProjectModel, fit_project_model
from worker.results import build_prediction
from worker.runtime import Runtime, runtime

log = logging.getLogger(__name__)


def _embed_missing(rt: Runtime, pid: int, task_ids: list[int], image_key: str) -> dict[int, str]:
    """Annotated tasks whose webhook was missed have no features yet: embed them from their image."""
    refs = rt.store.task_images(pid, task_ids)
    tasks = [{"id": t, "data": {image_key: refs[t]}} for t in task_ids if t in refs]
    outcome = rt.pipeline.run(tasks, image_key)
    rt.store.save_embeddings(pid, {t: to_bytes(v) for t, v in outcome.features.items()}, outcome.refs)
    return outcome.errors


def _answers(
    rt: Runtime,
    model: ProjectModel | CollectionModels,
    features: np.ndarray,
    config: LabelConfig,
    collections: list[str],
) -> list[dict]:
    """What a model would predict, as label sets valid for the current config (ids and scores aside)."""
    probs = rt.embedder.head_probabilities(features) if model.head_map else None
    per_task = model.predict(features, probs, rt.embedder.backbone.class_names, collections)
    return [
        {item["from_name"]: item["value"]["choices"] for item in build_prediction(c, config, "")["result"]}
        for c in per_task
    ]


def _fit(
    rt: Runtime,
    features: np.ndarray,
    task_ids: list[int],
    labels: dict[int, dict[str, list[str]]],
    config: LabelConfig,
    collections: list[str],
    scope: str,
) -> ProjectModel | CollectionModels:
    def fit(rows: list[int]) -> ProjectModel:
        ids = [task_ids[i] for i in rows]
        return fit_project_model(
            "", features[rows], ids, labels, config, clusters=rt.settings.kmeans_clusters, head_map=rt.head_map
        )

    if scope != PER_BUCKET:
        return fit(list(range(len(task_ids))))
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(collections):
        groups.setdefault(name, []).append(i)
    models = {name: fit(rows) for name, rows in groups.items()}
    stats = {"tasks": len(task_ids), "annotated": len(labels), "collections": {n: m.stats for n, m in models.items()}}
    return CollectionModels("", models, config.fingerprint, stats)


def refit_project(rt: Runtime, project: int, force: bool) -> dict[str, Any]:
    """Fit a new model from all stored features and current labels; publish it as a new version only
    if it changes some prediction, and only once it is completely on disk."""
    store = rt.store
    store.clear_refit_schedule(project)
    seen = store.changes_since_fit(project)
    labels = store.labels(project)
    if not force and seen <= 0:
        return {"status": "nothing new"}
    config = rt.label_config(project)
    blobs = store.embeddings(project)
    missing = [t for t in labels if t not in blobs]
    if missing:
        _embed_missing(rt, project, missing, config.image_key)
        blobs = store.embeddings(project)
    if not blobs or (not labels and not rt.head_map):
        store.reset_changes(project, seen)
        return {"status": "nothing to learn from", "tasks": len(blobs), "annotated": len(labels)}
    task_ids = sorted(blobs)
    features = from_bytes([blobs[t] for t in task_ids])
    current = store.current_version(project)
    refs = store.task_images(project, task_ids)
    collections = [collection_of(refs.get(t, "")) for t in task_ids]
    model = _fit(rt, features, task_ids, labels, config, collections, rt.model_scope(project))
    old = rt.project_model(project, current)
    if old.config_fingerprint == config.fingerprint and _answers(rt, old, features, config, collections) == _answers(
        rt, model, features, config, collections
    ):
        store.reset_changes(project, seen)
        log.info("project %s: refit changes no prediction; %s stays current", project, current)
        return {"status": "unchanged", "version": current, **model.stats}
    model.version = store.next_version(project)
    model.save(rt.project_dir(project))
    store.publish_version(project, model.version, {"reason": "refit", **model.stats})
    store.reset_changes(project, seen)
    store.reset_new_tasks(project)
    log.info("project %s: fitted %s on %s", project, model.version, model.stats)
    unannotated = [t for t in task_ids if t not in labels]
    chunk = max(1, rt.settings.chunk_size)
    job = store.create_job("repredict", project, len(unannotated))
    for start in range(0, len(unannotated), chunk):
        repredict.apply_async(
            kwargs={
                "project": project,
                "version": model.version,
                "task_ids": unannotated[start : start + chunk],
                "job_id": job,
            },
            queue=queues.BULK,
        )
    return {"status": "fitted", "version": model.version, "repredict_job": job, **model.stats}


@app.task(name=queues.REFIT, base=JobTask, bind=True, autoretry_for=RETRYABLE, retry_backoff=5, max_retries=3)
def refit(self: Any, project: int, force: bool = False, job_id: str | None = None) -> dict[str, Any]:
    rt = runtime()
    with rt.store.lock(project, "refit", timeout=900):
        outcome = refit_project(rt, project, force)
    record(rt, job_id, project, [project], {})
    return outcome


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
