"""Jobs: units of work that /jobs/<id> reports on, with each item's outcome and each failure's reason."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis

from common import keys

JOB_TTL_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class Job:
    id: str
    state: str
    kind: str
    project: int
    total: int
    done: int
    failed: int
    errors: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Jobs:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def create(self, kind: str, pid: int, total: int) -> str:
        job_id = uuid.uuid4().hex
        pipe = self.r.pipeline()
        pipe.hset(keys.job(job_id), mapping={"kind": kind, "project": pid, "total": total, "created": time.time()})
        pipe.expire(keys.job(job_id), JOB_TTL_SECONDS)
        pipe.execute()
        return job_id

    def progress(self, job_id: str | None, done: Iterable[int] = (), errors: Mapping[int, str] | None = None) -> None:
        """Progress is kept per item (task id), so a job whose message runs twice counts each once; an item
        that failed and later succeeded counts as done."""
        if not job_id:
            return
        done = [str(d) for d in done]
        pipe = self.r.pipeline()
        if done:
            pipe.sadd(keys.job_done(job_id), *done)
            pipe.hdel(keys.job_failed(job_id), *done)
        if errors:
            pipe.hset(keys.job_failed(job_id), mapping={str(t): e for t, e in errors.items()})
            pipe.srem(keys.job_done(job_id), *map(str, errors))
        for key in (keys.job_done(job_id), keys.job_failed(job_id)):
            pipe.expire(key, JOB_TTL_SECONDS)
        pipe.execute()

    def park_tasks(self, job_id: str, tasks: list[dict[str, Any]]) -> None:
        self.r.set(keys.job_tasks(job_id), json.dumps(tasks), ex=JOB_TTL_SECONDS)

    def parked_tasks(self, job_id: str) -> list[dict[str, Any]] | None:
        raw = self.r.get(keys.job_tasks(job_id))
        return json.loads(raw) if raw else None

    def drop_parked_tasks(self, job_id: str) -> None:
        self.r.delete(keys.job_tasks(job_id))

    def get(self, job_id: str) -> Job | None:
        raw = {k.decode(): v.decode() for k, v in self.r.hgetall(keys.job(job_id)).items()}
        if not raw:
            return None
        failed = {int(t): e.decode() for t, e in self.r.hgetall(keys.job_failed(job_id)).items()}
        total, done = int(raw["total"]), int(self.r.scard(keys.job_done(job_id)))
        state = "done" if done + len(failed) >= total else ("running" if done or failed else "queued")
        errors = [{"task": t, "error": e} for t, e in sorted(failed.items())]
        return Job(job_id, state, raw["kind"], int(raw["project"]), total, done, len(failed), errors)
