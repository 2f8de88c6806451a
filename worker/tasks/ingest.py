"""Imports, Retrieve predictions and the annotator's open task: embed and predict chunks of tasks."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from common import queues
from worker.celery_app import app
from worker.crashing_chunks import run_unless_it_kills
from worker.ingest import ingest_chunk
from worker.runtime import runtime
from worker.tasks.base import JobTask, limited_starts


@app.task(name=queues.INGEST, base=JobTask, bind=True)
def predict_tasks(
    self: JobTask,
    project: int,
    tasks: Sequence[Mapping[str, Any]],
    job_id: str | None = None,
    interactive: bool = False,
    attempt: int = 0,
) -> dict[str, int]:
    """Starts are counted per task, not per message (worker/crashing_chunks.py)."""
    rt = runtime()
    chunk = functools.partial(ingest_chunk, rt, project, tasks, job_id, interactive, attempt)
    return run_unless_it_kills(rt, project, tasks, job_id, interactive, attempt, chunk)


@app.task(name=queues.FAN_OUT, base=JobTask, bind=True)
@limited_starts
def fan_out(self: JobTask, project: int, job_id: str) -> int:
    """Split a parked import into chunk messages. Runs again after a crash: a chunk sent twice only repeats
    work (features are stored once, predictions are claimed once)."""
    rt = runtime()
    tasks = rt.store.jobs.parked_tasks(job_id)
    if tasks is None:
        return 0
    rt.dispatcher.fan_out(project, job_id, tasks)
    rt.store.jobs.drop_parked_tasks(job_id)
    return len(tasks)
