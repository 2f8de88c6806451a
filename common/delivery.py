"""Delivery of predictions to Label Studio: the persistent outbox and the per-(version, task) claims.

Label Studio never de-duplicates predictions, so we do. A prediction reaches Label Studio in one of two
ways: in a /predict reply (the API) or written through the SDK by the deliverer (worker/delivery.py).
Whoever sets the task's claim first (HSETNX) delivers it; the other does nothing. The outbox holds every
prediction still to write, until Label Studio confirms it or a newer version supersedes it, so a write
that fails (Label Studio down, a worker killed) is retried, never dropped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import redis

from common import keys

WRITING = "writing"
WRITTEN = "written"
BY_API = "api"
REFUSED = "refused"  # Label Studio dropped it as invalid: reported, not written again for this version

# Forget a delivered claim only if it is still what the caller saw: (state, time) older than a cutoff.
_RESET_IF_OLDER = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local sep = string.find(v, ':')
local state, ts = string.sub(v, 1, sep - 1), tonumber(string.sub(v, sep + 1))
if (state == 'written' or state == 'api') and ts < tonumber(ARGV[2]) then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


def member(task: int, version: str) -> str:
    return f"{task}@{version}"


def parse_member(raw: bytes | str) -> tuple[int, str]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    task, _, version = text.partition("@")
    return int(task), version


class Delivery:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._reset_if_older = client.register_script(_RESET_IF_OLDER)

    # -- claims ------------------------------------------------------------------------------------------

    def claim(self, pid: int, version: str, task: int, state: str) -> bool:
        return bool(self.r.hsetnx(keys.delivery(pid, version), str(task), f"{state}:{time.time():.3f}"))

    def claim_many(self, pid: int, version: str, tasks: Iterable[int], state: str) -> list[int]:
        """Claim each of these tasks (HSETNX, in one round trip); returns those this caller got."""
        ids = list(tasks)
        if not ids:
            return []
        stamp, key = f"{state}:{time.time():.3f}", keys.delivery(pid, version)
        pipe = self.r.pipeline(transaction=False)
        for tid in ids:
            pipe.hsetnx(key, str(tid), stamp)
        return [tid for tid, got in zip(ids, pipe.execute(), strict=True) if got]

    def claims(self, pid: int, version: str, tasks: Iterable[int]) -> dict[int, tuple[str, float]]:
        ids = list(tasks)
        if not ids:
            return {}
        out = {}
        for tid, value in zip(ids, self.r.hmget(keys.delivery(pid, version), [str(t) for t in ids]), strict=True):
            if value is not None:
                state, _, ts = value.decode().partition(":")
                out[tid] = (state, float(ts or 0))
        return out

    def set(self, pid: int, version: str, tasks: Iterable[int], state: str) -> None:
        ids = list(tasks)
        if ids:
            stamp = f"{state}:{time.time():.3f}"
            self.r.hset(keys.delivery(pid, version), mapping={str(t): stamp for t in ids})

    def release(self, pid: int, version: str, tasks: Iterable[int]) -> None:
        ids = [str(t) for t in tasks]
        if ids:
            self.r.hdel(keys.delivery(pid, version), *ids)

    def forget_if_older(self, pid: int, version: str, task: int, cutoff: float) -> bool:
        """Label Studio lacks a prediction we believed delivered before `cutoff`: forget the claim, so it is
        written again. A claim set since (a delivery in progress) is left alone."""
        return bool(self._reset_if_older(keys=[keys.delivery(pid, version)], args=[str(task), cutoff]))

    # -- the outbox --------------------------------------------------------------------------------------

    def stage(self, pid: int, version: str, tasks: Iterable[int], due: float, job_id: str | None = None) -> None:
        """Put entries in the outbox, due at `due`, in the order given (a microsecond apart: the deliverer takes
        the first due first). An entry already there keeps its time: the periodic sync staging it again must
        neither cut a backoff short nor restart the deliverer's wait for a fuller write (each restart would let
        a sync that runs more often than that wait hold the write back for ever)."""
        members = [member(t, version) for t in tasks]
        if not members:
            return
        pipe = self.r.pipeline()
        pipe.zadd(keys.outbox(pid), {m: due + i * 1e-6 for i, m in enumerate(members)}, nx=True)
        if job_id:
            pipe.hset(keys.outbox_jobs(pid), mapping=dict.fromkeys(members, job_id))
        pipe.execute()

    def due(self, pid: int, now: float, limit: int) -> list[tuple[int, str]]:
        raw = self.r.zrangebyscore(keys.outbox(pid), "-inf", now, start=0, num=limit)
        return [parse_member(m) for m in raw]

    def next_due(self, pid: int) -> float | None:
        first = self.r.zrange(keys.outbox(pid), 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    def size(self, pid: int) -> int:
        return int(self.r.zcard(keys.outbox(pid)))

    def postpone(self, pid: int, entries: Iterable[tuple[int, str]], due: float) -> None:
        members = [member(t, v) for t, v in entries]
        if members:
            self.r.zadd(keys.outbox(pid), dict.fromkeys(members, due), xx=True)

    def done(self, pid: int, entries: Iterable[tuple[int, str]]) -> None:
        members = [member(t, v) for t, v in entries]
        if members:
            pipe = self.r.pipeline()
            pipe.zrem(keys.outbox(pid), *members)
            pipe.hdel(keys.outbox_jobs(pid), *members)
            pipe.execute()

    def jobs_of(self, pid: int, entries: Iterable[tuple[int, str]]) -> dict[tuple[int, str], str]:
        pairs = list(entries)
        if not pairs:
            return {}
        raw = self.r.hmget(keys.outbox_jobs(pid), [member(t, v) for t, v in pairs])
        return {pair: job.decode() for pair, job in zip(pairs, raw, strict=True) if job is not None}

    def drop_versions_except(self, pid: int, current: str, entries: Iterable[tuple[int, str]]) -> list[int]:
        """Entries of superseded versions leave the outbox (the current version's are staged by whoever
        published it); returns the tasks of the current version among `entries`."""
        stale = [(t, v) for t, v in entries if v != current]
        self.done(pid, stale)
        return [t for t, v in entries if v == current]

    # -- backoff while Label Studio fails ----------------------------------------------------------------

    def failed_attempt(self, pid: int) -> int:
        return int(self.r.incr(keys.delivery_failures(pid)))

    def succeeded(self, pid: int, seconds: float) -> None:
        pipe = self.r.pipeline()
        pipe.delete(keys.delivery_failures(pid))
        pipe.set(keys.write_seconds(pid), f"{seconds:.3f}")
        pipe.execute()

    def last_write_seconds(self, pid: int) -> float:
        return float(self.r.get(keys.write_seconds(pid)) or 0)

    def forget_tasks(self, pid: int, version: str, tasks: Iterable[int]) -> None:
        ids = list(tasks)
        if ids:
            self.done(pid, [(t, version) for t in ids])
            self.release(pid, version, ids)


def claims_by_state(claims: Mapping[int, tuple[str, float]], *states: str) -> list[int]:
    return [t for t, (state, _) in claims.items() if state in states]
