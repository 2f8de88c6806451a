"""A refit in four steps: read a snapshot of features and labels, fit (pure) and predict the snapshot, publish,
fill the gaps.

A version records a digest of the labels it was fitted on. The project needs a refit whenever the labels
it could learn from (every annotated task whose image is usable) differ from that digest, whatever the
order in which annotations, imports and refits arrived: `needs_refit` is what the periodic checks ask,
and a refit asks it again when it ends, for what changed while it ran.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from common.collections import collection_of
from common.label_config import LabelConfig
from worker import metrics
from worker.pipeline import from_bytes, to_bytes
from worker.predicting import fill_gaps, model_choices, outgrows, stage
from worker.project_model import fit_model, model_to_bytes
from worker.results import build_prediction
from worker.runtime import Runtime

log = logging.getLogger(__name__)

LOCK_LEASE = 30.0
# A refit that only saw new tasks (no annotation changed) publishes a version only when it changes the
# answer for at least this share of the unannotated tasks: a version costs Label Studio a new prediction
# for every task, and an import should cost one per task (see also worker/predicting.py `outgrown`).
NEW_TASKS_MIN_CHANGE = 0.10


def labels_digest(labels: Mapping[int, Mapping[str, list[str]]]) -> str:
    if not labels:
        return ""
    canonical = json.dumps(sorted((t, {tag: sorted(v) for tag, v in sorted(c.items())}) for t, c in labels.items()))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def learnable_labels(rt: Runtime, pid: int) -> dict[int, dict[str, list[str]]]:
    """Labels of annotated tasks, except those whose image failed (a task that failed has no features; one
    that failed for a while is tried again by the periodic checks, and learned once it is embedded)."""
    failed = set(rt.store.failures(pid))
    return {t: chosen for t, chosen in rt.store.labels(pid).items() if t not in failed}


def current_meta(rt: Runtime, pid: int) -> dict[str, Any]:
    return rt.store.version_meta(pid, rt.store.current_version(pid))


def needs_refit(rt: Runtime, pid: int) -> bool:
    """The current version was not fitted on every annotation the project could learn from, or on its
    current label config."""
    meta = current_meta(rt, pid)
    labels = learnable_labels(rt, pid)
    if labels_digest(labels) != meta.get("labels_digest", ""):
        return True
    xml = rt.store.label_config(pid)
    return bool(labels) and xml is not None and rt.label_config(pid).fingerprint != meta.get("config")


def refit_project(rt: Runtime, pid: int, force: bool, reason: str) -> dict[str, Any]:
    with rt.store.lock(pid, "refit", lease=LOCK_LEASE) as held:
        if not held:
            return {"status": "another refit is running"}  # which asks needs_refit again when it ends
        rt.store.clear_refit_schedule(pid)
        with metrics.REFIT_SECONDS.time():
            outcome = _refit(rt, pid, force, reason)
        metrics.REFITS.labels(outcome["status"]).inc()
    if needs_refit(rt, pid):
        # What changed while this refit ran has waited for it already: no debounce on top.
        rt.dispatcher.refit(pid, force=False, reason="annotations")
    return outcome


def _refit(rt: Runtime, pid: int, force: bool, reason: str) -> dict[str, Any]:
    store = rt.store
    seen = store.changes_since_fit(pid)
    config = rt.label_config(pid)
    meta = current_meta(rt, pid)
    featured = store.featured_tasks(pid)
    _embed_missing(rt, pid, [t for t in learnable_labels(rt, pid) if t not in featured], config.image_key)
    labels = learnable_labels(rt, pid)
    blobs = store.embeddings(pid)
    used = {t: chosen for t, chosen in labels.items() if t in blobs}
    digest = labels_digest(used)
    relearn = digest != meta.get("labels_digest", "") or (bool(used) and config.fingerprint != meta.get("config"))
    if not relearn and not force:
        store.reset_changes(pid, seen)
        return {"status": "nothing new", "version": meta["version"]}
    if not blobs or (not used and not rt.head_map):
        store.reset_changes(pid, seen)
        return {"status": "nothing to learn from", "tasks": len(blobs), "annotated": len(labels)}
    task_ids = sorted(blobs)
    features = from_bytes([blobs[t] for t in task_ids])
    refs = store.task_images(pid, task_ids)
    collections = [collection_of(refs.get(t, "")) for t in task_ids]
    model = fit_model(features, task_ids, used, config, collections, rt.per_collection(pid),
                      rt.settings.kmeans_clusters, rt.head_map)  # fmt: skip
    annotated = store.annotated_tasks(pid)
    rows = [i for i, t in enumerate(task_ids) if t not in annotated]
    unannotated, matrix, places = [task_ids[i] for i in rows], features[rows], [collections[i] for i in rows]
    answers = model_choices(rt, model, matrix, places)
    if not relearn:
        changed = _changed_share(rt, pid, meta["version"], answers, matrix, places, config)
        needed = NEW_TASKS_MIN_CHANGE if reason == "new tasks" else 0.0
        if changed <= needed:
            store.reset_changes(pid, seen)
            store.version_checked(pid, meta["version"], len(task_ids))
            log.info("project %s: refit (%s) changes %.1f%% of the answers; %s stays current", pid, reason,
                     100 * changed, meta["version"])  # fmt: skip
            predicted = fill_gaps(rt, pid)  # what an outgrown model held back
            return {"status": "unchanged", "version": meta["version"], "changed": round(changed, 4),
                    "predicted": predicted}  # fmt: skip
    version = store.next_version(pid)
    model.version = version
    meta = {"reason": reason, "labels_digest": digest, "config": config.fingerprint, **model.stats}
    # The snapshot's predictions are stored before the version is current: a /predict arriving as it is
    # published finds its task's answer at once (instead of sending a chunk of the import to the back of the
    # queue to make way for an interactive message). Tasks embedded since are the gaps filled below.
    ready = {t: build_prediction(c, config, version) for t, c in zip(unannotated, answers, strict=True)}
    if outgrows(rt, pid, len(task_ids)):
        # An import under way outgrows this model: tasks Label Studio shows nothing of ours for are left gaps,
        # predicted once a refit has seen the import (`outgrown`), so that it writes them once, not twice. Not
        # stored either: a stored answer is no gap, and nothing would stage it if that refit kept this version.
        # A /predict for one of them meanwhile is answered by the interactive lane.
        shown = store.shown_tasks(pid)
        ready = {t: p for t, p in ready.items() if t in shown}
    store.save_predictions(pid, version, ready)
    store.publish_version(pid, version, model_to_bytes(model), meta, used)
    store.reset_changes(pid, seen)
    log.info("project %s: fitted %s (%s) on %d tasks, %d annotated", pid, version, reason, len(task_ids), len(used))
    stage(rt, pid, version, ready, saved=True)
    predicted = len(ready) + fill_gaps(rt, pid)
    rt.dispatcher.refresh_map_soon(pid)  # the status page's map (worker/projection.py)
    return {"status": "fitted", "version": version, "predicted": predicted, **model.stats}


def _embed_missing(rt: Runtime, pid: int, task_ids: list[int], image_key: str) -> None:
    """Annotated tasks whose import is still under way (or whose webhook was lost): embed them now, so that
    no annotation waits for the import to be learned."""
    tasks = rt.store.tasks(pid, task_ids)
    if not tasks:
        return
    outcome = rt.pipeline.run(tasks, image_key)
    rt.store.save_embeddings(pid, {t: to_bytes(v) for t, v in outcome.features.items()}, outcome.refs)
    rt.store.record_failures(pid, outcome.errors, outcome.transient)
    for tid, reason in outcome.errors.items():
        log.warning("project %s: annotated task %s cannot be learned from: %s", pid, tid, reason)


def _label_sets(answers: list, config: LabelConfig) -> list[dict[str, list[str]]]:
    """A model's answers as label sets valid for the config (ids and scores aside)."""
    return [
        {item["from_name"]: item["value"]["choices"] for item in build_prediction(c, config, "")["result"]}
        for c in answers
    ]


def _changed_share(
    rt: Runtime, pid: int, version: str, answers: list, matrix: np.ndarray, collections: list[str], config: LabelConfig
) -> float:
    """Share of the unannotated tasks (rows of `matrix`; the new model's `answers`) that `version` answers
    otherwise."""
    if not answers:
        return 0.0
    old = _label_sets(model_choices(rt, rt.project_model(pid, version), matrix, collections), config)
    new = _label_sets(answers, config)
    return sum(a != b for a, b in zip(old, new, strict=True)) / len(answers)
