"""Validation of Label Studio's request bodies: anything malformed becomes a clear 400, anything too big a 413."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import current_app, request

from api.errors import BadPayload, TooLarge, UnknownProject
from common.store import Store, project_id

# How deep a task's `data` may nest. Label Studio's image tasks hold a URL and a few fields; a task nested
# hundreds of levels deep parses here but would fail the worker's decoding of its whole chunk.
MAX_DATA_DEPTH = 32


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether lists and objects in `value` nest more than `limit` levels (counted without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _check_length() -> None:
    """MAX_CONTENT_LENGTH refuses a declared Content-Length over it (413), but werkzeug reads a chunked body
    (no Content-Length) only up to it, silently: a body cut there must be refused as too large, not parsed."""
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if not limit or request.content_length is not None:
        return
    if len(request.get_data(cache=True)) >= limit and request.environ["wsgi.input"].read(1):
        raise TooLarge(f"request body larger than {limit} bytes (MAX_REQUEST_BYTES)")


def json_object() -> dict[str, Any]:
    _check_length()
    try:
        body = request.get_json(silent=True)
    except RecursionError as exc:
        raise BadPayload("request body: JSON nested too deeply") from exc
    if body is None:
        raise BadPayload("request body must be JSON (Content-Type: application/json)")
    if not isinstance(body, dict):
        raise BadPayload("request body must be a JSON object")
    return body


def require_project(raw: Any, where: str = "project") -> int:
    """Label Studio's project reference: `"<id>.<created-unix-ts>"`, an integer, or an object with such an `id`."""
    inner = raw.get("id") if isinstance(raw, Mapping) else raw
    if inner is not None and not isinstance(inner, str) and (isinstance(inner, bool) or not isinstance(inner, int)):
        raise BadPayload(f"{where}: a project id is an integer or '<id>.<timestamp>' text, not {type(inner).__name__}")
    try:
        return project_id(raw)
    except (TypeError, ValueError) as exc:
        raise BadPayload(f"{where}: {exc}") from exc


def known_project(pid: int) -> int:
    """`pid` when a /setup made it known; UnknownProject otherwise. Label Studio calls /setup (with the
    project's label config) whenever a backend is connected, before any predict, and again on every read of
    the model connection: only a request for a project it never connected lands here."""
    store: Store = current_app.extensions["store"]
    if not store.known_project(pid):
        raise UnknownProject(
            f"unknown project {pid}: connect this backend to it in Label Studio (Settings > Model), which calls "
            "/setup with its label config first"
        )
    return pid


def task_list(body: Mapping[str, Any], key: str = "tasks", *, limited: bool = False) -> list[dict[str, Any]]:
    """The tasks of a body; `limited`: at most MAX_TASKS_PER_REQUEST of them (those that queue work)."""
    tasks = body.get(key)
    if not isinstance(tasks, list):
        raise BadPayload(f"'{key}' must be a list of tasks")
    limit = current_app.config["SETTINGS"].max_tasks_per_request
    if limited and len(tasks) > limit:
        raise TooLarge(f"{len(tasks)} tasks in one request; at most {limit} (MAX_TASKS_PER_REQUEST)")
    for i, task in enumerate(tasks):
        if not isinstance(task, dict) or isinstance(task.get("id"), bool) or not isinstance(task.get("id"), int):
            raise BadPayload(f"{key}[{i}] must be an object with an integer 'id'")
        if not 0 < task["id"] < 10**12:
            raise BadPayload(f"{key}[{i}].id must be a positive task id")
        if "data" in task and not isinstance(task["data"], dict):
            raise BadPayload(f"{key}[{i}].data must be an object")
        if "data" in task and nested_deeper_than(task["data"], MAX_DATA_DEPTH):
            raise BadPayload(f"{key}[{i}].data nests deeper than {MAX_DATA_DEPTH} levels")
    return tasks
