"""Chunks that kill their worker process: counted per task, split until the task that kills is alone, and
that task failed with a reason.

A chunk whose worker process dies (a crash in a decoder or the model, the kernel's OOM killer) is delivered
again, to die again. Counting the starts of each Celery message did not end this: once a message was given
up its tasks stayed queued, and the tick (worker/sync.py) sent them again in a new message whose count began
at zero, so the chunk killed a worker three times a round, forever, and its other tasks were never embedded.

Here every task of a chunk counts the starts that did not finish (keys.unfinished_starts). A chunk of several
tasks started again after one of its tasks' starts did not finish is split in two, each half sent as a chunk
of its own, with its count started afresh: the half without the task that kills is embedded, the other dies
and is split again, until that task is alone (a chunk of 512 costs about ten deaths). A task alone whose
starts died MAX_LONE_DEATHS times is failed, with the reason in its job and the project's failures, which the
tick and the sync do not queue again."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis

from common import keys
from worker.runtime import Runtime

log = logging.getLogger(__name__)

MAX_LONE_DEATHS = 2
COUNT_TTL_SECONDS = 24 * 3600


def run_unless_it_kills(
    rt: Runtime,
    pid: int,
    tasks: Sequence[Mapping[str, Any]],
    job_id: str | None,
    interactive: bool,
    attempt: int,
    run: Callable[[], dict[str, int]],
) -> dict[str, int]:
    """`run()` the chunk, counted; or, if its tasks' last starts did not finish, split it (several tasks) or
    fail it (a task alone, MAX_LONE_DEATHS times)."""
    r, key = rt.store.r, keys.unfinished_starts(pid)
    ids = [str(t["id"]) for t in tasks]
    died = max((int(n) for n in r.hmget(key, ids) if n is not None), default=0)
    if died and len(tasks) > 1:
        r.hdel(key, *ids)
        half = len(tasks) // 2
        for part in (tasks[:half], tasks[half:]):
            rt.dispatcher.ingest(pid, part, job_id=job_id, interactive=interactive, requeue=True, attempt=attempt)
        log.warning("project %s: a chunk of %d tasks (%s..%s) did not finish when last started (its worker "
                    "process died): split in two, to find the task that kills it", pid, len(ids), ids[0],
                    ids[-1])  # fmt: skip
        return {"done": 0, "failed": 0}
    if died >= MAX_LONE_DEATHS:
        tid = int(ids[0])
        reason = (f"its image killed the worker process {died} times (a crash while decoding or embedding it): "
                  "not tried again")  # fmt: skip
        rt.store.record_failures(pid, {tid: reason}, job_id=job_id)
        rt.store.jobs.progress(job_id, errors={tid: reason})
        r.hdel(key, *ids)
        log.error("project %s task %s failed: %s", pid, tid, reason)
        return {"done": 0, "failed": 1}
    pipe = r.pipeline()
    for tid in ids:
        pipe.hincrby(key, tid, 1)
    pipe.expire(key, COUNT_TTL_SECONDS)
    pipe.execute()
    try:
        return run()
    finally:  # the process lived: whatever happened, these starts finished
        with contextlib.suppress(redis.RedisError):
            r.hdel(key, *ids)
