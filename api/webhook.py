"""Label Studio's webhooks: validate, record, queue, answer in milliseconds (it waits 1 s, never retries)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, current_app, jsonify

from api.errors import BadPayload, TooLarge
from api.payloads import MAX_DATA_DEPTH, json_object, known_project, nested_deeper_than, require_project, task_list
from common.annotations import annotation_labels
from common.dispatch import Dispatcher
from common.label_config import LabelConfig, LabelConfigError, parse_label_config
from common.store import Store

log = logging.getLogger(__name__)
bp = Blueprint("webhook", __name__)

Handler = Callable[[int, dict[str, Any]], dict[str, Any]]
HANDLERS: dict[str, Handler] = {}


def handles(*actions: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for action in actions:
            HANDLERS[action] = fn
        return fn

    return register


def _store() -> Store:
    return current_app.extensions["store"]


def _dispatcher() -> Dispatcher:
    return current_app.extensions["dispatcher"]


def _config(pid: int, body: dict[str, Any]) -> LabelConfig:
    """The config the event carries (stored, once it parses), else the one stored before."""
    project = body.get("project")
    xml = project.get("label_config") if isinstance(project, dict) else None
    if xml is not None and not isinstance(xml, str):
        raise BadPayload("project.label_config must be a string")
    sent = bool(xml and xml.strip())
    xml = xml if sent else _store().label_config(pid)
    if not xml:
        raise BadPayload(f"no label config known for project {pid}; send PROJECT_UPDATED or /setup first")
    try:
        config = parse_label_config(xml)
    except LabelConfigError as exc:
        raise BadPayload(str(exc)) from exc
    if sent:
        _store().set_label_config(pid, xml)
    return config


def _objects(body: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = body.get(key)
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(i, dict) for i in items):
        raise BadPayload(f"'{key}' must be an object or a list of objects")
    return items


@handles("TASKS_CREATED")
def tasks_created(pid: int, body: dict[str, Any]) -> dict[str, Any]:
    settings = current_app.config["SETTINGS"]
    over = 0
    try:
        tasks = task_list(body, limited=True)
    except TooLarge:
        if not (settings.label_studio_url and settings.label_studio_api_key):
            raise
        # Label Studio sends an import's tasks in one webhook, once. Over the limit, the first
        # MAX_TASKS_PER_REQUEST are queued now and a sync lists the rest from Label Studio, page by page.
        over = len(body["tasks"]) - settings.max_tasks_per_request
        tasks = task_list({"tasks": body["tasks"][: settings.max_tasks_per_request]})
    if isinstance(body.get("project"), dict) and body["project"].get("label_config") is not None:
        _config(pid, body)  # stored once it parses; a 400 if it does not
    if not tasks:
        return {"status": "ignored", "reason": "no tasks"}
    job = _dispatcher().ingest(pid, tasks, kind="import")
    # Tasks imported with their annotations come with a count but not the annotations, and no
    # ANNOTATIONS_CREATED follows: a sync reads them from Label Studio.
    counted = any(isinstance(t.get("total_annotations"), int) and t["total_annotations"] > 0 for t in tasks)
    sync = None
    if over:
        log.warning("project %s: an import of %d tasks, %d over MAX_TASKS_PER_REQUEST: a sync queues those", pid,
                    len(tasks) + over, over)  # fmt: skip
        sync = _dispatcher().sync(pid, reason=f"{over} tasks of an import over MAX_TASKS_PER_REQUEST")
    elif counted:
        sync = _dispatcher().sync(pid, reason="imported annotations")
    reply = {"status": "queued" if job else "already queued", "job": job, "tasks": len(tasks), "sync_job": sync}
    return reply | ({"over_limit": over} if over else {})


@handles("TASKS_DELETED")
def tasks_deleted(pid: int, body: dict[str, Any]) -> dict[str, Any]:
    ids = [t["id"] for t in task_list(body)]
    _store().forget_tasks(pid, ids)
    return {"status": "done", "tasks": len(ids)}


@handles("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
def annotations_saved(pid: int, body: dict[str, Any]) -> dict[str, Any]:
    config = _config(pid, body)
    store = _store()
    annotations = _objects(body, "annotation")
    sent = {t["id"]: t for t in (_objects(body, "task") if body.get("task") else []) if _is_id(t.get("id"))}
    for task in sent.values():
        data = task.get("data") or {}
        if not isinstance(data, dict) or nested_deeper_than(data, MAX_DATA_DEPTH):
            raise BadPayload(f"task {task['id']}: data must be an object nesting at most {MAX_DATA_DEPTH} levels")
    changed = []
    for ann in annotations:
        task_id = ann.get("task")
        task_id = task_id.get("id") if isinstance(task_id, dict) else task_id
        if not _is_id(ann.get("id")) or not _is_id(task_id):
            raise BadPayload("each annotation needs an integer 'id' and 'task'")
        if store.save_annotation(pid, ann["id"], task_id, annotation_labels(ann, config)):
            changed.append(task_id)
    # Tasks annotated before their import was embedded (or whose import webhook was lost) are embedded
    # now; a refit also embeds any it still finds without features.
    tasks = [sent[t] for t in dict.fromkeys(changed) if t in sent]
    embedded = store.tasks_with_embeddings(pid, [t["id"] for t in tasks])
    unembedded = [t for t in tasks if t["id"] not in embedded]
    store.remember_tasks(pid, tasks)
    if unembedded:
        _dispatcher().ingest(pid, unembedded, kind="embed")
    refit_job = _dispatcher().after_labels_changed(pid) if changed else None
    return {"status": "recorded", "annotations": len(annotations), "changed": len(changed), "refit_job": refit_job}


@handles("ANNOTATIONS_DELETED")
def annotations_deleted(pid: int, body: dict[str, Any]) -> dict[str, Any]:
    ids = [a.get("id") for a in _objects(body, "annotations")]
    if not all(_is_id(i) for i in ids):
        raise BadPayload("'annotations' items need an integer 'id'")
    touched = _store().delete_annotations(pid, ids)
    refit_job = None
    if touched:
        # A task left without annotation needs a prediction of the current version at once; the refit that
        # follows (debounced) makes a new version for every task.
        _dispatcher().fill_gaps(pid)
        refit_job = _dispatcher().after_labels_changed(pid)
    return {"status": "recorded", "tasks": touched, "refit_job": refit_job}


@handles("START_TRAINING")
def start_training(pid: int, body: dict[str, Any]) -> dict[str, Any]:
    """Learn from everything Label Studio holds now, lost webhooks included: a sync, then a refit."""
    _config(pid, body)
    return {"status": "queued", "job": _dispatcher().sync(pid, retrain=True, reason="training")}


@handles("PROJECT_UPDATED")
def project_updated(pid: int, body: dict[str, Any]) -> dict[str, Any]:
    project = body.get("project")
    xml = project.get("label_config") if isinstance(project, dict) else None
    if not isinstance(xml, str) or not xml.strip():
        return {"status": "ignored", "reason": "no label_config"}
    try:
        parse_label_config(xml)
    except LabelConfigError as exc:
        raise BadPayload(str(exc)) from exc
    if not _store().set_label_config(pid, xml):
        return {"status": "unchanged"}
    job = _dispatcher().refit(pid, force=False, reason="label config") if _store().annotated_tasks(pid) else None
    return {"status": "config updated", "refit_job": job}


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**12


@bp.post("/webhook")
def webhook():
    body = json_object()
    action = body.get("action")
    if not isinstance(action, str) or not action:
        raise BadPayload("'action' must be a non-empty string")
    handler = HANDLERS.get(action)
    if handler is None:
        return jsonify(status="ignored", action=action)
    pid = known_project(require_project(body.get("project")))
    reply = handler(pid, body)
    log.info("webhook %s project %s: %s", action, pid, reply.get("status"))
    return jsonify(action=action, **reply)
