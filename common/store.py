"""Project state kept in Redis, shared by the API and the workers (key layout: common/keys.py).

Everything a request needs in milliseconds lives here: the current model version, the label config,
predictions already computed, job progress, the annotators' labels and the embeddings (so a refit needs
no new forward pass). Deliveries to Label Studio are `store.delivery` (common/delivery.py); jobs are
`store.jobs` (common/jobs.py).
"""

from __future__ import annotations

import json
import re
import string
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import redis

from common import keys
from common.delivery import Delivery
from common.jobs import Jobs
from common.locks import leased

CONTENT_CACHE_TTL = 30 * 24 * 3600
WAITERS_TTL = 60  # seconds the record of /predict calls waiting lives after the last one began
STAGING_LEASE = 30.0  # seconds a chunk may take from storing features to staging their predictions
KEEP_MODELS = 3  # model blobs kept per project: the current one, and two a chunk may still be using
_BASE36 = string.digits + string.ascii_lowercase
_VERSION = re.compile(r"-v(\d{4,})-[0-9a-z]+$")
_OURS = re.compile(r"[a-z0-9][a-z0-9._-]*-\d+px-(?:v\d{4,}|live)-[0-9a-z]+")

Annotations = dict[int, dict[str, list[str]]]  # annotation id -> {tag: labels}


def version_string(space: str, number: int, epoch: str) -> str:
    """`<space>-v<NNNN>-<epoch>`. Fixed-width numbers and the trailing epoch keep versions from being
    substrings of each other (Label Studio's `predictions_model_versions` filter matches substrings)."""
    return f"{space}-v{number:04d}-{epoch}"


def live_version_string(space: str, epoch: str) -> str:
    """`<space>-live-<epoch>`: the one name every prediction written to Label Studio carries, whichever model
    version computed it (README "Every task, exactly once"). Not a substring of any `-vNNNN-` name."""
    return f"{space}-live-{epoch}"


def ours(version: str) -> bool:
    """A name this backend makes: a model version or a live version, of any embedding space."""
    return bool(_OURS.fullmatch(version))


def version_number(version: str) -> int | None:
    """The NNNN of `<space>-vNNNN-<epoch>`; None for a name this backend did not make."""
    match = _VERSION.search(version)
    return int(match.group(1)) if match else None


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
        if not (head.isascii() and head.isdigit()) or len(head) > 12:
            raise ValueError(f"project id {str(raw)[:40]!r} is not a number")
        pid = int(head)
    if not 0 < pid < 10**12:
        raise ValueError(f"project id {pid} is out of range")
    return pid


def truth(annotations: Mapping[int, Mapping[str, list[str]]]) -> dict[str, list[str]]:
    """A task's labels: those of its newest annotation that has any (the others are history)."""
    for aid in sorted(annotations, reverse=True):
        if annotations[aid]:
            return dict(annotations[aid])
    return {}


def _decode_annotations(raw: bytes | str) -> Annotations:
    return {int(aid): labels for aid, labels in json.loads(raw).items()}


def _encode_annotations(annotations: Mapping[int, Mapping[str, list[str]]]) -> str:
    return json.dumps({str(aid): dict(labels) for aid, labels in sorted(annotations.items())}, sort_keys=True)


class Shown(NamedTuple):
    """What Label Studio holds for a task under the live version: the answer of `version` (keys.shown)."""

    version: str
    score: float
    digest: str

    def encode(self) -> str:
        return f"{self.version}\t{self.score:.4f}\t{self.digest}"

    @classmethod
    def decode(cls, raw: bytes | str) -> Shown:
        version, score, digest = (raw.decode() if isinstance(raw, bytes) else raw).split("\t")
        return cls(version, float(score), digest)


STALE = Shown("", -1.0, "")  # Label Studio holds copies to clean up: the task is written again (worker/sync.py)


