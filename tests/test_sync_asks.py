"""A sync asked for (Start training, /sync, a new project, an import over MAX_TASKS_PER_REQUEST) is done even
when its message finds another sync of the project running, or is lost; and it is not done twice.

Real Redis and the real Celery messages the dispatcher sends (read back from the broker's queue); no Label
Studio (without LABEL_STUDIO_URL a sync refits and fills gaps only, which is enough to see a retrain)."""

from __future__ import annotations

import base64
import dataclasses
import json
import time

import numpy as np
import pytest

from common import keys
from common.settings import Settings
from tests.helpers import LABEL_CONFIG
from worker import sync
from worker.pipeline import to_bytes
from worker.refitting import refit_project
from worker.runtime import Runtime
from worker.sync import sync_project, tick

PID = 9


@pytest.fixture
def rt(clean_redis) -> Runtime:
    runtime = Runtime(dataclasses.replace(Settings.from_env(), kmeans_clusters=2))
    runtime.store.set_label_config(PID, LABEL_CONFIG)
    rng = np.random.default_rng(0)
    features = {t: rng.normal(t % 2, 0.3, 1280) for t in range(1, 21)}
    runtime.store.save_embeddings(PID, {t: to_bytes(f) for t, f in features.items()}, {})
    for t in (1, 2, 3, 4):
        runtime.store.save_annotation(PID, 100 + t, t, {"organism_type": ["Plankton" if t % 2 else "Debris"]})
    refit_project(runtime, PID, force=False, reason="annotations")  # a model of every annotation: a sync needs no refit
    return runtime


class StandInLabelStudio:
    """Only what sync_project asks before its listing (the listing itself is replaced in the test that uses
    this): the lock is held while Label Studio is read, and these tests are about the lock."""

    def project_exists(self, pid: int) -> bool:
        return True


def sync_messages(rt: Runtime) -> list[dict]:
    """The sync messages waiting in the bulk queue, oldest first, as the task will get their kwargs."""
    raw = [json.loads(m) for m in reversed(rt.store.r.lrange("bulk", 0, -1))]
    return [json.loads(base64.b64decode(m["body"]))[1] for m in raw if m["headers"]["task"] == "plankton.sync"]


def run_queued_syncs(rt: Runtime) -> list[dict]:
    """Run the queued sync messages in order, as a worker would, until none is left."""
    reports = []
    while messages := sync_messages(rt):
        rt.store.r.delete("bulk")
        for kwargs in messages:
            reports.append(sync_project(rt, kwargs["project"], kwargs["retrain"], kwargs["reason"], kwargs["asked"]))
    return reports


def test_start_training_during_a_running_sync_is_done_after_it_and_only_once(rt, monkeypatch):
    version = rt.store.current_version(PID)
    blocked = []

    def listing(rt_, api, pid):
        """A periodic sync reading Label Studio's tasks (it holds the lock): Start training, pressed twice."""
        rt.dispatcher.sync(PID, retrain=True, reason="training")
        rt.dispatcher.sync(PID, retrain=True, reason="training")
        blocked.extend(run_queued_syncs(rt))
        assert rt.store.current_version(PID) == version, "nothing ran while the lock was held"
        return {}

    monkeypatch.setattr(sync, "_reconcile", listing)
    rt.__dict__["label_studio"] = StandInLabelStudio()
    report = sync_project(rt, PID, False, "periodic")
    assert [r["status"] for r in blocked] == ["another sync of this project is running; this one follows it"] * 2
    assert not report.get("refit"), "the periodic sync began before the asks"
    assert rt.store.sync_asked(PID) is not None, "the ask outlives the messages that found the lock held"

    # The periodic sync ended and sent the ask again: the retrain is done, once.
    (again,) = sync_messages(rt)
    assert again["asked"] and not again["retrain"]
    monkeypatch.setattr(sync, "_reconcile", lambda rt_, api, pid: {})
    reports = run_queued_syncs(rt)
    assert [r.get("refit", {}).get("status") for r in reports] == ["unchanged"], "one retrain (nothing new to learn)"
    assert rt.store.sync_asked(PID) is None
    assert sync_messages(rt) == []


def test_an_ask_made_while_a_sync_runs_is_kept_for_the_next_one(rt, monkeypatch):
    rt.dispatcher.sync(PID, retrain=True, reason="training")
    (first,) = sync_messages(rt)
    rt.store.r.delete("bulk")
    fill_gaps = sync.fill_gaps

    def asked_again_meanwhile(rt_, pid):
        rt.store.ask_sync(pid, retrain=False)  # /sync while this one runs: not covered by its listing
        return fill_gaps(rt_, pid)

    monkeypatch.setattr(sync, "fill_gaps", asked_again_meanwhile)
    report = sync_project(rt, PID, first["retrain"], first["reason"], first["asked"])
    monkeypatch.setattr(sync, "fill_gaps", fill_gaps)
    assert report.get("refit")
    ask = rt.store.sync_asked(PID)
    assert ask is not None and ask.retrain is None, "the new ask stays; the retrain that was done does not"
    (follow_up,) = sync_messages(rt)
    version = rt.store.current_version(PID)
    (report,) = run_queued_syncs(rt)
    assert "status" not in report and not report.get("refit"), report
    assert rt.store.current_version(PID) == version and rt.store.sync_asked(PID) is None


def test_a_sync_whose_ask_was_done_by_a_later_start_does_not_run_again(rt):
    rt.dispatcher.sync(PID, reason="requested")
    rt.dispatcher.sync(PID, reason="requested")
    first, second = sync_messages(rt)
    assert "status" not in sync_project(rt, PID, False, first["reason"], first["asked"])
    skipped = sync_project(rt, PID, False, second["reason"], second["asked"])
    assert skipped == {"status": "done by a sync that began after it was asked for"}
    # A periodic sync runs whether asked or not.
    assert "status" not in sync_project(rt, PID, False, "periodic")


def test_the_tick_sends_again_an_ask_whose_message_was_lost(rt):
    rt.dispatcher.sync(PID, reason="requested")
    rt.store.r.delete("bulk")  # the message is lost (Redis restarted without it, a worker died with it)
    tick(rt)
    assert sync_messages(rt) == [], "a fresh ask is left to its message"
    rt.store.r.hset(keys.sync_asked(PID), "at", time.time() - rt.settings.visibility_timeout - 1)
    rt.store.r.delete(keys.beat_lock("tick"))
    with rt.store.lock(PID, "sync"):
        tick(rt)
    assert sync_messages(rt) == [], "a sync running will send it again when it ends"
    rt.store.r.delete(keys.beat_lock("tick"))
    tick(rt)
    (message,) = sync_messages(rt)
    assert message["asked"]
    run_queued_syncs(rt)
    assert rt.store.sync_asked(PID) is None
