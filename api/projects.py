"""What an operator asks: which projects, and where each stands (`GET /projects/<id>`)."""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, current_app, jsonify

from api.payloads import require_project
from common.store import Store

bp = Blueprint("projects", __name__)
MAX_FAILURES_SHOWN = 200
TOP_REASONS = 10
EXAMPLE_TASKS = 5


def _store() -> Store:
    return current_app.extensions["store"]


@bp.get("/projects")
def projects():
    return jsonify(projects=_store().projects())


@bp.get("/projects/<raw>")
def project(raw: str):
    """Tasks known, embedded, waiting, failed (with each reason and the job that reports it, and the most
    common reasons), predicted with the current version, the outbox to Label Studio, and the last
    reconciliation."""
    store = _store()
    pid = require_project(raw)
    if not store.known_project(pid):
        return jsonify(error=f"no project {pid}"), 404
    return jsonify(project_status(store, pid))


def project_status(store: Store, pid: int) -> dict[str, Any]:
    """What `GET /projects/<id>` answers (and the status page shows)."""
    version = store.current_version(pid)
    featured, annotated = store.featured_tasks(pid), store.annotated_tasks(pid)
    predicted = store.predicted_tasks(pid, version)
    failures = store.failures(pid)
    latest = sorted(failures.items(), key=lambda item: -item[1].get("at", 0))[:MAX_FAILURES_SHOWN]
    in_label_studio = {t: s for t, s in store.shown(pid).items() if t not in annotated}
    return {
        "project": pid,
        "model_version": version,
        "versions": len(store.versions(pid)),
        "tasks": {
            "known": len(store.known_tasks(pid) | featured),
            "embedded": len(featured),
            "queued": store.pending_count(pid),
            "failed": len(failures),
            "annotated": len(annotated),
            "predicted": len(predicted & (featured - annotated)),
            "awaiting_prediction": len(featured - annotated - predicted),
        },
        "outbox": store.delivery.size(pid),
        "label_studio": {
            "live_version": store.live_version(),
            "shows": len(in_label_studio),
            "shows_current": sum(1 for s in in_label_studio.values() if s.version == version),
            "project_model_version": store.switched_to(pid) == store.live_version(),
        },
        "last_sync": store.last_sync(pid),
        "failures": [{"task": t, **f} for t, f in latest],
        "failure_reasons": failure_reasons(failures),
    }


# What differs between two failures of the same kind: the URL or path, quoted names, sizes, task ids.
_VARIABLE_PARTS = (
    (re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+"), "<url>"),
    (re.compile(r"'[^']*'|\"[^\"]*\""), "'…'"),
    (re.compile(r"\b\d+x\d+\b"), "WxH"),
    (re.compile(r"\btask \d+"), "task N"),
    (re.compile(r"\b\d{4,}\b"), "N"),
)


def reason_kind(reason: str) -> str:
    """A failure's reason without what varies from one task to the next, so that alike failures count as one."""
    for pattern, replacement in _VARIABLE_PARTS:
        reason = pattern.sub(replacement, reason)
    return reason


def failure_reasons(failures: dict[int, dict[str, Any]], top: int = TOP_REASONS) -> list[dict[str, Any]]:
    """The most common kinds of failure: how many tasks each, how many may pass on a retry, an example
    reason and a few of its tasks."""
    kinds: dict[str, dict[str, Any]] = {}
    for tid, failure in sorted(failures.items()):
        reason = str(failure.get("reason", ""))
        entry = kinds.setdefault(reason_kind(reason), {"count": 0, "transient": 0, "example": reason, "tasks": []})
        entry["count"] += 1
        entry["transient"] += bool(failure.get("transient"))
        if len(entry["tasks"]) < EXAMPLE_TASKS:
            entry["tasks"].append(tid)
    ranked = sorted(kinds.items(), key=lambda item: -item[1]["count"])[:top]
    return [{"reason": kind, **entry} for kind, entry in ranked]
