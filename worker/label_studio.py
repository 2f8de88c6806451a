"""What the workers ask of Label Studio, through label-studio-sdk 2.x: write predictions, read back what
it holds, and list a project for reconciliation.

Writing predictions is not idempotent (Label Studio never de-duplicates them), so that call runs with the
SDK's own retries off: a retry after a dropped connection could store a second copy. Its outcome is checked
instead (`created`, and on doubt, which tasks hold the version). Reads retry as the SDK does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import httpx
import redis

# Imported with this module, so in the Celery main process before it forks the pool: importing the SDK costs
# about half a CPU second, which each pool process would otherwise pay on its first write, in an import.
from label_studio_sdk import LabelStudio, PredictionRequest
from label_studio_sdk.core.api_error import ApiError

from common.webhook_secret import HEADER, MODEL_CLASS, instance_id

log = logging.getLogger(__name__)

CLIENT_TIMEOUT_SECONDS = 60
SYNC_PAGE_SIZE = 200
NO_RETRIES = {"max_retries": 0}


def is_transient(exc: BaseException) -> bool:
    """Worth trying again later: the network, a timeout, Label Studio or Redis briefly away, a 5xx or 429.
    Not: a refused request (4xx), which a retry would only repeat."""
    if isinstance(exc, ApiError):
        return exc.status_code is None or exc.status_code >= 500 or exc.status_code in (408, 409, 429)
    return isinstance(
        exc, httpx.TransportError | redis.ConnectionError | redis.TimeoutError | ConnectionError | TimeoutError
    )


# How Label Studio 1.23 words it, by path: the default import, with `fflag_feat_utc_210_...` (per prediction),
# and with `fflag_fix_back_4620_memory_efficient_predictions_import_...` (which the README recommends).
MISSING_TASK_MARKERS = ("couldn't be retrieved", "not found in project")


def missing_task_error(exc: BaseException) -> bool:
    """Label Studio refuses a whole prediction import when one of its tasks was deleted meanwhile."""
    if not (isinstance(exc, ApiError) and exc.status_code == 400):
        return False
    # The SDK hands over the parsed JSON: its repr would escape the apostrophe of "couldn't".
    body = exc.body if isinstance(exc.body, str) else json.dumps(exc.body, ensure_ascii=False, default=str)
    return any(marker in body for marker in MISSING_TASK_MARKERS)


@dataclass
class LabelStudioTask:
    """A task as the reconciliation sweep sees it."""

    id: int
    data: dict[str, Any]
    annotations: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)  # {id, model_version}


class LabelStudioApi:
    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url
        self.api_key = api_key

    @cached_property
    def client(self) -> LabelStudio:
        """Made on first use, in the process that uses it (one per process, after fork)."""
        return LabelStudio(base_url=self.base_url, api_key=self.api_key, timeout=CLIENT_TIMEOUT_SECONDS)

    def import_predictions(self, pid: int, version: str, predictions: Mapping[int, Mapping[str, Any]]) -> int:
        """One request for all of them; returns how many Label Studio stored (it drops invalid ones)."""
        request = [
            PredictionRequest(task=tid, result=p["result"], score=p["score"], model_version=version)
            for tid, p in predictions.items()
        ]
        reply = self.client.projects.import_predictions(id=pid, request=request, request_options=NO_RETRIES)
        return int(reply.created or 0)

    def _selected(self, pid: int, task_ids: Iterable[int], include: str) -> Iterator[Any]:
        ids = list(task_ids)
        for start in range(0, len(ids), SYNC_PAGE_SIZE):
            query = json.dumps({"selectedItems": {"all": False, "included": ids[start : start + SYNC_PAGE_SIZE]}})
            yield from self.client.tasks.list(
                project=pid, query=query, fields="all", include=include, page_size=SYNC_PAGE_SIZE
            )

    def tasks_holding(self, pid: int, version: str, task_ids: Iterable[int]) -> set[int]:
        """Which of these tasks hold a prediction of `version` (to settle a write whose outcome is unknown)."""
        held = set()
        for task in self._selected(pid, task_ids, "id,predictions_model_versions"):
            if version in (getattr(task, "predictions_model_versions", "") or "").split(","):
                held.add(int(task.id))
        return held

    def existing_tasks(self, pid: int, task_ids: Iterable[int]) -> set[int]:
        return {int(task.id) for task in self._selected(pid, task_ids, "id")}

    def project_exists(self, pid: int) -> bool:
        try:
            self.client.projects.get(id=pid)
        except ApiError as exc:
            if exc.status_code == 404:
                return False
            raise
        return True

    def label_config(self, pid: int) -> str:
        return str(self.client.projects.get(id=pid).label_config or "")

    def project_tasks(self, pid: int) -> Iterator[LabelStudioTask]:
        """Every task of the project with its annotations and predictions, page by page."""
        for task in self.client.tasks.list(project=pid, fields="all", page_size=SYNC_PAGE_SIZE):
            yield LabelStudioTask(
                id=int(task.id),
                data=dict(task.data or {}),
                annotations=[_as_dict(a) for a in task.annotations or []],
                predictions=[
                    {"id": int(p["id"]), "model_version": p.get("model_version") or ""}
                    for p in map(_as_dict, task.predictions or [])
                ],
            )

    def secure_webhooks(self, pid: int, secret: str) -> list[int]:
        """Label Studio creates the project's webhook `<backend>/webhook` itself when the backend is connected,
        without headers: add the secret header to those of the project's ML backends that are this
        deployment (their /health shows its instance id). Returns the webhooks changed."""
        mine = instance_id(secret)
        targets = set()
        for backend in self.client.ml.list(project=pid):
            url = (backend.url or "").rstrip("/")
            try:
                health = httpx.get(f"{url}/health", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                continue
            if health.get("model_class") == MODEL_CLASS and health.get("instance") == mine:
                targets.add(f"{url}/webhook")
        changed = []
        for hook in self.client.webhooks.list(project=str(pid)):
            headers = dict(hook.headers or {})
            if (hook.url or "").rstrip("/") in targets and headers.get(HEADER) != secret:
                self.client.webhooks.update(id=hook.id, headers={**headers, HEADER: secret})
                changed.append(int(hook.id))
        return changed

    def delete_prediction(self, prediction_id: int) -> None:
        self.client.predictions.delete(id=prediction_id)


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    return item.dict() if hasattr(item, "dict") else dict(item)
