"""The only sender of work, for the API and the workers alike. Sends by task name (common/queues.py), so
nothing heavy is imported here."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Celery

from common import keys, queues
from common.settings import Settings
from common.store import Store

log = logging.getLogger(__name__)

MAP_INTERVAL_SECONDS = 60


def slim_task(task: Mapping[str, Any]) -> dict[str, Any]:
    """Only what a worker needs travels through the broker: id and data, not annotations or history."""
    return {"id": task["id"], "data": task.get("data") or {}}


def chunk_sizes(n: int, size: int) -> list[int]:
    """How an import of `n` tasks is cut into bulk chunks: `size` each while much is left, then a quarter of
    what is left (at least size/8), so the chunks taken last are small. Otherwise the import ends with one
    pool process embedding a whole last chunk while the others have nothing left (guided self-scheduling)."""
    size, floor = max(1, size), max(1, size // 8)
    sizes, left = [], n
    while left > 0:
        piece = min(size, max(floor, -(-left // 4)))
        if left <= size and left - piece <= floor // 4:
            piece = left  # no runt at the end
        sizes.append(piece)
        left -= piece
    return sizes


class Dispatcher:
    def __init__(self, celery: Celery, store: Store, settings: Settings) -> None:
        self.celery = celery
        self.store = store
        self.settings = settings

    # -- embedding and prediction --------------------------------------------------------------------

    def ingest(
        self,
        pid: int,
        tasks: Sequence[Mapping[str, Any]],
        *,
        kind: str = "import",
        job_id: str | None = None,
        interactive: bool = False,
        requeue: bool = False,
        countdown: float = 0,
        attempt: int = 0,
    ) -> str | None:
        """Queue tasks to be embedded and predicted, in chunks of CHUNK_SIZE under one job; returns the job id,
        or None when every task was already queued. A task already queued is not queued again unless its
        message is older than BROKER_VISIBILITY_TIMEOUT (lost with a worker), or `requeue` says so (a chunk
        sending back what it did not start, or retrying what failed for a while)."""
        slim = [slim_task(t) for t in tasks]
        self.store.remember_tasks(pid, slim)
        if not (interactive or requeue):
            fresh = set(self.store.mark_pending(pid, [t["id"] for t in slim], self.settings.visibility_timeout))
            slim = [t for t in slim if t["id"] in fresh]
        if not slim:
            return job_id
        job_id = job_id or self.store.jobs.create(kind, pid, len(slim))
        if len(slim) <= max(1, self.settings.chunk_size) or interactive or countdown:
            self._send_chunks(pid, slim, job_id, interactive=interactive, countdown=countdown, attempt=attempt)
            return job_id
        # Many chunks: park the tasks in Redis as one blob and let a worker split them (`fan_out`), so a
        # 10,000-task import costs the webhook one SET and one message, not 20 messages of 500 tasks.
        self.store.jobs.park_tasks(job_id, slim)
        self.celery.send_task(queues.FAN_OUT, kwargs={"project": pid, "job_id": job_id}, queue=queues.CONTROL)
        return job_id

    def fan_out(self, pid: int, job_id: str, tasks: Sequence[Mapping[str, Any]]) -> None:
        with self.celery.producer_or_acquire() as producer:
            self._send_chunks(pid, tasks, job_id, producer=producer)

    def _send_chunks(
        self,
        pid: int,
        tasks: Sequence[Mapping[str, Any]],
        job_id: str,
        *,
        interactive: bool = False,
        countdown: float = 0,
        attempt: int = 0,
        producer: Any = None,
    ) -> None:
        start = 0
        for size in chunk_sizes(len(tasks), self.settings.chunk_size):
            chunk = list(tasks[start : start + size])
            start += size
            self.celery.send_task(
                queues.INGEST,
                kwargs={
                    "project": pid,
                    "tasks": chunk,
                    "job_id": job_id,
                    "interactive": interactive,
                    "attempt": attempt,
                },  # fmt: skip
                queue=queues.INTERACTIVE if interactive else queues.BULK,
                countdown=countdown or None,
                producer=producer,
                # What Flower shows. Celery would otherwise repr the whole payload of every message: 75% of
                # a big webhook's time.
                argsrepr="()",
                kwargsrepr=f"{{'project': {pid}, 'tasks': {len(chunk)} [{chunk[0]['id']}..{chunk[-1]['id']}]}}",
            )

    def fill_gaps(self, pid: int, countdown: float = 0) -> None:
        """Predict every unannotated task with features that lacks a prediction of the current version."""
        self.celery.send_task(
            queues.FILL_GAPS, kwargs={"project": pid}, queue=queues.CONTROL, countdown=countdown or None
        )

    # -- learning ------------------------------------------------------------------------------------

    def refit(self, pid: int, *, force: bool, reason: str, countdown: float = 0) -> str:
        job_id = self.store.jobs.create("refit", pid, 1)
        self.celery.send_task(
            queues.REFIT,
            kwargs={"project": pid, "force": force, "reason": reason, "job_id": job_id},
            queue=queues.CONTROL,
            countdown=countdown or None,
        )
        return job_id

    def refresh_map_soon(self, pid: int) -> None:
        """After a refit: one map per MAP_INTERVAL_SECONDS at most, of the version current when it runs. While
        annotators work a project refits every few seconds, and a map of 20,000 tasks takes a worker process
        tens of seconds: one per refit kept a process of two busy computing maps."""
        if self.store.r.set(keys.map_scheduled(pid), "1", nx=True, ex=MAP_INTERVAL_SECONDS):
            self.refresh_map(pid, countdown=MAP_INTERVAL_SECONDS)

    def refresh_map(self, pid: int, countdown: float = 0) -> None:
        """Recompute the project's embedding map for the status page (after a refit, or on request)."""
        self.celery.send_task(queues.REFRESH_MAP, kwargs={"project": pid}, queue=queues.BULK,
                              countdown=countdown or None)  # fmt: skip

    def after_labels_changed(self, pid: int) -> str | None:
        """Debounced refit: at once after REFIT_EVERY changes, else once REFIT_DELAY_SECONDS passed."""
        if self.store.changes_since_fit(pid) >= self.settings.refit_every:
            return self.refit(pid, force=False, reason="annotations")
        if self.store.schedule_refit(pid, self.settings.refit_delay_seconds + 60):
            return self.refit(pid, force=False, reason="annotations", countdown=self.settings.refit_delay_seconds)
        return None

    # -- Label Studio --------------------------------------------------------------------------------

    def deliver(self, pid: int, countdown: float = 0) -> None:
        """Write the project's outbox to Label Studio (one deliverer per project runs at a time)."""
        self.celery.send_task(
            queues.DELIVER, kwargs={"project": pid}, queue=queues.CONTROL, countdown=countdown or None
        )

    def sync(self, pid: int, *, retrain: bool = False, reason: str = "requested", periodic: bool = False) -> str:
        """Reconcile the project with what Label Studio holds (tasks, annotations, predictions, config), then
        refit (always with `retrain`) and fill every gap; returns the job id. A sync asked for (not
        `periodic`) is recorded first: it is done once a sync that began after it finishes, even if this
        message finds another sync running or is lost (keys.sync_asked)."""
        if not periodic:
            self.store.ask_sync(pid, retrain)
        return self._send_sync(pid, retrain, reason, asked=not periodic)

    def sync_again(self, pid: int, reason: str) -> str:
        """A message for a sync already asked for, whose own message found another sync running."""
        return self._send_sync(pid, False, reason, asked=True)

    def _send_sync(self, pid: int, retrain: bool, reason: str, asked: bool) -> str:
        job_id = self.store.jobs.create("sync", pid, 1)
        self.celery.send_task(
            queues.SYNC,
            kwargs={"project": pid, "retrain": retrain, "reason": reason, "job_id": job_id, "asked": asked},
            queue=queues.BULK,
        )
        return job_id
