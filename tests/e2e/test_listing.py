"""The worker's listings (worker/label_studio.py) against a real Label Studio: every task asked for comes back,
no page past the end of a selection is asked for (Label Studio answers such a page with 404 after counting the
selection again; a revision of 20 tasks paid that request every time), the listings the sweep learns
annotations from carry them whole, on every page, though they ask for no other field, and a sweep during an
import does not list the tasks the backend has still to write."""

from __future__ import annotations

import dataclasses
import re
import time

import pytest

import worker.label_studio
from common.annotations import annotation_labels
from common.label_config import parse_label_config
from common.settings import Settings
from common.store import Shown
from worker import sync
from worker.label_studio import LabelStudioApi
from worker.runtime import Runtime

from .label_studio import LabelStudioServer

LISTING = re.compile(r'"GET /api/tasks/\?[^"]*" (\d{3})')


def listings_since(label_studio: LabelStudioServer, offset: int, at_least: int) -> list[str]:
    """The status of each task listing Label Studio logged since `offset` (its log is written a moment after
    it answers)."""
    deadline = time.monotonic() + 5
    while True:
        statuses = LISTING.findall(label_studio.log_since(offset))
        if len(statuses) >= at_least or time.monotonic() > deadline:
            return statuses


@pytest.fixture
def project(label_studio: LabelStudioServer, label_config: str) -> tuple[int, list[int]]:
    pid = label_studio.create_project("selected listings", label_config)
    return pid, label_studio.import_tasks(pid, [{"image": f"https://example.org/p{i}.png"} for i in range(5)])


def test_a_selection_comes_back_in_one_request(label_studio, project):
    pid, ids = project
    api = LabelStudioApi(label_studio.url, label_studio.api_key)
    offset = label_studio.log_size()
    assert set(api.rows(pid, ids[:3])) == set(ids[:3])
    # The log names each request once or twice (two handlers): one listing, never a page past the end.
    statuses = listings_since(label_studio, offset, 1)
    assert statuses and set(statuses) == {"200"}, statuses


def test_a_deleted_task_is_left_out_and_larger_selections_go_a_page_a_request(label_studio, project, monkeypatch):
    pid, ids = project
    label_studio.request("DELETE", f"/api/tasks/{ids[1]}/", expect=(204,))
    api = LabelStudioApi(label_studio.url, label_studio.api_key)
    assert api.existing_tasks(pid, ids) == set(ids) - {ids[1]}
    monkeypatch.setattr(worker.label_studio, "SYNC_PAGE_SIZE", 2)
    assert {task.id for task in api.tasks(pid, ids)} == set(ids) - {ids[1]}
    assert set(api.rows(pid, [ids[0], ids[2], ids[3], ids[4]])) == {ids[0], ids[2], ids[3], ids[4]}


def test_annotations_come_whole_in_every_listing_that_carries_them(label_studio, project, label_config, monkeypatch):
    """Asked for id, data and annotations only (the Data Manager's other columns cost Label Studio five times as
    much to list): an `include`d annotation alone is its id, so without `expand` every label here is lost."""
    pid, ids = project
    chosen = {"from_name": "organism_type", "to_name": "image", "type": "choices", "value": {"choices": ["Debris"]}}
    label_studio.create_annotation(ids[0], [chosen])
    label_studio.create_annotation(ids[2], [chosen])
    label_studio.create_annotation(ids[2], [], was_cancelled=True)
    config = parse_label_config(label_config)
    api = LabelStudioApi(label_studio.url, label_studio.api_key)
    monkeypatch.setattr(worker.label_studio, "SYNC_PAGE_SIZE", 1)  # the second page must carry them whole too

    def labels(tasks) -> dict[int, list]:
        return {t.id: [annotation_labels(a, config) for a in t.annotations] for t in tasks}

    expected = {ids[0]: [{"organism_type": ["Debris"]}], ids[2]: [{"organism_type": ["Debris"]}, None]}
    assert labels(api.annotated_tasks(pid)) == expected
    assert labels(api.tasks(pid, [ids[0], ids[2]])) == expected
    after = list(api.tasks_after(pid, ids[1]))
    assert labels(after) == {ids[2]: expected[ids[2]], ids[3]: [], ids[4]: []}
    assert all(t.data == {"image": f"https://example.org/p{i + 2}.png"} for i, t in enumerate(after))


def test_a_sweep_lists_no_lacking_tasks_while_the_backend_has_many_to_write(
    label_studio, project, clean_redis, monkeypatch
):
    """A new project's first sweep runs while its import is written: every task lacks the live version until
    then, and listing them took 127-147 s at 20,000 tasks (bench/RESULTS.md). While the backend has
    more than UNWRITTEN_LISTING_LIMIT tasks still to write, the sweep does not list them; once it has few, it
    does, and finds what Label Studio lacks."""
    pid, ids = project
    settings = Settings.from_env()
    rt = Runtime(dataclasses.replace(settings, label_studio_url=label_studio.url,
                                     label_studio_api_key=label_studio.api_key))  # fmt: skip
    rt.store.add_project(pid)
    rt.store.remember_tasks(pid, [{"id": t, "data": {"image": f"https://example.org/p{i}.png"}}
                                  for i, t in enumerate(ids)])  # fmt: skip
    monkeypatch.setattr(sync, "UNWRITTEN_LISTING_LIMIT", 3)
    offset = label_studio.log_size()
    report = sync._reconcile(rt, rt.label_studio, pid)
    assert (report["to_write"], report["listed"]) == (5, 0)
    assert "predictions_model_versions" not in label_studio.log_since(offset)
    # Three written as far as the backend knows (Label Studio lost them): two left to write, under the limit.
    rt.store.set_shown(pid, {t: Shown("efficientnet-lite0-224px-v0001-test", 0.9, "d") for t in ids[:3]})
    report = sync._reconcile(rt, rt.label_studio, pid)
    assert (report["to_write"], report["listed"]) == (2, 5)
    assert rt.store.shown_tasks(pid) == set(), "the lost writes are to be written again"
