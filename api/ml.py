"""Label Studio's ML-backend calls: /health, /setup, /predict, /train, /versions."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from flask import Blueprint, current_app, jsonify, request

from api.errors import BadPayload
from api.payloads import json_object, known_project, require_project, task_list
from common.collections import SCOPES
from common.delivery import BY_API, WRITING, WRITTEN
from common.label_config import LabelConfigError, parse_label_config
from common.redact import redact
from common.revisions import shown_as
from common.store import Store
from common.webhook_secret import MODEL_CLASS

bp = Blueprint("ml", __name__)
JOB_ID = re.compile(r"[0-9a-f]{32}")


def _store() -> Store:
    return current_app.extensions["store"]


@bp.get("/")
@bp.get("/health")
def health():
    return jsonify(status="UP", model_class=MODEL_CLASS, embedding_space=_store().space)


@bp.post("/setup")
def setup():
    """Label Studio connecting the backend to a project (and checking it, before every predict): the only
    call that makes a project known, so it must carry the project's label config the first time."""
    body = json_object()
    pid = require_project(body.get("project"))
    store = _store()
    new = not store.known_project(pid)
    schema = body.get("schema")
    if schema is not None and not isinstance(schema, str):
        raise BadPayload("schema must be the project's label config (XML text)")
    has_schema = isinstance(schema, str) and bool(schema.strip())
    if has_schema:
        try:
            parse_label_config(schema)
        except LabelConfigError as exc:
            raise BadPayload(f"schema: {exc}") from exc
    elif new:
        raise BadPayload(
            f"schema: required for project {pid}, which this backend has not seen yet (Label Studio sends the "
            "project's label config when it connects a backend)"
        )
    extra = body.get("extra_params")
    if isinstance(extra, str) and extra.strip():
        try:
            extra = json.loads(extra)
        except ValueError as exc:
            raise BadPayload(f"extra_params is not JSON: {exc}") from exc
    scope = extra.get("model_scope") if isinstance(extra, dict) else None
    if scope is not None and scope not in SCOPES:
        raise BadPayload(f"extra_params.model_scope must be one of {', '.join(SCOPES)}, not {str(scope)[:40]!r}")
    if has_schema:
        store.set_label_config(pid, schema)
    if scope is not None:
        store.set_model_scope(pid, scope)
    if new:
        store.current_version(pid)  # the project's version 0: it is known from now on
        # A project just connected: secure its webhook, and learn what it already holds.
        current_app.extensions["dispatcher"].sync(pid, reason="new project")
    return jsonify(model_version=store.live_version())


def _project_of(body: dict[str, Any], tasks: list[dict[str, Any]]) -> int:
    if body.get("project") is not None:
        return require_project(body["project"])
    if tasks and tasks[0].get("project") is not None:
        return require_project(tasks[0]["project"], "tasks[0].project")
    raise BadPayload("'project' is missing")


def _deliverable(store: Store, pid: int, version: str, tid: int, prediction: dict | None) -> Any:
    """A stored prediction of the current version, as Label Studio will store it (the live version name).

    Label Studio asks only for a task that lacks the live version, and stores what we answer. The hand-over
    is claimed, so the deliverer does not write it too; if the deliverer is writing it right now, it is
    handed over all the same (a blank task is worse than two copies) and the claim says so: the deliverer
    removes the second copy when its write ends (worker/delivery.py)."""
    if not prediction or not prediction.get("result"):
        return []
    if not store.delivery.claim(pid, version, tid, BY_API):
        state, _ = store.delivery.claims(pid, version, [tid]).get(tid, ("", 0.0))
        if state == WRITING:
            store.delivery.set(pid, version, [tid], BY_API)
        elif state not in (BY_API, WRITTEN):
            return []
    store.set_shown(pid, {tid: shown_as(version, prediction)})
    return {**prediction, "model_version": store.live_version()}


