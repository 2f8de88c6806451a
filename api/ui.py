"""The status page: `/ui/` lists the projects; `/ui/projects/<id>` shows where one stands (import progress,
failure reasons), its model versions over time and its embedding map.

Plain HTML from templates and one small script (api/static/status.js) that draws the plots: no build step,
nothing fetched from elsewhere (a Content-Security-Policy keeps it so). Every number comes from Redis in
the request, except the embedding map, which a worker computes after each refit (worker/projection.py) and
this module hands over as stored (gzip-compressed JSON): the page stays as fast for 50,000 tasks as for 50.
Auth as every other route (api/auth.py).
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, render_template, request

from api.payloads import json_object, require_project
from api.projects import project_status
from common.store import Store, version_number

bp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates", static_folder="static")

MAX_VERSIONS_PLOTTED = 500
FAILURES_LISTED = 20
# Per-tag evidence fields plotted as accuracies: numbers from 0 to 1 whose name says what they measure.
ACCURACY_WORDS = ("accuracy", "f1", "precision", "recall", "purity")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip


def _store() -> Store:
    return current_app.extensions["store"]


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers.setdefault("Cache-Control", "no-cache")
    return response


@bp.get("/")
def index():
    store = _store()
    rows = []
    for pid in store.projects():
        versions = store.versions(pid)
        rows.append({
            "id": pid,
            "version": store.current_version(pid),
            "versions": len(versions),
            "embedded": store.embedding_count(pid),
            "annotated": _number(versions[-1].get("annotated")) if versions else None,
        })  # fmt: skip
    return render_template("ui/index.html", projects=rows)


@bp.get("/projects/<raw>")
def project_page(raw: str):
    store = _store()
    pid = require_project(raw)
    if not store.known_project(pid):
        return render_template("ui/missing.html", pid=pid), 404
    status = project_status(store, pid)
    tasks = status["tasks"]
    known = max(1, tasks["known"])
    to_predict = max(1, tasks["embedded"] - tasks["annotated"])
    bars = {
        "import": [("embedded", tasks["embedded"] / known), ("queued", tasks["queued"] / known),
                   ("failed", tasks["failed"] / known)],
        "predicted": [("predicted", tasks["predicted"] / to_predict)],
    }  # fmt: skip
    return render_template(
        "ui/project.html",
        pid=pid,
        status=status,
        bars={name: [(cls, _percent(share)) for cls, share in parts] for name, parts in bars.items()},
        failures=status["failures"][:FAILURES_LISTED],
        versions=version_points(store.versions(pid)[-MAX_VERSIONS_PLOTTED:]),
        label_studio_url=current_app.config["SETTINGS"].label_studio_url,
    )


@bp.get("/projects/<raw>/map.json")
def project_map(raw: str):
    """The embedding map as the worker stored it (keys.projection), gzip-compressed for browsers that take
    it so (all do); 404 before the first refit has made one."""
    store = _store()
    pid = require_project(raw)
    blob = store.projection(pid)
    if blob is None:
        return jsonify(error="no map yet: it is computed after the first refit (or on request)", project=pid), 404
    if "gzip" in request.accept_encodings:
        response = Response(blob, mimetype="application/json")
        response.headers["Content-Encoding"] = "gzip"
    else:
        response = Response(gzip.decompress(blob), mimetype="application/json")
    response.headers["Vary"] = "Accept-Encoding"
    response.add_etag()
    return response.make_conditional(request)


@bp.post("/projects/<raw>/map")
def refresh_map(raw: str):
    """Queue a new map (what a refit does): a JSON body is required, so that no plain cross-site form can."""
    json_object()
    store = _store()
    pid = require_project(raw)
    if not store.known_project(pid):
        return jsonify(error=f"no project {pid}"), 404
    current_app.extensions["dispatcher"].refresh_map(pid)
    return jsonify(project=pid, queued=True), 202


# -- model versions, read defensively (the learner's evidence changes shape as it evolves) ----------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


def _tag_stats(stats: Mapping[str, Any]) -> dict[str, Any]:
    """From one tag's evidence: its accuracy-like numbers (0..1), its annotation count, and which evidence
    answered, whatever other fields there are."""
    accuracy = {
        name: round(float(value), 4)
        for name, value in stats.items()
        if any(word in str(name).lower() for word in ACCURACY_WORDS) and _number(value) is not None and 0 <= value <= 1
    }
    annotated = _number(stats.get("annotated"))
    if annotated is None:
        annotated = _number(stats.get("cv_tasks"))
    if annotated is None and isinstance(stats.get("labels"), Mapping):
        annotated = sum(v for v in stats["labels"].values() if _number(v) is not None) or None
    out: dict[str, Any] = {"accuracy": accuracy, "annotated": annotated}
    if isinstance(stats.get("evidence"), str):
        out["answered_by"] = stats["evidence"]
    return out


def _evidence(entry: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """{tag: stats} of a version: its `evidence`, and each image collection's (`collections`, per bucket)
    as `<tag> · <collection>`."""
    found: dict[str, Mapping[str, Any]] = {}
    evidence = entry.get("evidence")
    if isinstance(evidence, Mapping):
        found.update({str(tag): stats for tag, stats in evidence.items() if isinstance(stats, Mapping)})
    collections = entry.get("collections")
    if isinstance(collections, Mapping):
        for name, stats in collections.items():
            inner = stats.get("evidence") if isinstance(stats, Mapping) else None
            if isinstance(inner, Mapping):
                found.update({f"{tag} · {name}": s for tag, s in inner.items() if isinstance(s, Mapping)})
    return found


def version_points(entries: list[Any]) -> list[dict[str, Any]]:
    """One point per version for the plot: when, why, how many tasks and annotations, and per tag its
    accuracy-like fields and annotation count. Fields that are missing or not numbers are left out."""
    points = []
    for i, entry in enumerate(e for e in entries if isinstance(e, Mapping)):
        name = str(entry.get("version", ""))
        tags = {tag: _tag_stats(stats) for tag, stats in _evidence(entry).items()}
        annotated = _number(entry.get("annotated"))
        points.append({
            "version": name,
            "number": version_number(name) if version_number(name) is not None else i,
            "created": _number(entry.get("created")),
            "reason": str(entry.get("reason", "")),
            "tasks": _number(entry.get("tasks")),
            "annotated": annotated if annotated is not None else 0,
            "tags": tags,
        })  # fmt: skip
    return points


def _percent(share: float) -> str:
    return f"{max(0.0, min(1.0, share)) * 100:.1f}"
