"""The status page's embedding map: recomputed after published versions (at most once a minute), or when
someone asks."""

from __future__ import annotations

from typing import Any

from common import queues
from worker.celery_app import app
from worker.projection import refresh_projection
from worker.runtime import runtime
from worker.tasks.base import JobTask, limited_starts


@app.task(name=queues.REFRESH_MAP, base=JobTask, bind=True)
@limited_starts
def refresh_map(self: JobTask, project: int) -> dict[str, Any]:
    rt = runtime()
    with rt.store.lock(project, "map", lease=30.0) as held:
        return refresh_projection(rt, project) if held else {"status": "another refresh is running"}
