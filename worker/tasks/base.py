"""What every task shares: retries on what actually fails, job reporting, and a limit on how often a
message may be started (one that keeps killing its worker must not be redelivered forever; chunks of tasks
count their starts per task instead: worker/crashing_chunks.py)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import httpx
import redis
from celery import Task
from label_studio_sdk.core.api_error import ApiError

from common import keys
from worker.runtime import ModelMissing, runtime

log = logging.getLogger(__name__)

# Redis away, Label Studio away or timing out, a model not yet readable: worth another try.
RETRYABLE: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    httpx.TransportError,
    ConnectionError,
    TimeoutError,
    ModelMissing,
)
# Also Label Studio answering with an error status (a 5xx, or a 4xx that a configuration fix will cure), for
# the tasks that only read from it (the sync): Celery's `autoretry_for`, with JobTask's backoff.
RETRYABLE_WITH_LABEL_STUDIO_ERRORS = (*RETRYABLE, ApiError)
MAX_STARTS = 3


class JobTask(Task):
    """Retries with backoff on RETRYABLE; when a task gives up, its job says so for each of its items."""

    autoretry_for = RETRYABLE
    retry_backoff = 2
    retry_backoff_max = 60
    retry_jitter = True
    max_retries = 8

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        job_id = kwargs.get("job_id")
        if job_id:
            items = [t["id"] for t in kwargs.get("tasks", [])] or [kwargs.get("project")]
            try:
                runtime().store.jobs.progress(job_id, errors={t: f"{type(exc).__name__}: {exc}" for t in items})
            except redis.RedisError:
                log.error("job %s: cannot record the failure (%s): Redis is away", job_id, exc)


def limited_starts(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Count the starts of each message (a redelivery after the worker died counts again); past MAX_STARTS
    the message fails with a reason instead of killing another worker."""

    @functools.wraps(fn)
    def run(self: Task, *args: Any, **kwargs: Any) -> Any:
        key = keys.deliveries(f"{self.request.id}:{self.request.retries}")
        r = runtime().store.r
        starts = int(r.incr(key))
        r.expire(key, 24 * 3600)
        if starts > MAX_STARTS:
            reason = f"{self.name} was started {starts - 1} times without finishing (its worker died each time)"
            log.error("message %s: %s; given up", self.request.id, reason)
            raise RuntimeError(reason)
        return fn(self, *args, **kwargs)

    return run
