"""The deliverer's pace. How long it waits for a fuller write while an import is being embedded: Label Studio's
cost per request grows with the project's size (bench/RESULTS.md), so the wait grows with what its last write
took. And how many revisions a request carries: few while annotators work, more once the project is quiet."""

from __future__ import annotations

import json
import time

import pytest

from common import keys
from common.delivery import Delivery
from common.settings import Settings
from common.store import STAGING_LEASE
from worker.delivery import (
    MAX_LINGER,
    QUIET_AFTER_SECONDS,
    QUIET_REVISION_BATCH,
    REVISION_BATCH,
    _within_revision_batch,
    is_quiet,
    linger_for,
    more_on_its_way,
)
from worker.runtime import Runtime

PID = 31


def test_the_setting_is_the_least_wait_and_zero_turns_it_off():
    assert linger_for(5.0, 0.0) == 5.0
    assert linger_for(5.0, 0.2) == 5.0
    assert linger_for(0.0, 30.0) == 0.0


def test_a_slow_write_makes_the_next_partial_one_wait_ten_times_as_long_within_a_minute():
    assert linger_for(5.0, 2.0) == 20.0
    assert linger_for(5.0, 30.0) == MAX_LINGER == 60.0


def test_the_last_write_time_is_kept_per_project_and_a_success_ends_the_backoff(clean_redis):
    outbox = Delivery(clean_redis)
    assert outbox.last_write_seconds(PID) == 0.0
    assert outbox.failed_attempt(PID) == 1
    outbox.succeeded(PID, 4.25)
    assert outbox.last_write_seconds(PID) == 4.25 and outbox.last_write_seconds(PID + 1) == 0.0
    assert outbox.failed_attempt(PID) == 1


def test_staging_an_entry_again_keeps_its_time(clean_redis):
    """The periodic sync stages every task Label Studio lacks; were that to move the entry, a sync more frequent
    than the wait would hold the write back for ever, and cut a backoff short."""
    outbox = Delivery(clean_redis)
    outbox.stage(PID, "v1", [1, 2], due=100.0)
    outbox.stage(PID, "v1", [2, 3], due=200.0)
    assert outbox.next_due(PID) == 100.0
    assert outbox.due(PID, 150.0, 10) == [(1, "v1"), (2, "v1")]
    outbox.postpone(PID, [(1, "v1")], 300.0)
    outbox.stage(PID, "v1", [1], due=150.0)
    assert outbox.due(PID, 250.0, 10) == [(2, "v1"), (3, "v1")]


@pytest.fixture
def rt(clean_redis) -> Runtime:
    return Runtime(Settings.from_env())


def test_the_wait_is_only_for_chunks_being_embedded(rt):
    now = time.time()
    assert not more_on_its_way(rt, PID, now, 20.0)
    rt.store.mark_pending(PID, [7], stale_after=60)
    assert not more_on_its_way(rt, PID, now, 20.0), "queued, but no worker has taken a chunk"
    rt.store.note_ingest_progress()
    assert more_on_its_way(rt, PID, time.time(), 20.0)
    assert not more_on_its_way(rt, PID, time.time() + 21, 20.0), "the workers stopped taking chunks"
    rt.store.unmark_pending(PID, [7])
    assert not more_on_its_way(rt, PID, time.time(), 20.0)


def test_a_chunk_between_storing_features_and_staging_predictions_is_more_on_its_way(rt):
    """Storing features unqueues their tasks; their predictions are staged a few milliseconds later. A deliverer
    looking in between once wrote without them, and they cost Label Studio a request of their own (about 2 s
    in a project of 4,000 tasks, bench/RESULTS.md)."""
    rt.store.mark_pending(PID, [7, 8], stale_after=60)
    rt.store.note_ingest_progress()
    rt.store.save_embeddings(PID, {7: b"x", 8: b"y"}, {}, staging="chunk-a")
    assert rt.store.pending_count(PID) == 0
    assert more_on_its_way(rt, PID, time.time(), 20.0)
    rt.store.done_staging(PID, "chunk-a")
    assert not more_on_its_way(rt, PID, time.time(), 20.0)


def test_a_chunk_that_dies_before_staging_holds_the_deliverer_back_only_until_its_deadline(rt):
    rt.store.save_embeddings(PID, {7: b"x"}, {}, staging="chunk-b")
    rt.store.note_ingest_progress()
    assert more_on_its_way(rt, PID, time.time(), 60.0)
    assert not more_on_its_way(rt, PID, time.time() + STAGING_LEASE + 1, 60.0)


def test_a_project_is_quiet_once_no_version_was_published_for_a_while(rt):
    assert is_quiet(rt, PID), "no version yet: nothing is being learned"
    rt.store.publish_version(PID, "m-v0001-e", b"model", {}, {})
    assert not is_quiet(rt, PID), "a version just published: someone is annotating"
    meta = rt.store.version_meta(PID, "m-v0001-e")
    rt.store.r.set(
        keys.version_meta(PID, "m-v0001-e"), json.dumps({**meta, "created": meta["created"] - QUIET_AFTER_SECONDS})
    )
    assert is_quiet(rt, PID)


@pytest.mark.parametrize("limit", [REVISION_BATCH, QUIET_REVISION_BATCH])
def test_a_request_carries_every_new_entry_and_at_most_its_share_of_revisions_in_order(limit):
    shown = {t: object() for t in range(1000, 1000 + 3 * limit)}
    todo = [1, *shown, 2, 3]
    kept = _within_revision_batch(todo, shown, limit)  # type: ignore[arg-type]
    assert kept == [1, *list(shown)[:limit], 2, 3]