def _newest_answer(store: Store, pid: int, ids: list[int], *versions: str | None) -> tuple[str, dict[int, Any]]:
    """The task's answer of the version current now, else of the first of `versions` that holds one. While
    annotations arrive, a refit publishes a version every few seconds, and the worker predicts the open task
    with the version current when it runs: newer than the one the wait began with, and perhaps already
    superseded by another (which may hold no answer for the task while an import outgrows it,
    worker/predicting.py `outgrown`)."""
    current = store.current_version(pid)
    for version in dict.fromkeys(v for v in (current, *versions) if v):
        if stored := store.predictions(pid, version, ids):
            return version, stored
    return current, {}


@bp.post("/predict")
def predict():
    body = json_object()
    tasks = task_list(body, limited=True)
    config = body.get("label_config")
    if config is not None and not isinstance(config, str):
        raise BadPayload("label_config must be the project's label config (XML text)")
    if not tasks:
        if body.get("project") is not None:
            require_project(body["project"])
        return jsonify(results=[])
    pid = known_project(_project_of(body, tasks))
    store: Store = _store()
    settings = current_app.config["SETTINGS"]
    if isinstance(config, str) and config.strip():
        try:
            parse_label_config(config)
        except LabelConfigError as exc:
            raise BadPayload(f"label_config: {exc}") from exc
        store.set_label_config(pid, config)
    version = store.current_version(pid)
    ids = [t["id"] for t in tasks]
    stored = store.predictions(pid, version, ids)
    missing = [t for t in tasks if t["id"] not in stored]
    dispatcher = current_app.extensions["dispatcher"]
    if len(tasks) == 1 and missing:
        # The annotator has this task open: the interactive lane, even if a bulk job holds it too.
        dispatcher.ingest(pid, missing, kind="predict", interactive=True)
        deadline = time.monotonic() + settings.predict_wait_seconds
        while not stored and (left := deadline - time.monotonic()) > 0:
            woken = store.wait_for_prediction(pid, version, ids[0], left)
            version, stored = _newest_answer(store, pid, ids, woken, version)
    elif missing:
        dispatcher.ingest(pid, missing, kind="predict")
    results = [_deliverable(store, pid, version, tid, stored.get(tid)) for tid in ids]
    return jsonify(results=results, model_version=store.live_version())


@bp.post("/train")
def train():
    """Older Label Studio versions call /train; 1.23 sends START_TRAINING to /webhook instead."""
    body = json_object()
    pid = known_project(require_project(body.get("project")))
    job = current_app.extensions["dispatcher"].sync(pid, retrain=True, reason="training")
    return jsonify(status="queued", job=job), 201


@bp.post("/sync")
def sync():
    """Reconcile a project with Label Studio now (what the periodic sweep does): `{"project": id}`, and
    `"retrain": true` to refit even if no annotation changed."""
    body = json_object()
    pid = require_project(body.get("project"))
    retrain = body.get("retrain", False)
    if not isinstance(retrain, bool):
        raise BadPayload("'retrain' must be true or false")
    known_project(pid)
    job = current_app.extensions["dispatcher"].sync(pid, retrain=retrain, reason="requested")
    return jsonify(status="queued", job=job), 202


@bp.get("/versions")
def versions():
    """`versions`: what Label Studio's model-version list offers, the live version (the only name its
    predictions carry). `projects`: each project's model versions, the answers the live version has carried
    (`?project=<id>` for one)."""
    store = _store()
    raw = request.args.get("project")
    pids = [require_project(raw)] if raw else store.projects()
    details = {str(pid): store.versions(pid) for pid in pids}
    return jsonify(versions=[store.live_version()], projects=details)


@bp.get("/jobs/<job_id>")
def job(job_id: str):
    if not JOB_ID.fullmatch(job_id):
        return jsonify(error="a job id is 32 hexadecimal digits"), 404
    found = _store().jobs.get(job_id)
    if found is None:
        return jsonify(error=f"no job {job_id}"), 404
    job = found.as_dict()
    # The workers' failure reasons may quote an exception (the Label Studio SDK's shows its response headers).
    secrets = current_app.config["SETTINGS"].deployment_secrets()
    job["errors"] = [{**e, "error": redact(str(e.get("error", "")), secrets)} for e in job["errors"]]
    return jsonify(job)
