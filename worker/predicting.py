"""From stored features to staged predictions: the step every path to a prediction shares (an import's
chunk, the annotator's open task, a new version's re-prediction, a gap the sweep found).

The ordering that keeps every task current: whoever stores features reads the current version AFTER
storing them, and whoever publishes a version lists the stored features AFTER publishing. Either the
chunk sees the new version, or the publisher sees the chunk's features; both may predict a task, and the
delivery claims keep Label Studio from receiving it twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from common.collections import collection_of
from common.revisions import REFRESH_SECONDS, by_urgency
from worker.pipeline import from_bytes
from worker.project_model import Model
from worker.results import build_prediction
from worker.runtime import Runtime

log = logging.getLogger(__name__)

GAP_BATCH = 2048
OUTGROWN_MIN_TASKS = 100


def predict_from_features(
    rt: Runtime, pid: int, version: str, features: Mapping[int, np.ndarray]
) -> dict[int, dict[str, Any]]:
    """Postprocess: the model of `version` (and no other) turns features into Label Studio predictions."""
    if not features:
        return {}
    ids = list(features)
    refs = rt.store.task_images(pid, ids)
    collections = [collection_of(refs.get(t, "")) for t in ids]
    per_task = model_choices(rt, rt.project_model(pid, version), np.stack([features[t] for t in ids]), collections)
    config = rt.label_config(pid)
    return {tid: build_prediction(choices, config, version) for tid, choices in zip(ids, per_task, strict=True)}


def model_choices(rt: Runtime, model: Model, matrix: np.ndarray, collections: Sequence[str]) -> list:
    """What `model` answers for the rows of `matrix` (build_prediction makes Label Studio's form of each)."""
    if not len(matrix):
        return []
    probs = rt.embedder.head_probabilities(matrix) if model.head_map else None
    return model.predict(matrix, probs, rt.embedder.backbone.class_names, list(collections))


def stage(
    rt: Runtime,
    pid: int,
    version: str,
    predictions: Mapping[int, dict[str, Any]],
    *,
    job_id: str | None = None,
    hold: float = 0.0,
    saved: bool = False,
    staging: str | None = None,
) -> None:
    """Keep the predictions for /predict (unless `saved` already) and put in the outbox for Label Studio those
    that change what it shows (common/revisions.py), most urgent first. `hold`: how long the API may hand them
    over itself first (the annotator's open task), before a worker writes them. `staging`: the chunk's token
    (`Store.save_embeddings`), cleared once the predictions are in the outbox and before the deliverer is
    called, so that the deliverer sees them and nothing more on its way from this chunk."""
    if not predictions:
        return
    if not saved:
        rt.store.save_predictions(pid, version, predictions)
    if rt.label_studio is None or not rt.model_answers(pid, version):
        return
    urgent = _stage_by_urgency(rt, pid, version, predictions, time.time() + hold, job_id)
    if staging:
        rt.store.done_staging(pid, staging)
    if urgent:
        rt.dispatcher.deliver(pid, countdown=hold)


def restage(rt: Runtime, pid: int, task_ids: Iterable[int]) -> int:
    """Stage what the current version answers for these tasks wherever Label Studio shows something else (a
    write of an older version that ended after a newer one compared itself with what Label Studio showed, or
    a sweep that found Label Studio lacking a prediction); returns how many were staged."""
    version = rt.store.current_version(pid)
    if rt.label_studio is None or not rt.model_answers(pid, version):
        return 0
    annotated = rt.store.annotated_tasks(pid)
    predictions = rt.store.predictions(pid, version, [t for t in task_ids if t not in annotated])
    urgent = _stage_by_urgency(rt, pid, version, predictions, time.time())
    if urgent:
        rt.dispatcher.deliver(pid)
    return len(urgent)


def _stage_by_urgency(
    rt: Runtime,
    pid: int,
    version: str,
    predictions: Mapping[int, dict[str, Any]],
    due: float,
    job_id: str | None = None,
) -> list[int]:
    """Stage what changes what Label Studio shows: tasks that show nothing and the frontier due at `due`, the
    rest at the end of the project's refresh window (the deliverer is sent for that moment when the window
    opens; should the message be lost, the tick sends it); returns the first."""
    urgent, later = by_urgency(predictions, rt.store.shown(pid, predictions))
    rt.store.delivery.stage(pid, version, urgent, due, job_id)
    if later:
        window_ends, opened = rt.store.refresh_due(pid, REFRESH_SECONDS)
        rt.store.delivery.stage(pid, version, later, max(due, window_ends), job_id)
        if opened:
            rt.dispatcher.deliver(pid, countdown=max(due, window_ends) - time.time())
    return urgent


def predict_current(
    rt: Runtime,
    pid: int,
    features: Mapping[int, np.ndarray],
    *,
    job_id: str | None = None,
    hold: float = 0.0,
    annotated_too: bool = False,
    staging: str | None = None,
) -> str:
    """Predict these tasks with the version current NOW (call it after their features are stored) and stage
    the predictions; returns that version. Annotated tasks are left out, unless someone asked for them
    (`annotated_too`: the task open in the labelling screen): they are then handed over by /predict only."""
    version = rt.store.current_version(pid)
    if not hold and outgrown(rt, pid, version):
        return version  # written once the import settles and a refit has looked at it (`outgrown`)
    annotated = set() if annotated_too else rt.store.annotated_tasks(pid)
    todo = {t: v for t, v in features.items() if t not in annotated}
    stage(rt, pid, version, predict_from_features(rt, pid, version, todo), job_id=job_id, hold=hold, staging=staging)
    return version


def outgrown(rt: Runtime, pid: int, version: str) -> bool:
    """The project (its tasks embedded and queued) has more than doubled since its model was fitted (or last
    checked), and has at least OUTGROWN_MIN_TASKS tasks: its first model often saw only the seed annotations'
    images. Predictions are then held back (not written to Label Studio; a refit writes only revisions of
    tasks already shown, worker/refitting.py) until a refit has looked at the project grown
    (`settle_import`): every task is written once, by a model that saw the import, instead of twice.
    The annotator's open task is never held."""
    if not rt.model_answers(pid, version):
        return False
    meta = rt.store.version_meta(pid, version)
    return outgrows(rt, pid, max(int(meta.get("tasks", 0)), int(meta.get("checked_tasks", 0))))


def outgrows(rt: Runtime, pid: int, seen: int) -> bool:
    """A model fitted on `seen` tasks is outgrown: the tasks embedded and those queued for embedding (an import
    under way) are more than twice as many."""
    now = rt.store.embedding_count(pid) + rt.store.pending_count(pid)
    return now >= OUTGROWN_MIN_TASKS and now > 2 * seen


def settle_import(rt: Runtime, pid: int) -> bool:
    """An outgrown model gets its refit (which publishes a version if enough answers change, and predicts
    every task either way) once at least half of the project's tasks known now are embedded: the rest of
    the import then cannot outgrow the new model, and its predictions are written while it is embedded.
    True if a refit was queued."""
    version = rt.store.current_version(pid)
    if not outgrown(rt, pid, version) or rt.store.pending_count(pid) > rt.store.embedding_count(pid):
        return False
    if rt.store.schedule_refit(pid, 60):
        rt.dispatcher.refit(pid, force=True, reason="new tasks")
    return True


def gaps(rt: Runtime, pid: int, version: str) -> list[int]:
    """Unannotated tasks with features but without a stored prediction of `version`."""
    featured = rt.store.featured_tasks(pid)
    return sorted(featured - rt.store.annotated_tasks(pid) - rt.store.predicted_tasks(pid, version))


def fill_gaps(rt: Runtime, pid: int) -> int:
    """Predict every gap of the current version from stored features (no download, no forward pass).
    Called after a version is published, after annotations are deleted, and by the periodic checks."""
    version = rt.store.current_version(pid)
    if outgrown(rt, pid, version):
        settle_import(rt, pid)
        return 0
    missing = gaps(rt, pid, version)
    for start in range(0, len(missing), GAP_BATCH):
        if rt.store.current_version(pid) != version:
            break  # a newer version was published: its publisher fills its gaps
        features = stored_features(rt, pid, missing[start : start + GAP_BATCH])
        stage(rt, pid, version, predict_from_features(rt, pid, version, features))
    if missing:
        log.info("project %s: %d tasks predicted with %s", pid, len(missing), version)
    return len(missing)


def stored_features(rt: Runtime, pid: int, task_ids: Iterable[int]) -> dict[int, np.ndarray]:
    blobs = rt.store.embeddings(pid, task_ids)
    return dict(zip(blobs, from_bytes(list(blobs.values())), strict=True)) if blobs else {}
