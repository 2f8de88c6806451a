"""The periodic check's idea of a lost chunk message, against the real Redis (the broker's queue is the list
kombu keeps under the queue's name): a task queued long ago is lost only when the bulk queue is empty or has
stopped moving, not while it waits behind a large import."""

from __future__ import annotations

import dataclasses
import time

import pytest

from common import keys, queues
from common.settings import Settings
from worker.runtime import Runtime
from worker.sync import lost_in_queue

PID = 21
TIMEOUT = 60


@pytest.fixture
def rt(clean_redis) -> Runtime:
    return Runtime(dataclasses.replace(Settings.from_env(), visibility_timeout=TIMEOUT))


def queue_tasks(rt: Runtime, ages: dict[int, float]) -> None:
    now = time.time()
    rt.store.r.hset(keys.pending(PID), mapping={str(t): f"{now - age:.3f}" for t, age in ages.items()})


def test_a_task_queued_long_ago_is_lost_when_the_bulk_queue_is_empty(rt):
    queue_tasks(rt, {1: TIMEOUT + 5, 2: TIMEOUT - 5})
    rt.store.note_ingest_progress()
    assert lost_in_queue(rt, PID, time.time()) == [1]


def test_it_waits_behind_an_import_while_the_queue_moves(rt):
    queue_tasks(rt, {1: TIMEOUT + 5, 2: 3 * TIMEOUT})
    rt.store.r.lpush(queues.BULK, "a chunk of another import")
    rt.store.note_ingest_progress()
    assert lost_in_queue(rt, PID, time.time()) == []
    # The workers stopped taking chunks: the queue has not moved for longer than the timeout.
    assert sorted(lost_in_queue(rt, PID, time.time() + TIMEOUT + 1)) == [1, 2]


def test_nothing_is_lost_when_nothing_was_queued_long_ago(rt):
    queue_tasks(rt, {1: 1.0})
    assert lost_in_queue(rt, PID, time.time()) == []
    assert rt.store.last_ingest_progress() == 0
