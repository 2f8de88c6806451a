"""An annotator's /predict waits for its open task's prediction (`Store.wait_for_prediction`): a worker
storing it wakes the wait, a prediction stored just before the wait ends it at once, and an import's
predictions, which nobody waits for, push no wake-ups (real Redis)."""

from __future__ import annotations

import threading
import time

import redis

from common import keys
from common.store import Store

PID, VERSION = 7, "efficientnet-lite0-224px-v0001-test"


def prediction(label: str) -> dict:
    return {"result": [{"from_name": "class", "to_name": "image", "type": "choices", "value": {"choices": [label]}}],
            "score": 0.9, "model_version": VERSION}  # fmt: skip


def waited(store: Store, task: int, timeout: float) -> float:
    started = time.monotonic()
    store.wait_for_prediction(PID, VERSION, task, timeout)
    return time.monotonic() - started


def test_a_worker_storing_the_prediction_wakes_the_wait(clean_redis: redis.Redis):
    store = Store(clean_redis, "test-space")
    took: list[float] = []
    waiter = threading.Thread(target=lambda: took.append(waited(store, 5, 5.0)))
    waiter.start()
    time.sleep(0.3)
    store.save_predictions(PID, VERSION, {4: prediction("A"), 5: prediction("B"), 6: prediction("C")})
    waiter.join(6)
    assert took and 0.2 < took[0] < 2.0, took
    assert clean_redis.hget(keys.waiters(PID), "5") == b"0"  # the wait is over


def test_a_prediction_stored_before_the_wait_ends_it_at_once(clean_redis: redis.Redis):
    store = Store(clean_redis, "test-space")
    store.save_predictions(PID, VERSION, {5: prediction("B")})  # between /predict's read and its wait
    assert waited(store, 5, 5.0) < 0.5


def test_predictions_nobody_waits_for_push_no_wake_up(clean_redis: redis.Redis):
    store = Store(clean_redis, "test-space")
    clean_redis.hset(keys.waiters(PID), "9", 0)  # a wait that is over
    store.save_predictions(PID, VERSION, {t: prediction("A") for t in range(1, 501)} | {9: prediction("B")})
    assert not clean_redis.keys(keys.notify(PID, 0).rsplit(":", 1)[0] + ":*")
    assert len(store.predictions(PID, VERSION, range(1, 501))) == 500


def test_the_wait_says_which_version_answered(clean_redis: redis.Redis):
    """A refit may publish a version while /predict waits: the worker's prediction carries the newer one."""
    store = Store(clean_redis, "test-space")
    newer = "efficientnet-lite0-224px-v0002-test"
    assert store.wait_for_prediction(PID, VERSION, 5, 0.2) is None
    store.save_predictions(PID, VERSION, {5: prediction("B")})
    assert store.wait_for_prediction(PID, VERSION, 5, 5.0) == VERSION
    found: list[str | None] = []
    waiter = threading.Thread(target=lambda: found.append(store.wait_for_prediction(PID, VERSION, 6, 5.0)))
    waiter.start()
    time.sleep(0.3)
    store.save_predictions(PID, newer, {6: prediction("C")})
    waiter.join(6)
    assert found == [newer]
