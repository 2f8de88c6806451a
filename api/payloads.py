"""Validation of Label Studio's request bodies: anything malformed becomes a clear 400."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import request

from api.errors import BadPayload
from common.store import project_id


def json_object() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if body is None:
        raise BadPayload("request body must be JSON (Content-Type: application/json)")
    if not isinstance(body, dict):
        raise BadPayload("request body must be a JSON object")
    return body


def require_project(raw: Any, where: str = "project") -> int:
    try:
        return project_id(raw)
    except (TypeError, ValueError) as exc:
        raise BadPayload(f"{where}: {exc}") from exc


def task_list(body: Mapping[str, Any], key: str = "tasks") -> list[dict[str, Any]]:
    tasks = body.get(key)
    if not isinstance(tasks, list):
        raise BadPayload(f"'{key}' must be a list of tasks")
    for i, task in enumerate(tasks):
        if not isinstance(task, dict) or isinstance(task.get("id"), bool) or not isinstance(task.get("id"), int):
            raise BadPayload(f"{key}[{i}] must be an object with an integer 'id'")
        if "data" in task and not isinstance(task["data"], dict):
            raise BadPayload(f"{key}[{i}].data must be an object")
    return tasks
