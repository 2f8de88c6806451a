"""A project people are labelling, through a real Label Studio: while annotations arrive and refits publish new
model versions, every unannotated task read through Label Studio's task API shows a suggestion of the version
Label Studio shows; a refit rewrites only the tasks whose answer changed; Label Studio's table stays lean."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from common.models import embedding_space
from common.settings import Settings
from common.store import Store
from tests.conftest import TEST_REDIS_URL, worker_env
from tests.helpers import DATA, ApiProcess, WorkerProcess, wait_until

from .label_studio import LabelStudioServer
from .showing import current_answers_shown, live_rows

pytestmark = pytest.mark.e2e


def choice(tag: str, label: str) -> dict:
    return {"from_name": tag, "to_name": "image", "type": "choices", "value": {"choices": [label]}}


def all_predictions(label_studio: LabelStudioServer, project: int) -> dict[int, list[dict]]:
    return {t["id"]: t["predictions"] for t in label_studio.list_tasks(project, page_size=500)}


@contextlib.contextmanager
def backend(
    label_studio: LabelStudioServer, tmp_path: Path, **settings: str
) -> Iterator[tuple[ApiProcess, WorkerProcess]]:
    """The API and a worker of two processes, refitting every 2 annotations, over an emptied Redis, connected to
    `label_studio`; on a clean exit, neither logged a traceback."""
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    env = worker_env(tmp_path, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key,
                     LOCAL_FILES_DOCUMENT_ROOT=str(DATA), WORKER_CONCURRENCY="2", REFIT_EVERY="2",
                     **settings)  # fmt: skip
    api = ApiProcess(env, tmp_path / "api.log").start()
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        yield api, worker
        log = (api.log_path.read_text() + worker.log_path.read_text()).lower()
        assert "traceback" not in log, log[-3000:]
    finally:
        api.stop()
        worker.stop()


def test_while_annotations_arrive_every_task_shows_a_current_suggestion(
    label_studio: LabelStudioServer, tmp_path: Path, label_config: str
):
    with backend(label_studio, tmp_path, CHUNK_SIZE="128", REFIT_DELAY_SECONDS="2") as (api, worker):
        store = Store.from_url(TEST_REDIS_URL, embedding_space(Settings()))
        live = store.live_version()
        project = label_studio.create_project("a living project", label_config)
        label_studio.connect_ml_backend(project, api.url)
        particles = sorted((DATA / "flowcam" / "particles").glob("*.png"))[:300]
        ids = label_studio.import_tasks(project, [{"image": f"/data/local-files/?d=flowcam/particles/{p.name}"}
                                                  for p in particles])  # fmt: skip
        labels = {}
        for n, task in enumerate(ids[:2]):
            labels[task] = "Plankton" if n % 2 else "Debris"
            label_studio.create_annotation(task, [choice("organism_type", labels[task])])

        def settled() -> bool:
            fitted = store.fitted_labels(project, store.current_version(project))
            others = [t for t in ids if t not in labels]
            return len(fitted) == len(labels) and bool(current_answers_shown(label_studio, store, project, others))

        wait_until(settled, 300, f"the import settled ({worker.log_tail(20)})", interval=3)
        wait_until(lambda: label_studio.get_project(project)["model_version"] == live, 60,
                   "Label Studio's project showing the live version")  # fmt: skip
        rows_before = max(p["id"] for preds in all_predictions(label_studio, project).values() for p in preds)
        versions_before = len(store.versions(project))

        stopping, samples, blank = threading.Event(), Counter(), []
        sampler_session = requests.Session()
        sampler_session.headers["Authorization"] = f"Token {label_studio.api_key}"

        def sample() -> None:
            """Open random unannotated tasks as the Data Manager does (`GET /api/tasks/<id>`)."""
            rng = random.Random(0)
            while not stopping.wait(0.2):
                task = rng.choice([t for t in ids if t not in labels])
                reply = sampler_session.get(f"{label_studio.url}/api/tasks/{task}", timeout=60).json()
                if reply.get("annotations"):
                    continue
                samples["tasks"] += 1
                if len(live_rows(reply["predictions"], live)) < 1:
                    blank.append((task, time.time()))
                if label_studio.get_project(project)["model_version"] != live:
                    samples["project version changed"] += 1

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for n in range(12):
            task = label_studio.get(f"/api/projects/{project}/next/")["id"]
            labels[task] = "Plankton" if n % 3 else "Debris"
            label_studio.create_annotation(task, [choice("organism_type", labels[task])])
            time.sleep(0.5)
        wait_until(settled, 300, f"the suggestions of a model of every annotation ({worker.log_tail(20)})", interval=2)
        stopping.set()
        sampler.join()

        assert samples["tasks"] > 50 and not blank and not samples["project version changed"], (samples, blank[:5])
        predictions = all_predictions(label_studio, project)
        per_task = [len(p) for p in predictions.values()]
        assert sum(per_task) / len(per_task) <= 1.5 and max(len(live_rows(p, live)) for p in predictions.values()) == 1
        published = len(store.versions(project)) - versions_before
        written = max(p["id"] for preds in predictions.values() for p in preds) - rows_before
        unannotated = len(ids) - len(labels)
        assert published >= 3, published
        # Each version rewrote only what it changed, not every unannotated task.
        assert written < published * unannotated / 2, (written, published, unannotated)


def test_revisions_keep_another_models_predictions(label_studio: LabelStudioServer, tmp_path: Path, label_config: str):
    """Revisions replace only the backend's own rows: another model's predictions on the tasks revised stay,
    and once they are gone every task holds one prediction, the live version's."""
    with backend(label_studio, tmp_path, REFIT_DELAY_SECONDS="1") as (api, worker):
        store = Store.from_url(TEST_REDIS_URL, embedding_space(Settings()))
        live = store.live_version()
        project = label_studio.create_project("another model's predictions", label_config)
        label_studio.connect_ml_backend(project, api.url)
        particles = sorted((DATA / "flowcam" / "particles").glob("*.png"))[300:360]
        ids = label_studio.import_tasks(project, [{"image": f"/data/local-files/?d=flowcam/particles/{p.name}"}
                                                  for p in particles])  # fmt: skip
        labels: dict[int, str] = {}

        def annotate(tasks: list[int]) -> None:
            for n, task in enumerate(tasks):
                labels[task] = "Plankton" if n % 2 else "Debris"
                label_studio.create_annotation(task, [choice("organism_type", labels[task])])
                time.sleep(0.5)

        def settled() -> bool:
            fitted = store.fitted_labels(project, store.current_version(project))
            others = [t for t in ids if t not in labels]
            return len(fitted) == len(labels) and bool(current_answers_shown(label_studio, store, project, others))

        annotate(ids[:2])
        wait_until(settled, 300, f"the import settled ({worker.log_tail(20)})", interval=3)
        foreign = {task: label_studio.create_prediction(task, [choice("organism_type", "Plankton")],
                                                        "another-model-v7", score=0.5)
                   for task in ids[-10:]}  # fmt: skip
        before = {task: live_rows(label_studio.task_predictions(task), live)[0]["id"] for task in foreign}
        versions = len(store.versions(project))
        annotate(ids[2:8])
        wait_until(settled, 300, f"a model of 8 annotations shown ({worker.log_tail(20)})", interval=3)
        assert len(store.versions(project)) > versions
        revised = 0
        for task, prediction in foreign.items():
            held = label_studio.task_predictions(task)
            assert prediction in [p["id"] for p in held] and len(live_rows(held, live)) == 1, (task, held)
            revised += live_rows(held, live)[0]["id"] != before[task]
        assert revised, "none of the tasks holding another model's prediction was revised: nothing was tested"
        for prediction in foreign.values():
            label_studio.request("DELETE", f"/api/predictions/{prediction}", expect=(204,))
        versions = len(store.versions(project))
        annotate(ids[8:14])
        wait_until(settled, 300, f"a model of 14 annotations shown ({worker.log_tail(20)})", interval=3)
        assert len(store.versions(project)) > versions
        predictions = all_predictions(label_studio, project)
        assert all(len(p) <= 1 for p in predictions.values()), predictions
