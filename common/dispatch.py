"""Hands work to the Celery workers, from the API and from workers. Sends by task name, so nothing heavy
is imported here."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Celery

from common import queues
from common.settings import Settings
from common.store import Store

log = logging.getLogger(__name__)


def slim_task(task: Mapping[str, Any]) -> dict[str, Any]:
    """Only what a worker needs travels through the broker: id and data, not annotations or history."""
    return {"id": task["id"], "data": task.get("data") or {}}


class Dispatcher:
    def __init__(self, celery: Celery, store: Store, settings: Settings) -> None:
        self.celery = celery
        self.store = store
        self.settings = settings

    def predict(
        self,
        pid: int,
        tasks: Sequence[Mapping[str, Any]],
        *,
        interactive: bool = False,
        embed_only: bool = False,
        job_id: str | None = None,
        kind: str = "predict",
    ) -> str:
        """Queue tasks in chunks of CHUNK_SIZE under one job; returns the job id.

        More than one chunk is parked in Redis as one blob and split by a worker (`plankton.fan_out`): a
        10,000-task import then costs the webhook one SET and one message, not 157 messages.
        """
        job_id = job_id or self.store.create_job(kind, pid, len(tasks))
        if len(tasks) <= max(1, self.settings.chunk_size) or interactive:
            self.store.mark_queued(pid, self.store.current_version(pid), [t["id"] for t in tasks])
            self.send_chunk(pid, tasks, job_id, interactive=interactive, embed_only=embed_only)
            return job_id
        self.store.park_job_tasks(job_id, [slim_task(t) for t in tasks])
        self.celery.send_task(
            queues.FAN_OUT,
            kwargs={"project": pid, "job_id": job_id, "embed_only": embed_only},
            queue=queues.BULK,
        )
        return job_id

    def send_chunk(
        self,
        pid: int,
        tasks: Sequence[Mapping[str, Any]],
        job_id: str,
        *,
        interactive: bool = False,
        embed_only: bool = False,
        producer: Any = None,
    ) -> None:
        self.celery.send_task(
            queues.PREDICT_TASKS,
            kwargs={
                "project": pid,
                "tasks": [slim_task(t) for t in tasks],
                "job_id": job_id,
                "deliver_via_api": interactive,
                "embed_only": embed_only,
            },
            queue=queues.INTERACTIVE if interactive else queues.BULK,
            producer=producer,
            # What Flower shows. Celery would otherwise repr the whole payload of every message: 75% of
            # a big webhook's time.
            argsrepr="()",
            kwargsrepr=f"{{'project': {pid}, 'tasks': {len(tasks)} [{tasks[0]['id']}..{tasks[-1]['id']}]}}",
        )

    def refit(self, pid: int, *, force: bool, countdown: float = 0) -> str:
        job_id = self.store.create_job("refit", pid, 1)
        self.celery.send_task(
            queues.REFIT,
            kwargs={"project": pid, "force": force, "job_id": job_id},
            queue=queues.BULK,
            countdown=countdown or None,
        )
        return job_id

    def after_labels_changed(self, pid: int) -> str | None:
        """Debounced refit: at once after REFIT_EVERY changes, else once REFIT_DELAY_SECONDS passed."""
        if self.store.changes_since_fit(pid) >= self.settings.refit_every:
            return self.refit(pid, force=False)
        if self.store.refit_scheduled(pid, self.settings.refit_delay_seconds):
            return self.refit(pid, force=False, countdown=self.settings.refit_delay_seconds)
        return None
