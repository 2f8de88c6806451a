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
from urllib3.util import parse_url

from common.webhook_secret import HEADER
from worker.http_client import origin

log = logging.getLogger(__name__)

CLIENT_TIMEOUT_SECONDS = 60
SYNC_PAGE_SIZE = 200
NO_RETRIES = {"max_retries": 0}
# A task with its data and whole annotations. Listed with every field instead (`include` left out), each task
# cost Label Studio 1.23 5-11 ms of CPU, for the Data Manager's columns computed and serialised beside them;
# listed so, 1-2 ms (bench/RESULTS.md, "What a sweep costs Label Studio"). An `include`d `annotations` alone
# holds their ids only: `expand` makes them whole (its serializer's `expandable_fields`).
WITH_ANNOTATIONS = "id,data,annotations"
EXPAND_ANNOTATIONS = {"additional_query_parameters": {"expand": "annotations"}}


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


@dataclass(frozen=True)
class Row:
    """One prediction Label Studio holds for a task."""

    id: int
    model_version: str
    result: list[dict[str, Any]]
    score: float


@dataclass
class LabelStudioTask:
    """A task as the reconciliation sweep sees it."""

    id: int
    data: dict[str, Any]
    annotations: list[dict[str, Any]] = field(default_factory=list)


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
        """These tasks, SYNC_PAGE_SIZE a request. The SDK's pager asks for pages until one is empty, and Label
        Studio answers a page past the end with 404 after counting the selection again: once a page has held
        every task asked for, the next is not asked (a revision of 20 tasks made that request every time, about
        a tenth of what a revision cost Label Studio)."""
        ids = list(task_ids)
        for start in range(0, len(ids), SYNC_PAGE_SIZE):
            chunk = ids[start : start + SYNC_PAGE_SIZE]
            query = json.dumps({"selectedItems": {"all": False, "included": chunk}})
            pager = self.client.tasks.list(project=pid, query=query, fields="all", include=include,
                                           page_size=SYNC_PAGE_SIZE, request_options=_options(include))  # fmt: skip
            # Fewer than asked (tasks deleted, a TASK_API_PAGE_SIZE_MAX below ours): the pager reads on.
            for found, task in enumerate(pager, 1):
                yield task
                if found == len(chunk):
                    break

    def rows(self, pid: int, task_ids: Iterable[int]) -> dict[int, list[Row]]:
        """Every prediction these tasks hold (a listing of the selected tasks: about 1.6 ms of Label Studio's
        CPU a task; the API's per-task `GET /api/predictions?task=` costs 35 ms, bench/RESULTS.md)."""
        return {int(task.id): _rows(task) for task in self._selected(pid, task_ids, "id,predictions")}

    def delete_task_predictions(self, pid: int, task_ids: Iterable[int]) -> None:
        """Every prediction of these tasks, in one request (the Data Manager's "Delete predictions"): only for
        tasks whose every prediction is ours (worker/delivery.py checks)."""
        ids = list(task_ids)
        if ids:
            self.client.actions.create(id="delete_tasks_predictions", project=pid,
                                       selected_items={"all": False, "included": ids})  # fmt: skip

    def project_model_version(self, pid: int) -> str:
        return str(self.client.projects.get(id=pid).model_version or "")

    def set_project_model_version(self, pid: int, version: str) -> None:
        self.client.projects.update(id=pid, model_version=version)

    def backend_titles(self, pid: int) -> set[str]:
        """Titles of the project's ML backends: while the project's model version names one, Label Studio asks
        that backend (/setup, /predict) for each task opened."""
        return {str(b.title or "") for b in self.client.ml.list(project=pid)}

    def tasks(self, pid: int, task_ids: Iterable[int]) -> Iterator[LabelStudioTask]:
        """These tasks with their data and annotations."""
        for task in self._selected(pid, task_ids, WITH_ANNOTATIONS):
            yield _task(task)

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

    def _filtered(self, pid: int, items: list[dict[str, Any]], include: str) -> Iterator[Any]:
        """The project's tasks that pass every Data Manager filter in `items`, with the `include`d fields only."""
        query = json.dumps({"filters": {"conjunction": "and", "items": items}})
        yield from self.client.tasks.list(project=pid, query=query, fields="all", include=include,
                                          page_size=SYNC_PAGE_SIZE, request_options=_options(include))  # fmt: skip

    def task_count(self, pid: int) -> int:
        return int(self.client.projects.get(id=pid).task_number or 0)

    def tasks_after(self, pid: int, last_id: int) -> Iterator[LabelStudioTask]:
        """Tasks created after task `last_id` (ids only grow), with their data and annotations."""
        items = [{"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": last_id}]
        for task in self._filtered(pid, items, WITH_ANNOTATIONS):
            yield _task(task)

    def annotated_tasks(self, pid: int) -> Iterator[LabelStudioTask]:
        """Tasks with at least one annotation, with them: a listing whose cost grows with the annotations, not
        with the project."""
        items = [{"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}]
        for task in self._filtered(pid, items, WITH_ANNOTATIONS):
            yield _task(task)

    def tasks_lacking(self, pid: int, version: str) -> dict[int, list[str]]:
        """Tasks without annotations that hold no prediction of `version`, with the versions they do hold."""
        items = [
            {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
            {"filter": "filter:tasks:predictions_model_versions", "operator": "not_contains", "type": "List",
             "value": version},
        ]  # fmt: skip
        return {
            int(task.id): _versions(getattr(task, "predictions_model_versions", None))
            for task in self._filtered(pid, items, "id,predictions_model_versions")
        }

    def crowded_tasks(self, pid: int) -> dict[int, list[Row]]:
        """Tasks holding more than one prediction, with their predictions (duplicates are among them)."""
        items = [{"filter": "filter:tasks:total_predictions", "operator": "greater", "type": "Number", "value": 1}]
        return {int(task.id): _rows(task) for task in self._filtered(pid, items, "id,predictions")}

    def task_ids(self, pid: int) -> set[int]:
        """Every task id of the project (only when the counts say tasks went missing: it lists them all)."""
        return {int(task.id) for task in self._filtered(pid, [], "id")}

    def secure_webhooks(self, pid: int, secret: str, backend_url: str) -> list[int]:
        """Label Studio creates the project's webhook `<backend>/webhook` itself when the backend is connected,
        without headers: add the secret header to the project's webhooks that post to this deployment,
        `<backend_url>/webhook` (BACKEND_URL). Nothing is asked of any server: whatever this backend answers,
        a copy of it can answer too. Returns the webhooks changed."""
        ours = webhook_target(f"{backend_url.rstrip('/')}/webhook")
        changed = []
        for hook in self.client.webhooks.list(project=str(pid)):
            headers = dict(hook.headers or {})
            if ours is not None and webhook_target(hook.url or "") == ours and headers.get(HEADER) != secret:
                self.client.webhooks.update(id=hook.id, headers={**headers, HEADER: secret})
                changed.append(int(hook.id))
        return changed

    def delete_prediction(self, prediction_id: int) -> None:
        self.client.predictions.delete(id=prediction_id)

    def replace_prediction(self, prediction_id: int, version: str, prediction: Mapping[str, Any]) -> None:
        """Change a prediction in place (`PATCH /api/predictions/<id>`): the task holds it throughout."""
        self.client.predictions.update(
            id=prediction_id, result=list(prediction["result"]), score=prediction["score"], model_version=version
        )


def _options(include: str) -> dict[str, Any] | None:
    return EXPAND_ANNOTATIONS if include == WITH_ANNOTATIONS else None


def _task(task: Any) -> LabelStudioTask:
    """Raises ValueError for an annotation listed without its result (a Label Studio that ignored `expand`):
    read as one, it would teach "no choice" in place of its labels."""
    annotations = [_as_dict(a) for a in task.annotations or []]
    if any("result" not in a for a in annotations):
        raise ValueError(f"Label Studio listed task {task.id}'s annotations without their results")
    return LabelStudioTask(int(task.id), dict(task.data or {}), annotations)


def _versions(aggregated: Any) -> list[str]:
    """`predictions_model_versions` as Label Studio lists it: a list (PostgreSQL) or a comma-joined string
    (SQLite)."""
    if isinstance(aggregated, list | tuple):
        return [str(v) for v in aggregated if v]
    return [v for v in str(aggregated or "").split(",") if v]


def _rows(task: Any) -> list[Row]:
    return [
        Row(int(p["id"]), p.get("model_version") or "", list(p.get("result") or []), float(p.get("score") or 0))
        for p in map(_as_dict, getattr(task, "predictions", None) or [])
    ]


def webhook_target(url: str) -> tuple[tuple[str, str, int], str] | None:
    """Where a webhook posts: the origin a client connects to (urllib3's parse; `worker.http_client.origin`)
    and the path, without empty segments or a trailing slash. None for a URL that parsers read differently
    (a user name, a backslash: never this deployment's) or that is no URL."""
    try:
        where = origin(url)
        path = parse_url(url).path or ""
    except ValueError:
        return None
    return where, "/" + "/".join(part for part in path.split("/") if part)


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    return item.dict() if hasattr(item, "dict") else dict(item)
