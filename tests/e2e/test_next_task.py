"""The tasks Label Studio hands out next are revised in place, through a real Label Studio (and real Redis, no
worker): a revision otherwise deletes a task's prediction and writes the new one a moment later, and the task an
annotator is handed in between shows nothing. A refit revises the annotator's next task first, just after
their last annotation, so the two meet far more often than chance would have it (bench/RESULTS.md)."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from common.revisions import NEXT_OUT
from common.settings import Settings
from worker import delivery
from worker.runtime import Runtime

from .label_studio import LabelStudioServer
from .showing import live_rows

pytestmark = pytest.mark.e2e


def answer(label: str, score: float) -> dict:
    result = [{"from_name": "organism_type", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]
    return {"result": result, "score": score}


def test_the_tasks_handed_out_next_keep_their_prediction_while_it_is_revised(
    label_studio: LabelStudioServer, label_config: str, clean_redis
):
    pid = label_studio.create_project("revised in place", label_config)
    ids = label_studio.import_tasks(pid, [{"image": f"https://example.org/p{i}.png"} for i in range(12)])
    settings = Settings.from_env()
    rt = Runtime(dataclasses.replace(settings, label_studio_url=label_studio.url,
                                     label_studio_api_key=label_studio.api_key))  # fmt: skip
    api, store, live = rt.label_studio, rt.store, rt.store.live_version()
    assert api is not None
    store.add_project(pid)
    # Scores fall as the id rises: what Label Studio's sequential sampling hands out next (the lowest ids) and what
    # its uncertainty sampling does (the lowest scores) are the two ends.
    first = {t: answer("Debris", 0.9 - 0.01 * n) for n, t in enumerate(ids)}
    v1 = store.next_version(pid)
    delivery._write(rt, api, pid, v1, live, first, {}, {})
    before = {t: live_rows(label_studio.task_predictions(t), live)[0]["id"] for t in ids}
    next_out = set(ids[:NEXT_OUT]) | set(ids[-NEXT_OUT:])

    watched, seen, stop = ids[0], [], threading.Event()

    def open_the_next_task() -> None:
        while not stop.is_set():
            seen.append(len(live_rows(label_studio.task_predictions(watched), live)))

    opener = threading.Thread(target=open_the_next_task)
    opener.start()
    second = {t: answer("Plankton", 0.6) for t in ids}
    v2 = store.next_version(pid)
    try:
        _, stored = delivery._write(rt, api, pid, v2, live, second, store.shown(pid, ids), {})
    finally:
        stop.set()
        opener.join()

    assert stored == set(ids)
    after = {t: live_rows(label_studio.task_predictions(t), live) for t in ids}
    assert all(len(rows) == 1 and rows[0]["result"][0]["value"]["choices"] == ["Plankton"] for rows in after.values())
    kept = {t for t in ids if after[t][0]["id"] == before[t]}
    assert kept == next_out, (sorted(kept), sorted(next_out))
    assert seen and min(seen) == 1, seen  # the watched task never showed nothing
