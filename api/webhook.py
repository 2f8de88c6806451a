"""Label Studio's webhooks: validate, record, queue, answer in milliseconds (it waits 1 s, never retries)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, current_app, jsonify

from api.errors import BadPayload
from api.payloads import json_object, require_project, task_list
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
    project = body.get("project")
    xml = project.get("label_config") if isinstance(project, dict) else None
    if isinstance(xml, str) and xml.strip():
        _store().set_label_config(pid, xml)
    else:
        xml = _store().label_config(pid)
    if not xml:
        raise BadPayload(f"no label config known for project {pid}; send PROJECT_UPDATED or /setup first")
    try:
        return parse_label_config(xml)
    except LabelConfigError as exc:
        raise BadPayload(str(exc)) from exc


def _objects(body: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = body.get(key)
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(i, dict) for i in items):
        raise BadPayload(f"'{key}' must be an object or a list of objects")
    return items


@handles("TASKS_CREATED")
def tasks_created(pid: int, body: dict[str, Any]) -> dict[str, Any]:
    tasks = task_list(body)
    if isinstance(body.get("project"), dict) and body["project"].get("label_config"):
        _store().set_label_config(pid, body["project"]["label_config"])
    if not tasks:
        return {"status": "ignored", "reason": "no tasks"}
    return {"status": "queued", "job": _dispatcher().predict(pid, tasks), "tasks": len(tasks)}


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
    sent_tasks = _objects(body, "task") if body.get("task") else []
    tasks = {t["id"]: t for t in sent_tasks if isinstance(t.get("id"), int)}
    annotated = []
    for ann in annotations:
        task_id = ann.get("task")
        task_id = task_id.get("id") if isinstance(task_id, dict) else task_id
        if not isinstance(ann.get("id"), int) or not isinstance(task_id, int):
            raise BadPayload("each annotation needs an integer 'id' and 'task'")
        store.set_labels(pid, ann["id"], task_id, annotation_labels(ann, config))
        annotated.append(task_id)
    sent = [t for t in dict.fromkeys(annotated) if t in tasks]
    embedded = store.tasks_with_embeddings(pid, sent)
    unembedded = [tasks[t] for t in sent if t not in embedded]
    if unembedded:
        _dispatcher().predict(pid, unembedded, embed_only=True, kind="embed")
    refit_job = _dispatcher().after_labels_changed(pid)
    return {"status": "recorded", "annotations": len(annotations), "refit_job": refit_job}


@handles("ANNOTATIONS_DELETED")
def annotations_deleted(pid: int, body: dict[str, Any]) -> dict[str, Any]:
    ids = [a.get("id") for a in _objects(body, "annotations")]
    if not all(isinstance(i, int) for i in ids):
        raise BadPayload("'annotations' items need an integer 'id'")
    touched = _store().delete_annotations(pid, ids)
    refit_job = _dispatcher().after_labels_changed(pid) if touched else None
    return {"status": "recorded", "tasks": touched, "refit_job": refit_job}


@handles("START_TRAINING")
def start_training(pid: int, body: dict[str, Any]) -> dict[str, Any]:
    _config(pid, body)
    return {"status": "queued", "job": _dispatcher().refit(pid, force=True)}


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
    job = _dispatcher().refit(pid, force=True) if _store().labels(pid) else None
    return {"status": "config updated", "refit_job": job}


@bp.post("/webhook")
def webhook():
    body = json_object()
    action = body.get("action")
    if not isinstance(action, str) or not action:
        raise BadPayload("'action' must be a non-empty string")
    handler = HANDLERS.get(action)
    if handler is None:
        return jsonify(status="ignored", action=action)
    pid = require_project(body.get("project"))
    reply = handler(pid, body)
    log.info("webhook %s project %s: %s", action, pid, reply.get("status"))
    return jsonify(action=action, **reply)
