"""What an operator asks: which projects, and where each stands (`GET /projects/<id>`)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from api.payloads import require_project
from common.store import Store

bp = Blueprint("projects", __name__)
MAX_FAILURES_SHOWN = 200


def _store() -> Store:
    return current_app.extensions["store"]


@bp.get("/projects")
def projects():
    return jsonify(projects=_store().projects())


@bp.get("/projects/<raw>")
def project(raw: str):
    """Tasks known, embedded, waiting, failed (with each reason and the job that reports it), predicted with
    the current version, the outbox to Label Studio, and the last reconciliation."""
    store = _store()
    pid = require_project(raw)
    if not store.known_project(pid):
        return jsonify(error=f"no project {pid}"), 404
    version = store.current_version(pid)
    featured, annotated = store.featured_tasks(pid), store.annotated_tasks(pid)
    predicted = store.predicted_tasks(pid, version)
    failures = store.failures(pid)
    shown = sorted(failures.items(), key=lambda item: -item[1].get("at", 0))[:MAX_FAILURES_SHOWN]
    return jsonify(
        project=pid,
        model_version=version,
        versions=len(store.versions(pid)),
        tasks={
            "known": len(store.known_tasks(pid) | featured),
            "embedded": len(featured),
            "queued": len(store.pending(pid)),
            "failed": len(failures),
            "annotated": len(annotated),
            "predicted": len(predicted & (featured - annotated)),
            "awaiting_prediction": len(featured - annotated - predicted),
        },
        outbox=store.delivery.size(pid),
        last_sync=store.last_sync(pid),
        failures=[{"task": t, **f} for t, f in shown],
    )
