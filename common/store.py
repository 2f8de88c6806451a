"""Project state kept in Redis, shared by the API and the workers.

Everything a request needs in milliseconds lives here: the current model version, the label config,
predictions already computed, which predictions were handed to Label Studio, job progress, the
annotators' labels and the embeddings (so a refit needs no new forward pass).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

PREFIX = "plk"
JOB_TTL_SECONDS = 7 * 24 * 3600
QUEUED_TTL_SECONDS = 3600

# Values of a task's delivery claim for one model version.
DELIVERED_BY_API = "api"
DELIVERED_BY_WORKER = "written"
WRITING = "writing"


def version_string(backbone: str, number: int) -> str:
    """Fixed-width numbers keep versions from being substrings of each other (Label Studio's
    `predictions_model_versions` filter matches substrings)."""
    return f"{backbone}-v{number:04d}"


def project_id(raw: Any) -> int:
    """Label Studio sends the project as `"<id>.<created-unix-ts>"`, an int, or an object with `id`."""
    if isinstance(raw, Mapping):
        raw = raw.get("id")
    if isinstance(raw, bool) or raw is None:
        raise ValueError("project id missing")
    if isinstance(raw, int):
        pid = raw
    else:
        head = str(raw).split(".", 1)[0]
        if not head.isdigit():
            raise ValueError(f"project id {raw!r} is not a number")
        pid = int(head)
    if pid <= 0:
        raise ValueError(f"project id {raw!r} is not positive")
    return pid


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
        return {
            "id": self.id,
            "state": self.state,
            "kind": self.kind,
            "project": self.project,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "errors": self.errors,
        }


class Store:
    def __init__(self, client: redis.Redis, backbone: str) -> None:
        self.r = client
        self.backbone = backbone

    @classmethod
    def from_url(cls, url: str, backbone: str) -> Store:
        return cls(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2), backbone)

    def _k(self, pid: int, *parts: object) -> str:
        return ":".join([PREFIX, "p", str(pid), *map(str, parts)])

    # -- project, config, versions -------------------------------------------------------------

    def set_label_config(self, pid: int, xml: str) -> bool:
        """Store the config; True when it differs from the one stored before."""
        old = self.r.getset(self._k(pid, "config"), xml)
        self.r.sadd(f"{PREFIX}:projects", pid)
        return old is None or old.decode() != xml

    def label_config(self, pid: int) -> str | None:
        raw = self.r.get(self._k(pid, "config"))
        return raw.decode() if raw else None

    def set_model_scope(self, pid: int, scope: str) -> None:
        self.r.set(self._k(pid, "scope"), scope)

    def model_scope(self, pid: int) -> str | None:
        raw = self.r.get(self._k(pid, "scope"))
        return raw.decode() if raw else None

    def projects(self) -> list[int]:
        return sorted(int(p) for p in self.r.smembers(f"{PREFIX}:projects"))

    def current_version(self, pid: int) -> str:
        """The version every prediction of the project carries; created at version 0 on first use."""
        key = self._k(pid, "version")
        raw = self.r.get(key)
        if raw:
            return raw.decode()
        first = version_string(self.backbone, 0)
        if self.r.set(key, first, nx=True):
            self._record_version(pid, first, {"reason": "initial"})
            self.r.sadd(f"{PREFIX}:projects", pid)
            return first
        return self.r.get(key).decode()

    def next_version(self, pid: int) -> str:
        number = int(self.r.incr(self._k(pid, "version_counter")))
        return version_string(self.backbone, number)

    def publish_version(self, pid: int, version: str, meta: Mapping[str, Any]) -> None:
        """Make `version` current. Call only once its model is completely written."""
        self.r.set(self._k(pid, "version"), version)
        self._record_version(pid, version, meta)

    def _record_version(self, pid: int, version: str, meta: Mapping[str, Any]) -> None:
        entry = {"version": version, "created": time.time(), **meta}
        self.r.rpush(self._k(pid, "versions"), json.dumps(entry))

    def versions(self, pid: int) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.r.lrange(self._k(pid, "versions"), 0, -1)]

    # -- predictions and their delivery -------------------------------------------------------------

    def save_predictions(self, pid: int, version: str, predictions: Mapping[int, dict[str, Any]]) -> None:
        """A prediction with an empty `result` records that the task was processed without evidence."""
        if not predictions:
            return
        pipe = self.r.pipeline()
        pipe.hset(self._k(pid, "pred", version), mapping={str(t): json.dumps(p) for t, p in predictions.items()})
        pipe.srem(self._k(pid, "queued", version), *predictions.keys())
        for tid in predictions:
            notify = self._k(pid, "notify", tid)
            pipe.lpush(notify, version)
            pipe.expire(notify, 30)
        pipe.execute()

    def predictions(self, pid: int, version: str, task_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        ids = list(task_ids)
        if not ids:
            return {}
        raw = self.r.hmget(self._k(pid, "pred", version), [str(t) for t in ids])
        return {t: json.loads(v) for t, v in zip(ids, raw, strict=True) if v is not None}

    def wait_for_prediction(self, pid: int, task_id: int, timeout: float) -> None:
        """Block until a worker stores a prediction for the task, or `timeout` passes."""
        if timeout > 0:
            self.r.blpop([self._k(pid, "notify", task_id)], timeout=timeout)

    def mark_queued(self, pid: int, version: str, task_ids: Iterable[int]) -> list[int]:
        """Remember tasks sent to a worker; returns those that were not already waiting."""
        key = self._k(pid, "queued", version)
        ids = list(task_ids)
        if not ids:
            return []
        pipe = self.r.pipeline()
        pipe.smismember(key, ids)
        pipe.sadd(key, *ids)
        pipe.expire(key, QUEUED_TTL_SECONDS)
        already = pipe.execute()[0]
        return [tid for tid, was in zip(ids, already, strict=True) if not was]

    def unmark_queued(self, pid: int, version: str, task_ids: Iterable[int]) -> None:
        ids = list(task_ids)
        if ids:
            self.r.srem(self._k(pid, "queued", version), *ids)

    def claim_delivery(self, pid: int, version: str, task_id: int, by: str) -> bool:
        """At most one party hands a task's prediction of one version to Label Studio."""
        return bool(self.r.hsetnx(self._k(pid, "delivered", version), str(task_id), f"{by}:{time.time():.0f}"))

    def delivery(self, pid: int, version: str, task_ids: Iterable[int]) -> dict[int, tuple[str, float]]:
        ids = list(task_ids)
        if not ids:
            return {}
        raw = self.r.hmget(self._k(pid, "delivered", version), [str(t) for t in ids])
        out = {}
        for tid, value in zip(ids, raw, strict=True):
            if value is not None:
                by, _, ts = value.decode().partition(":")
                out[tid] = (by, float(ts or 0))
        return out

    def set_delivery(self, pid: int, version: str, task_ids: Iterable[int], by: str) -> None:
        ids = list(task_ids)
        if ids:
            stamp = f"{by}:{time.time():.0f}"
            self.r.hset(self._k(pid, "delivered", version), mapping={str(t): stamp for t in ids})

    def release_delivery(self, pid: int, version: str, task_ids: Iterable[int]) -> None:
        ids = [str(t) for t in task_ids]
        if ids:
            self.r.hdel(self._k(pid, "delivered", version), *ids)

    # -- embeddings --------------------------------------------------------------------------------

    def save_embeddings(self, pid: int, embeddings: Mapping[int, bytes], images: Mapping[int, str]) -> None:
        if not embeddings:
            return
        pipe = self.r.pipeline()
        pipe.hset(self._k(pid, "emb", self.backbone), mapping={str(t): e for t, e in embeddings.items()})
        if images:
            pipe.hset(self._k(pid, "image"), mapping={str(t): u for t, u in images.items()})
        pipe.execute()

    def embeddings(self, pid: int, task_ids: Iterable[int] | None = None) -> dict[int, bytes]:
        key = self._k(pid, "emb", self.backbone)
        if task_ids is None:
            return {int(t): e for t, e in self.r.hgetall(key).items()}
        ids = list(task_ids)
        if not ids:
            return {}
        raw = self.r.hmget(key, [str(t) for t in ids])
        return {t: e for t, e in zip(ids, raw, strict=True) if e is not None}

    def tasks_with_embeddings(self, pid: int, task_ids: Sequence[int]) -> set[int]:
        """Which of these tasks have features stored, in one round trip and without fetching them."""
        if not task_ids:
            return set()
        pipe = self.r.pipeline(transaction=False)
        for t in task_ids:
            pipe.hexists(self._k(pid, "emb", self.backbone), str(t))
        return {t for t, present in zip(task_ids, pipe.execute(), strict=True) if present}

    def embedding_count(self, pid: int) -> int:
        return int(self.r.hlen(self._k(pid, "emb", self.backbone)))

    def task_images(self, pid: int, task_ids: Iterable[int]) -> dict[int, str]:
        ids = list(task_ids)
        if not ids:
            return {}
        raw = self.r.hmget(self._k(pid, "image"), [str(t) for t in ids])
        return {t: u.decode() for t, u in zip(ids, raw, strict=True) if u is not None}

    def cached_embeddings(self, content_hashes: Sequence[str]) -> list[bytes | None]:
        if not content_hashes:
            return []
        return self.r.mget([f"{PREFIX}:emb:{self.backbone}:{h}" for h in content_hashes])

    def cache_embeddings(self, by_hash: Mapping[str, bytes], ttl: int = 30 * 24 * 3600) -> None:
        if by_hash:
            pipe = self.r.pipeline()
            for h, e in by_hash.items():
                pipe.set(f"{PREFIX}:emb:{self.backbone}:{h}", e, ex=ttl)
            pipe.execute()

    def forget_tasks(self, pid: int, task_ids: Iterable[int]) -> None:
        ids = [str(t) for t in task_ids]
        if ids:
            pipe = self.r.pipeline()
            for key in (self._k(pid, "emb", self.backbone), self._k(pid, "image"), self._k(pid, "labels")):
                pipe.hdel(key, *ids)
            pipe.execute()

    # -- annotators' labels ------------------------------------------------------------------------

    def set_labels(self, pid: int, annotation_id: int, task_id: int, labels: Mapping[str, list[str]]) -> None:
        """The latest annotation of a task is its truth; a cancelled one or an empty one is no evidence."""
        pipe = self.r.pipeline()
        pipe.hset(self._k(pid, "ann"), str(annotation_id), str(task_id))
        if labels:
            pipe.hset(self._k(pid, "labels"), str(task_id), json.dumps({"annotation": annotation_id, **labels}))
        else:
            pipe.hdel(self._k(pid, "labels"), str(task_id))
        pipe.incr(self._k(pid, "changes_since_fit"))
        pipe.execute()

    def delete_annotations(self, pid: int, annotation_ids: Iterable[int]) -> list[int]:
        """Drop deleted annotations; returns the tasks whose labels they were."""
        touched = []
        for aid in annotation_ids:
            raw = self.r.hget(self._k(pid, "ann"), str(aid))
            if raw is None:
                continue
            tid = int(raw)
            current = self.r.hget(self._k(pid, "labels"), str(tid))
            if current is not None and json.loads(current).get("annotation") == aid:
                self.r.hdel(self._k(pid, "labels"), str(tid))
                touched.append(tid)
            self.r.hdel(self._k(pid, "ann"), str(aid))
        if touched:
            self.r.incr(self._k(pid, "changes_since_fit"), len(touched))
        return touched

    def labels(self, pid: int) -> dict[int, dict[str, list[str]]]:
        out = {}
        for tid, raw in self.r.hgetall(self._k(pid, "labels")).items():
            entry = json.loads(raw)
            entry.pop("annotation", None)
            out[int(tid)] = entry
        return out

    def changes_since_fit(self, pid: int) -> int:
        return int(self.r.get(self._k(pid, "changes_since_fit")) or 0)

    def reset_changes(self, pid: int, seen: int) -> None:
        self.r.decrby(self._k(pid, "changes_since_fit"), seen)

    def count_new_tasks(self, pid: int, n: int) -> int:
        return int(self.r.incrby(self._k(pid, "new_tasks_since_fit"), n))

    def reset_new_tasks(self, pid: int) -> None:
        self.r.delete(self._k(pid, "new_tasks_since_fit"))

    def refit_scheduled(self, pid: int, ttl: float) -> bool:
        """True when this caller is the one to schedule the next refit (debounce)."""
        return bool(self.r.set(self._k(pid, "refit_scheduled"), "1", nx=True, px=max(1, int(ttl * 1000))))

    def clear_refit_schedule(self, pid: int) -> None:
        self.r.delete(self._k(pid, "refit_scheduled"))

    def lock(self, pid: int, name: str, timeout: float) -> redis.lock.Lock:
        return self.r.lock(self._k(pid, "lock", name), timeout=timeout, blocking_timeout=timeout)

    # -- jobs --------------------------------------------------------------------------------------

    def create_job(self, kind: str, pid: int, total: int) -> str:
        job_id = uuid.uuid4().hex
        key = f"{PREFIX}:job:{job_id}"
        pipe = self.r.pipeline()
        pipe.hset(key, mapping={"kind": kind, "project": pid, "total": total, "created": time.time()})
        pipe.expire(key, JOB_TTL_SECONDS)
        pipe.execute()
        return job_id

    def job_progress(self, job_id: str, done: Iterable[int] = (), errors: Mapping[int, str] | None = None) -> None:
        """Progress is kept per item (task id), so a job whose message runs twice counts each once."""
        done = [str(d) for d in done]
        key = f"{PREFIX}:job:{job_id}"
        pipe = self.r.pipeline()
        if done:
            pipe.sadd(key + ":done", *done)
            pipe.hdel(key + ":failed", *done)
        if errors:
            pipe.hset(key + ":failed", mapping={str(t): e for t, e in errors.items()})
        for suffix in (":done", ":failed"):
            pipe.expire(key + suffix, JOB_TTL_SECONDS)
        pipe.execute()

    def park_job_tasks(self, job_id: str, tasks: list[dict[str, Any]]) -> None:
        """A big import waits here as one blob until a worker splits it into chunks."""
        self.r.set(f"{PREFIX}:job:{job_id}:tasks", json.dumps(tasks), ex=JOB_TTL_SECONDS)

    def parked_job_tasks(self, job_id: str) -> list[dict[str, Any]] | None:
        raw = self.r.get(f"{PREFIX}:job:{job_id}:tasks")
        return json.loads(raw) if raw else None

    def drop_parked_job_tasks(self, job_id: str) -> None:
        self.r.delete(f"{PREFIX}:job:{job_id}:tasks")

    def job(self, job_id: str) -> Job | None:
        key = f"{PREFIX}:job:{job_id}"
        raw = {k.decode(): v.decode() for k, v in self.r.hgetall(key).items()}
        if not raw:
            return None
        failed = {int(t): e.decode() for t, e in self.r.hgetall(key + ":failed").items()}
        total, done = int(raw["total"]), int(self.r.scard(key + ":done"))
        state = "done" if done + len(failed) >= total else ("running" if done or failed else "queued")
        errors = [{"task": t, "error": e} for t, e in sorted(failed.items())]
        return Job(job_id, state, raw["kind"], int(raw["project"]), total, done, len(failed), errors)
