"""Label Studio: write the outbox, reconcile a project, and the periodic runs (Celery beat)."""

from __future__ import annotations

from typing import Any

from common import queues
from worker.celery_app import app
from worker.delivery import deliver_outbox
from worker.runtime import runtime
from worker.sync import sync_all, sync_project, tick
from worker.tasks.base import RETRYABLE_WITH_LABEL_STUDIO_ERRORS, JobTask, limited_starts


@app.task(name=queues.DELIVER, base=JobTask, bind=True)
@limited_starts
def deliver(self: JobTask, project: int) -> dict[str, Any]:
    return deliver_outbox(runtime(), project)


@app.task(name=queues.SYNC, base=JobTask, bind=True, autoretry_for=RETRYABLE_WITH_LABEL_STUDIO_ERRORS)
@limited_starts
def sync(self: JobTask, project: int, retrain: bool = False, reason: str = "requested",
         job_id: str | None = None, asked: bool = False) -> dict[str, Any]:  # fmt: skip
    rt = runtime()
    report = sync_project(rt, project, retrain, reason, asked=asked)
    rt.store.jobs.progress(job_id, done=[project])
    return report


@app.task(name=queues.SYNC_ALL, base=JobTask, bind=True)
def sync_all_task(self: JobTask) -> list[int]:
    return sync_all(runtime())


@app.task(name=queues.TICK, base=JobTask, bind=True)
def tick_task(self: JobTask) -> dict[int, list[str]]:
    return tick(runtime())
