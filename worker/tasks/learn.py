"""Learning from annotations: refit the project's model, and predict what the current version lacks."""

from __future__ import annotations

from typing import Any

from common import queues
from worker.celery_app import app
from worker.predicting import fill_gaps
from worker.refitting import refit_project
from worker.runtime import runtime
from worker.tasks.base import JobTask, limited_starts


@app.task(name=queues.REFIT, base=JobTask, bind=True)
@limited_starts
def refit(self: JobTask, project: int, force: bool = False, reason: str = "annotations",
          job_id: str | None = None) -> dict[str, Any]:  # fmt: skip
    rt = runtime()
    outcome = refit_project(rt, project, force, reason)
    rt.store.jobs.progress(job_id, done=[project])
    return outcome


@app.task(name=queues.FILL_GAPS, base=JobTask, bind=True)
@limited_starts
def fill_gaps_task(self: JobTask, project: int) -> int:
    rt = runtime()
    with rt.store.lock(project, "gaps", lease=30.0) as held:
        return fill_gaps(rt, project) if held else 0
