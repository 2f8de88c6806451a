"""The periodic sync of a large project waits until its last listing has had LISTING_SHARE of the time since:
a sweep lists every annotated task (1-2 ms of Label Studio's CPU each), and every task when the counts
disagree, and the annotators share that Label Studio.
Real Redis and the sync messages the dispatcher sends (read back from the broker's queue). And a sweep whose
listing is long takes no task written meanwhile for one that lacks its prediction."""

from __future__ import annotations

import base64
import dataclasses
import json
import time

from common import keys
from common.delivery import WRITING, WRITTEN
from common.settings import Settings
from tests.helpers import LABEL_CONFIG
from worker.runtime import Runtime
from worker.sync import LISTING_SHARE, _written_since, sync_all


def periodic_syncs(rt: Runtime) -> list[int]:
    raw = [json.loads(m) for m in rt.store.r.lrange("bulk", 0, -1)]
    bodies = [json.loads(base64.b64decode(m["body"]))[1] for m in raw if m["headers"]["task"] == "plankton.sync"]
    return sorted(b["project"] for b in bodies if b["reason"] == "periodic" and not b["asked"])


def test_a_project_whose_listing_is_long_is_synced_less_often(clean_redis):
    rt = Runtime(dataclasses.replace(Settings.from_env(), sync_interval_seconds=300))
    now = time.time()
    for pid in (1, 2, 3, 4):
        rt.store.set_label_config(pid, LABEL_CONFIG)
    rt.store.set_last_sync(2, {"started": now - 400, "listing_seconds": 2.0})  # small: every interval
    rt.store.set_last_sync(3, {"started": now - 400, "listing_seconds": 60.0})  # 30,000 tasks: not yet
    rt.store.set_last_sync(4, {"started": now - 61 / LISTING_SHARE, "listing_seconds": 60.0})  # its turn again
    assert sync_all(rt) == [1, 2, 4]
    assert periodic_syncs(rt) == [1, 2, 4]
    assert sync_all(rt) == [], "one run per interval however many beats run"
    rt.store.r.delete(keys.beat_lock("sync_all"))
    rt.store.set_last_sync(3, {"started": now - 601, "listing_seconds": 60.0})
    assert 3 in sync_all(rt)


def test_a_sweep_suspects_no_task_written_while_it_listed(clean_redis):
    """A sweep's listing of a large project takes minutes (165 s at 50,000 tasks, while the import's first
    version was written): a task it read as lacking the live version may have been written since, by the
    version current when the sweep began or by one published while it ran. Such a task is no suspect: written
    again as lacking, it held two predictions (9,731 of 50,000 tasks in bench/scale.py before this)."""
    rt = Runtime(Settings.from_env())
    store, outbox, pid = rt.store, rt.store.delivery, 5
    at_start = "efficientnet-lite0-224px-v0001-test"
    store.publish_version(pid, at_start, b"", {}, {})
    started = time.time()
    outbox.set(pid, at_start, [1], WRITTEN)  # the version of the sweep's start, written since
    store.r.hset(keys.delivery(pid, at_start), "2", f"{WRITTEN}:{started - 3600:.3f}")  # written long before
    published = "efficientnet-lite0-224px-v0002-test"
    store.publish_version(pid, published, b"", {}, {})  # published while the sweep listed
    outbox.set(pid, published, [3], WRITTEN)
    outbox.claim_many(pid, published, [4], WRITING)
    assert _written_since(rt, pid, at_start, started, {1, 2, 3, 4, 5}) == {1, 3, 4}