class SyncAsk(NamedTuple):
    """A sync asked for (keys.sync_asked): the last ask's token, the token of an ask that wanted a retrain."""

    token: str
    retrain: str | None
    at: float


def _sync_ask(raw: Mapping[bytes, bytes]) -> SyncAsk | None:
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    if "token" not in fields:
        return None
    return SyncAsk(fields["token"], fields.get("retrain"), float(fields.get("at", 0)))


class Store:
    def __init__(self, client: redis.Redis, space: str) -> None:
        self.r = client
        self.space = space
        self.jobs = Jobs(client)
        self.delivery = Delivery(client)

    @classmethod
    def from_url(cls, url: str, space: str) -> Store:
        return cls(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10),
                   space)  # fmt: skip

    def lock(self, pid: int, name: str, lease: float = 30.0, wait: float = 0.0):
        return leased(self.r, keys.lock(pid, name), lease, wait)

    def locked(self, pid: int, name: str) -> bool:
        return self.r.exists(keys.lock(pid, name)) > 0

    # -- project, config, versions -------------------------------------------------------------------

    def add_project(self, pid: int) -> None:
        self.r.sadd(keys.projects(), pid)

    def drop_project(self, pid: int) -> None:
        """A project deleted in Label Studio leaves the periodic work (its keys expire with their own TTLs or
        stay until Redis is cleaned; none is read again)."""
        self.r.srem(keys.projects(), pid)

    def projects(self) -> list[int]:
        return sorted(int(p) for p in self.r.smembers(keys.projects()))

    def set_label_config(self, pid: int, xml: str) -> bool:
        """Store the config; True when it differs from the one stored before."""
        pipe = self.r.pipeline()
        pipe.getset(keys.label_config(pid), xml)
        pipe.sadd(keys.projects(), pid)
        old = pipe.execute()[0]
        return old is None or old.decode() != xml

    def label_config(self, pid: int) -> str | None:
        raw = self.r.get(keys.label_config(pid))
        return raw.decode() if raw else None

    def set_model_scope(self, pid: int, scope: str) -> None:
        self.r.set(keys.model_scope(pid), scope)

    def model_scope(self, pid: int) -> str | None:
        raw = self.r.get(keys.model_scope(pid))
        return raw.decode() if raw else None

    def epoch(self) -> str:
        """Made once per Redis state from the clock (base 36 seconds): a Redis that lost its data names its
        versions differently, so Label Studio never takes an old prediction for a new model's."""
        raw = self.r.get(keys.epoch())
        if raw:
            return raw.decode()
        n, digits = int(time.time()), []
        while n:
            n, d = divmod(n, 36)
            digits.append(_BASE36[d])
        self.r.set(keys.epoch(), "".join(reversed(digits)), nx=True)
        return self.r.get(keys.epoch()).decode()

    def known_project(self, pid: int) -> bool:
        return bool(self.r.sismember(keys.projects(), pid))

    def current_version(self, pid: int) -> str:
        """The version every prediction of the project carries; version 0 (nothing learned) on first use."""
        raw = self.r.get(keys.version(pid))
        if raw:
            return raw.decode()
        first = version_string(self.space, 0, self.epoch())
        if self.r.set(keys.version(pid), first, nx=True):
            self._record_version(pid, first, {"reason": "initial"})
            self.add_project(pid)
            return first
        return self.r.get(keys.version(pid)).decode()

    def live_version(self) -> str:
        """The name Label Studio knows the backend's predictions by (what /setup returns, every written
        prediction carries, and the project's `model_version` is set to once every task holds it)."""
        return live_version_string(self.space, self.epoch())

    def next_version(self, pid: int) -> str:
        number = int(self.r.incr(keys.version_counter(pid)))
        return version_string(self.space, number, self.epoch())

    def publish_version(
        self, pid: int, version: str, blob: bytes, meta: Mapping[str, Any], fitted: Mapping[int, Any]
    ) -> None:
        """Store the model, what it learned from, then make it current, in one transaction: no worker ever
        reads a version whose model is missing. Those of versions older than the last KEEP_MODELS go."""
        known = [v["version"] for v in self.versions(pid)]
        cut = max(0, len(known) - (KEEP_MODELS - 1))
        stale = known[max(0, cut - 2) : cut]  # the one or two that just fell out of the last KEEP_MODELS
        entry = json.dumps({"version": version, "created": time.time(), **meta})
        pipe = self.r.pipeline()
        pipe.set(keys.model(pid, version), blob)
        pipe.set(keys.fitted_labels(pid, version), json.dumps({str(t): v for t, v in fitted.items()}))
        pipe.set(keys.version_meta(pid, version), entry)
        pipe.set(keys.version(pid), version)
        pipe.rpush(keys.versions(pid), entry)
        for old in stale:  # their predictions are never served or written again
            pipe.delete(keys.model(pid, old), keys.fitted_labels(pid, old), keys.predictions(pid, old),
                        keys.delivery(pid, old))  # fmt: skip
        pipe.execute()

    def version_checked(self, pid: int, version: str, tasks: int) -> None:
        """A refit on `tasks` tasks found that this version still answers as well: it counts as fitted on them."""
        meta = self.version_meta(pid, version)
        if meta.get("checked_tasks", 0) < tasks:
            self.r.set(keys.version_meta(pid, version), json.dumps({**meta, "checked_tasks": tasks}))

    def version_meta(self, pid: int, version: str) -> dict[str, Any]:
        raw = self.r.get(keys.version_meta(pid, version))
        return json.loads(raw) if raw else {"version": version}

    def fitted_labels(self, pid: int, version: str) -> dict[int, dict[str, list[str]]]:
        raw = self.r.get(keys.fitted_labels(pid, version))
        return {int(t): v for t, v in json.loads(raw).items()} if raw else {}

    def _record_version(self, pid: int, version: str, meta: Mapping[str, Any]) -> None:
        self.r.rpush(keys.versions(pid), json.dumps({"version": version, "created": time.time(), **meta}))

    def model_blob(self, pid: int, version: str) -> bytes | None:
        return self.r.get(keys.model(pid, version))

    def versions(self, pid: int) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.r.lrange(keys.versions(pid), 0, -1)]

    # -- tasks and their features --------------------------------------------------------------------

    def remember_tasks(self, pid: int, tasks: Iterable[Mapping[str, Any]]) -> None:
        """The data of every task the backend hears of (imports, annotations, the sweep), so that any of
        them can be embedded later without asking Label Studio."""
        entries = {str(t["id"]): json.dumps(t.get("data") or {}) for t in tasks}
        if entries:
            pipe = self.r.pipeline()
            pipe.hset(keys.task_data(pid), mapping=entries)
            pipe.sadd(keys.projects(), pid)
            pipe.execute()

    def tasks(self, pid: int, task_ids: Iterable[int]) -> list[dict[str, Any]]:
        """Slim tasks ({id, data}) of those the backend knows."""
        ids = list(task_ids)
        if not ids:
            return []
        raw = self.r.hmget(keys.task_data(pid), [str(t) for t in ids])
        return [{"id": t, "data": json.loads(d)} for t, d in zip(ids, raw, strict=True) if d is not None]

    def known_tasks(self, pid: int) -> set[int]:
        return {int(t) for t in self.r.hkeys(keys.task_data(pid))}

    def task_images(self, pid: int, task_ids: Iterable[int]) -> dict[int, str]:
        ids = list(task_ids)
        if not ids:
            return {}
        raw = self.r.hmget(keys.images(pid), [str(t) for t in ids])
        return {t: u.decode() for t, u in zip(ids, raw, strict=True) if u is not None}

    def mark_pending(self, pid: int, task_ids: Sequence[int], stale_after: float) -> list[int]:
        """Remember tasks queued for embedding; returns those not already queued (or queued so long ago that
        their message must have been lost)."""
        if not task_ids:
            return []
        now = time.time()
        raw = self.r.hmget(keys.pending(pid), [str(t) for t in task_ids])
        fresh = [t for t, v in zip(task_ids, raw, strict=True) if v is None or now - float(v) > stale_after]
        if fresh:
            self.r.hset(keys.pending(pid), mapping=dict.fromkeys(map(str, fresh), f"{now:.3f}"))
        return fresh

    def unmark_pending(self, pid: int, task_ids: Iterable[int], staging: str | None = None) -> None:
        """Tasks settled without new features (they had some already: a duplicate webhook, a message run again).
        `staging`: as for `save_embeddings`, the caller is counted as about to stage their predictions."""
        ids = [str(t) for t in task_ids]
        if not ids:
            return
        pipe = self.r.pipeline()
        pipe.hdel(keys.pending(pid), *ids)
        if staging:
            self._mark_staging(pipe, pid, staging)
        pipe.execute()

    @staticmethod
    def _mark_staging(pipe: redis.client.Pipeline, pid: int, staging: str) -> None:
        now = time.time()
        pipe.zremrangebyscore(keys.staging(pid), "-inf", now)
        pipe.zadd(keys.staging(pid), {staging: now + STAGING_LEASE})

    def pending(self, pid: int) -> dict[int, float]:
        return {int(t): float(v) for t, v in self.r.hgetall(keys.pending(pid)).items()}

    def pending_count(self, pid: int) -> int:
        return int(self.r.hlen(keys.pending(pid)))

    def note_ingest_progress(self) -> None:
        self.r.set(keys.ingest_progress(), f"{time.time():.3f}")

    def last_ingest_progress(self) -> float:
        return float(self.r.get(keys.ingest_progress()) or 0)

    def queue_length(self, queue: str) -> int:
        """Messages waiting in a Celery queue (kombu's Redis transport keeps each queue as a list of its name)."""
        return int(self.r.llen(queue))

    def save_embeddings(
        self, pid: int, embeddings: Mapping[int, bytes], refs: Mapping[int, str], staging: str | None = None
    ) -> set[int]:
        """Store features and unqueue their tasks; returns the tasks whose features this call stored. A task's
        features are written once: a task embedded twice (two chunks holding it after a lost message or a
        Redis restart) keeps the first, from which its predictions were made. A batch of another size gives
        features that differ in the last bits, enough to turn an answer at a boundary: the second chunk
        predicts from the first's.

        `staging`: the caller's token, counted as a chunk about to stage predictions (`staging_chunks`) until
        `done_staging`, in the same transaction that unqueues the tasks: a deliverer looking in between must
        not take them for settled and write without them."""
        if not embeddings:
            return set()
        ids = [str(t) for t in embeddings]
        pipe = self.r.pipeline()
        for tid, blob in embeddings.items():
            pipe.hsetnx(keys.embeddings(pid, self.space), str(tid), blob)
        if refs:
            pipe.hset(keys.images(pid), mapping={str(t): u for t, u in refs.items()})
        pipe.hdel(keys.pending(pid), *ids)
        pipe.hdel(keys.failed(pid), *ids)
        if staging:
            self._mark_staging(pipe, pid, staging)
        written = pipe.execute()[: len(ids)]
        return {tid for tid, new in zip(embeddings, written, strict=True) if new}

    def done_staging(self, pid: int, staging: str) -> None:
        self.r.zrem(keys.staging(pid), staging)

    def staging_chunks(self, pid: int, now: float) -> int:
        """Chunks between storing features and staging their predictions (`save_embeddings`)."""
        return int(self.r.zcount(keys.staging(pid), now, "+inf"))

    def embeddings(self, pid: int, task_ids: Iterable[int] | None = None) -> dict[int, bytes]:
        key = keys.embeddings(pid, self.space)
        if task_ids is None:
            return {int(t): e for t, e in self.r.hgetall(key).items()}
        ids = list(task_ids)
        if not ids:
            return {}
        raw = self.r.hmget(key, [str(t) for t in ids])
        return {t: e for t, e in zip(ids, raw, strict=True) if e is not None}

    def featured_tasks(self, pid: int) -> set[int]:
        return {int(t) for t in self.r.hkeys(keys.embeddings(pid, self.space))}

    def tasks_with_embeddings(self, pid: int, task_ids: Sequence[int]) -> set[int]:
        """Which of these tasks have features stored, in one round trip and without fetching them."""
        if not task_ids:
            return set()
        pipe = self.r.pipeline(transaction=False)
        for t in task_ids:
            pipe.hexists(keys.embeddings(pid, self.space), str(t))
        return {t for t, present in zip(task_ids, pipe.execute(), strict=True) if present}

    def embedding_count(self, pid: int) -> int:
        return int(self.r.hlen(keys.embeddings(pid, self.space)))

    def record_failures(
        self, pid: int, reasons: Mapping[int, str], transient: Iterable[int] = (), job_id: str | None = None
    ) -> None:
        """Tasks whose image could not be used: the reason, whether a retry may help, and the job that says so
        (shown by /jobs/<id> and /projects/<id>)."""
        if not reasons:
            return
        retry, now = set(transient), time.time()
        entries = {
            str(t): json.dumps({"reason": r, "transient": t in retry, "at": now, "job": job_id})
            for t, r in reasons.items()
        }
        pipe = self.r.pipeline()
        pipe.hset(keys.failed(pid), mapping=entries)
        pipe.hdel(keys.pending(pid), *entries)
        pipe.execute()

    def failures(self, pid: int) -> dict[int, dict[str, Any]]:
        return {int(t): json.loads(v) for t, v in self.r.hgetall(keys.failed(pid)).items()}

    def cached_embeddings(self, content_hashes: Sequence[str]) -> list[bytes | None]:
        if not content_hashes:
            return []
        return self.r.mget([keys.content_embedding(self.space, h) for h in content_hashes])

    def cache_embeddings(self, by_hash: Mapping[str, bytes], ttl: int = CONTENT_CACHE_TTL) -> None:
        if by_hash:
            pipe = self.r.pipeline()
            for h, e in by_hash.items():
                pipe.set(keys.content_embedding(self.space, h), e, ex=ttl)
            pipe.execute()

    def forget_tasks(self, pid: int, task_ids: Iterable[int]) -> None:
        """Tasks deleted in Label Studio: their features, labels, queued work and predictions go."""
        ids = [str(t) for t in task_ids]
        if not ids:
            return
        annotated = self.annotations(pid, [int(t) for t in ids])
        version = self.current_version(pid)
        pipe = self.r.pipeline()
        for key in (keys.embeddings(pid, self.space), keys.task_data(pid), keys.images(pid), keys.annotations(pid),
                    keys.annotations_heard(pid), keys.pending(pid), keys.failed(pid),
                    keys.predictions(pid, version), keys.shown(pid)):  # fmt: skip
            pipe.hdel(key, *ids)
        aids = [str(a) for anns in annotated.values() for a in anns]
        if aids:
            pipe.hdel(keys.annotation_tasks(pid), *aids)
        pipe.execute()
        self.delivery.forget_tasks(pid, version, [int(t) for t in ids])

    # -- annotations ---------------------------------------------------------------------------------

    def save_annotation(
        self, pid: int, annotation_id: int, task_id: int, labels: Mapping[str, list[str]] | None
    ) -> bool:
        """Record one annotation (`None`: cancelled, which counts for nothing); True if anything changed."""
        return self._update_task_annotations(pid, task_id, {annotation_id: labels})

    def delete_annotations(self, pid: int, annotation_ids: Iterable[int]) -> list[int]:
        """Drop deleted annotations; returns the tasks whose annotations changed."""
        ids = list(annotation_ids)
        if not ids:
            return []
        tasks = self.r.hmget(keys.annotation_tasks(pid), [str(a) for a in ids])
        touched = []
        for aid, tid in zip(ids, tasks, strict=True):
            if tid is not None and self._update_task_annotations(pid, int(tid), {aid: None}):
                touched.append(int(tid))
        return touched

    def replace_annotations(
        self, pid: int, by_task: Mapping[int, Mapping[int, Mapping[str, list[str]]]], since: float
    ) -> list[int]:
        """Make the stored annotations those Label Studio holds (the sweep, which began reading it at `since`);
        returns the tasks that changed. A task whose annotations a webhook changed at `since` or later keeps
        them: what the sweep read may predate the webhook, and replacing them lost an annotation made while
        the sweep paged through the tasks until the next sweep (the next one reconciles the task)."""

        def replace(pipe: redis.client.Pipeline) -> list[int]:
            stored = {int(t): _decode_annotations(v) for t, v in pipe.hgetall(keys.annotations(pid)).items()}
            heard = pipe.hgetall(keys.annotations_heard(pid))
            recent = {int(t) for t, at in heard.items() if float(at) >= since}
            changed = []
            for tid in (set(stored) | set(by_task)) - recent:
                want = {aid: dict(labels) for aid, labels in by_task.get(tid, {}).items()}
                if stored.get(tid, {}) != want:
                    changed.append(tid)
            if not changed:
                pipe.unwatch()
                return []
            pipe.multi()
            for tid in changed:
                want = by_task.get(tid, {})
                gone = [str(a) for a in stored.get(tid, {}) if a not in want]
                if gone:
                    pipe.hdel(keys.annotation_tasks(pid), *gone)
                if want:
                    pipe.hset(keys.annotations(pid), str(tid), _encode_annotations(want))
                    pipe.hset(keys.annotation_tasks(pid), mapping={str(a): str(tid) for a in want})
                else:
                    pipe.hdel(keys.annotations(pid), str(tid))
            pipe.incrby(keys.label_changes(pid), len(changed))
            return changed

        return self.r.transaction(replace, keys.annotations(pid), keys.annotations_heard(pid), value_from_callable=True)

    def _update_task_annotations(
        self, pid: int, tid: int, updates: Mapping[int, Mapping[str, list[str]] | None]
    ) -> bool:
        key = keys.annotations(pid)

        def update(pipe: redis.client.Pipeline) -> bool:
            raw = pipe.hget(key, str(tid))
            current = _decode_annotations(raw) if raw else {}
            wanted = dict(current)
            for aid, labels in updates.items():
                if labels is None:
                    wanted.pop(aid, None)
                else:
                    wanted[aid] = {tag: sorted(chosen) for tag, chosen in labels.items()}
            if wanted == current:
                pipe.unwatch()
                return False
            pipe.multi()
            if wanted:
                pipe.hset(key, str(tid), _encode_annotations(wanted))
            else:
                pipe.hdel(key, str(tid))
            for aid, labels in updates.items():
                if labels is None:
                    pipe.hdel(keys.annotation_tasks(pid), str(aid))
                else:
                    pipe.hset(keys.annotation_tasks(pid), str(aid), str(tid))
            pipe.hset(keys.annotations_heard(pid), str(tid), repr(time.time()))
            pipe.incr(keys.label_changes(pid))
            return True

        return self.r.transaction(update, key, value_from_callable=True)

    def annotations(self, pid: int, task_ids: Iterable[int] | None = None) -> dict[int, Annotations]:
        """Annotated tasks: task -> {annotation id: labels}."""
        if task_ids is None:
            return {int(t): _decode_annotations(v) for t, v in self.r.hgetall(keys.annotations(pid)).items()}
        ids = list(task_ids)
        if not ids:
            return {}
        raw = self.r.hmget(keys.annotations(pid), [str(t) for t in ids])
        return {t: _decode_annotations(v) for t, v in zip(ids, raw, strict=True) if v is not None}

    def annotated_tasks(self, pid: int) -> set[int]:
        return {int(t) for t in self.r.hkeys(keys.annotations(pid))}

    def labels(self, pid: int) -> dict[int, dict[str, list[str]]]:
        """What the project learns from: each annotated task's truth, where it has labels."""
        out = {}
        for tid, anns in self.annotations(pid).items():
            labels = truth(anns)
            if labels:
                out[tid] = labels
        return out

    def changes_since_fit(self, pid: int) -> int:
        return int(self.r.get(keys.label_changes(pid)) or 0)

    def reset_changes(self, pid: int, seen: int) -> None:
        if seen:
            self.r.decrby(keys.label_changes(pid), seen)

    def schedule_refit(self, pid: int, ttl: float) -> bool:
        """True when this caller is the one to schedule the next refit (debounce)."""
        return bool(self.r.set(keys.refit_scheduled(pid), "1", nx=True, px=max(1, int(ttl * 1000))))

    def clear_refit_schedule(self, pid: int) -> None:
        self.r.delete(keys.refit_scheduled(pid))

    # -- predictions ---------------------------------------------------------------------------------

    def save_predictions(self, pid: int, version: str, predictions: Mapping[int, dict[str, Any]]) -> None:
        if not predictions:
            return
        pipe = self.r.pipeline()
        pipe.hset(keys.predictions(pid, version), mapping={str(t): json.dumps(p) for t, p in predictions.items()})
        pipe.hgetall(keys.waiters(pid))
        waiting = {int(t) for t, n in pipe.execute()[1].items() if int(n) > 0}
        if woken := waiting.intersection(predictions):
            pipe = self.r.pipeline()
            for tid in woken:
                pipe.lpush(keys.notify(pid, tid), version)
                pipe.expire(keys.notify(pid, tid), 30)
            pipe.execute()

    def predictions(self, pid: int, version: str, task_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        ids = list(task_ids)
        if not ids:
            return {}
        raw = self.r.hmget(keys.predictions(pid, version), [str(t) for t in ids])
        return {t: json.loads(v) for t, v in zip(ids, raw, strict=True) if v is not None}

    def predicted_tasks(self, pid: int, version: str) -> set[int]:
        return {int(t) for t in self.r.hkeys(keys.predictions(pid, version))}

    def drop_predictions(self, pid: int, version: str) -> None:
        """A superseded version's predictions are no longer served."""
        self.r.delete(keys.predictions(pid, version))

    # -- what Label Studio shows ----------------------------------------------------------------------

    def shown(self, pid: int, task_ids: Iterable[int] | None = None) -> dict[int, Shown]:
        """What Label Studio holds under the live version, per task (all tasks when `task_ids` is None)."""
        if task_ids is None:
            return {int(t): Shown.decode(v) for t, v in self.r.hgetall(keys.shown(pid)).items()}
        ids = list(task_ids)
        if not ids:
            return {}
        raw = self.r.hmget(keys.shown(pid), [str(t) for t in ids])
        return {t: Shown.decode(v) for t, v in zip(ids, raw, strict=True) if v is not None}

    def shown_tasks(self, pid: int) -> set[int]:
        """The tasks Label Studio holds a live prediction of ours for, as far as the backend knows."""
        return {int(t) for t in self.r.hkeys(keys.shown(pid))}

    def set_shown(self, pid: int, entries: Mapping[int, Shown]) -> None:
        if entries:
            self.r.hset(keys.shown(pid), mapping={str(t): e.encode() for t, e in entries.items()})

    def forget_shown(self, pid: int, task_ids: Iterable[int]) -> None:
        """Label Studio lacks these tasks' live predictions (the sweep saw it): they are written again."""
        ids = [str(t) for t in task_ids]
        if ids:
            self.r.hdel(keys.shown(pid), *ids)

    def refresh_due(self, pid: int, period: float) -> tuple[float, bool]:
        """When changes staged now away from the frontier are written: the end of the current window, which the
        first such change after the last window opens, `period` long (common/revisions.py); and whether this
        call opened it (its caller then sends the deliverer for that moment)."""
        due = time.time() + period
        if self.r.set(keys.refresh_due(pid), f"{due:.3f}", nx=True, px=max(1, int(period * 1000))):
            return due, True
        raw = self.r.get(keys.refresh_due(pid))
        return (float(raw), False) if raw else (due, False)

    def switched_to(self, pid: int) -> str | None:
        raw = self.r.get(keys.switched(pid))
        return raw.decode() if raw else None

    def set_switched(self, pid: int, name: str) -> None:
        self.r.set(keys.switched(pid), name)

    def wait_for_prediction(self, pid: int, version: str, task_id: int, timeout: float) -> str | None:
        """Block until a worker stores a prediction for the task, or `timeout` passes; at once if one of
        `version` is already stored. The wait is recorded before that check, in one transaction, and
        `save_predictions` stores and reads the record in one: either the worker sees the waiter and wakes
        it, or the waiter sees the prediction. Returns the version of the prediction found: the worker's
        may be newer than `version` (a refit published one meanwhile); None if none came in time."""
        if timeout <= 0:
            return None
        field = str(task_id)
        pipe = self.r.pipeline()
        pipe.hincrby(keys.waiters(pid), field, 1)
        pipe.expire(keys.waiters(pid), WAITERS_TTL)
        pipe.hexists(keys.predictions(pid, version), field)
        try:
            if pipe.execute()[2]:
                return version
            woken = self.r.blpop([keys.notify(pid, task_id)], timeout=timeout)
            return woken[1].decode() if woken else None
        finally:
            self.r.hincrby(keys.waiters(pid), field, -1)  # a count at 0 is no waiter; the hash expires

    def ask_sync(self, pid: int, retrain: bool) -> None:
        """Record that a sync of the project is wanted (keys.sync_asked); a retrain asked for stays asked
        until a sync that saw it is done."""
        token = uuid.uuid4().hex
        fields = {"token": token, "at": time.time(), **({"retrain": token} if retrain else {})}
        self.r.hset(keys.sync_asked(pid), mapping=fields)

    def sync_asked(self, pid: int) -> SyncAsk | None:
        return _sync_ask(self.r.hgetall(keys.sync_asked(pid)))

    def sync_done(self, pid: int, seen: SyncAsk | None) -> bool:
        """Clear what a finished sync saw when it began: the whole ask if none came since, else only the
        retrain it did. True when another sync is still asked for."""
        if seen is None:
            return self.r.exists(keys.sync_asked(pid)) > 0
        key = keys.sync_asked(pid)

        def clear(pipe: redis.client.Pipeline) -> bool:
            now = _sync_ask(pipe.hgetall(key))
            pipe.multi()
            if now is not None and now.token == seen.token:
                pipe.delete(key)
                return False
            if now is not None and seen.retrain and now.retrain == seen.retrain:
                pipe.hdel(key, "retrain")
            return now is not None

        return self.r.transaction(clear, key, value_from_callable=True)

    def set_last_sync(self, pid: int, report: Mapping[str, Any]) -> None:
        self.r.set(keys.last_sync(pid), json.dumps(report))

    def last_sync(self, pid: int) -> dict[str, Any] | None:
        raw = self.r.get(keys.last_sync(pid))
        return json.loads(raw) if raw else None

    # -- the status page's embedding map ---------------------------------------------------------------

    def set_projection(self, pid: int, blob: bytes) -> None:
        """The embedding map (keys.projection: gzip-compressed JSON), replacing the previous one."""
        self.r.set(keys.projection(pid), blob)

    def projection(self, pid: int) -> bytes | None:
        """The embedding map as stored (gzip-compressed JSON), or None before the first one."""
        return self.r.get(keys.projection(pid))
