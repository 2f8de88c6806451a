"""The periodic sync of a large project waits until its last listing has had LISTING_SHARE of the time since:
listing a project costs Label Studio about 1/400 s a task, and the annotators share that Label Studio.
Real Redis and the sync messages the dispatcher sends (read back from the broker's queue)."""

from __future__ import annotations

import base64
import dataclasses
import json
import time

from common import keys
from common.settings import Settings
from tests.helpers import LABEL_CONFIG
from worker.runtime import Runtime
from worker.sync import LISTING_SHARE, sync_all


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
