"""End to end with a real Label Studio 1.23: project, backend, import, annotations, webhooks, write-back.

Label Studio → webhook → gunicorn API → Redis → Celery worker → embeddings, k-means, classifiers →
label-studio-sdk → predictions that Label Studio's own API returns.
"""

from __future__ import annotations

import collections
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from label_studio_sdk.label_interface import LabelInterface

from common.models import embedding_space
from common.settings import Settings
from common.store import Store
from tests.conftest import TEST_REDIS_URL, worker_env
from tests.helpers import ApiProcess, BeatProcess, WorkerProcess, wait_until
from worker.celery_app import app as celery_app

from .label_studio import LabelStudioServer
from .showing import current_answers_shown

pytestmark = pytest.mark.e2e

ANNOTATED = {0: "Plankton", 1: "Debris", 2: "Plankton", 3: "Debris", 4: "Plankton", 5: "Debris"}


@pytest.fixture
def backend(label_studio: LabelStudioServer, tmp_path: Path) -> Iterator[tuple[ApiProcess, WorkerProcess]]:
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    env = worker_env(
        tmp_path,
        LABEL_STUDIO_URL=label_studio.url,
        LABEL_STUDIO_API_KEY=label_studio.api_key,
        REFIT_EVERY=str(len(ANNOTATED)),
        REFIT_DELAY_SECONDS="600",
        KMEANS_CLUSTERS="3",
        PREDICT_WAIT_SECONDS="2",
    )
    api = ApiProcess(env, tmp_path / "api.log").start()
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    beat = BeatProcess(env, tmp_path / "beat.log", "beat").start()
    try:
        yield api, worker
    finally:
        beat.stop()
        api.stop()
        worker.stop()


def choice(tag: str, label: str) -> dict:
    return {"from_name": tag, "to_name": "image", "type": "choices", "value": {"choices": [label]}}


def model_version(api: ApiProcess, project: int) -> str:
    return requests.post(f"{api.url}/setup", json={"project": f"{project}.0"}, timeout=5).json()["model_version"]


def versions_per_task(predictions: list[dict]) -> collections.Counter:
    return collections.Counter(p["model_version"] for p in predictions)


def annotate_two_and_wait_for_the_rest(
    label_studio: LabelStudioServer, api: ApiProcess, worker: WorkerProcess, project: int, ids: list[int]
) -> None:
    """Annotate the first two tasks (Plankton, Debris) in Label Studio; wait until each of the others holds
    exactly one prediction of the version /setup returns."""
    for task, label in zip(ids[:2], ("Plankton", "Debris"), strict=True):
        label_studio.create_annotation(task, [choice("organism_type", label)])

    store = Store.from_url(TEST_REDIS_URL, embedding_space(Settings()))

    def predicted() -> bool:
        return len(store.fitted_labels(project, store.current_version(project))) == 2 and bool(
            current_answers_shown(label_studio, store, project, ids[2:])
        )

    wait_until(predicted, 120, f"the current model's answer on every other task ({worker.log_tail(20)})",
               interval=2)  # fmt: skip


def test_annotations_in_label_studio_make_the_backend_predict_the_other_tasks(
    label_studio: LabelStudioServer, backend, label_config: str, data_dir: Path
):
    api, worker = backend
    project = label_studio.create_project("plankton e2e", label_config)
    backend_id = label_studio.connect_ml_backend(project, api.url, title="plankton-ml-backend")
    assert label_studio.find_webhook(project, f"{api.url}/webhook"), "Label Studio did not create the webhook"
    crops = sorted((data_dir / "flowcam" / "crops").glob("*.tif"))[:20]
    task_ids = label_studio.import_tasks(project, [{"image": f"/data/local-files/?d=flowcam/crops/{p.name}"}
                                                   for p in crops])  # fmt: skip
    assert len(task_ids) == 20
    store = Store.from_url(TEST_REDIS_URL, embedding_space(Settings()))
    wait_until(lambda: store.embedding_count(project) == 20, 180, f"all 20 tasks embedded ({worker.log_tail(20)})")
    v0 = store.current_version(project)
    live = model_version(api, project)

    annotation_ids = {
        i: label_studio.create_annotation(task_ids[i], [choice("organism_type", label), choice("shape", "Round")])
        for i, label in ANNOTATED.items()
    }

    others = [t for i, t in enumerate(task_ids) if i not in ANNOTATED]

    def predicted(previous: str) -> dict[int, list[dict]] | None:
        if store.current_version(project) == previous:
            return None
        return current_answers_shown(label_studio, store, project, others)

    found = wait_until(lambda: predicted(v0), 240, f"predictions written back ({worker.log_tail(30)})", interval=2)
    version = store.current_version(project)
    assert model_version(api, project) == live != version
    interface = LabelInterface(label_config)
    for task, predictions in found.items():
        assert max(versions_per_task(predictions).values()) == 1, f"task {task} has duplicate predictions"
        (mine,) = [p for p in predictions if p["model_version"] == live]
        assert interface.validate_prediction({"result": mine["result"]}), mine
        assert 0.0 <= mine["score"] <= 1.0
        tags = {item["from_name"] for item in mine["result"]}
        assert "organism_type" in tags
        ids = [item["id"] for item in mine["result"]]
        assert len(set(ids)) == len(ids)
        for item in mine["result"]:
            assert item["type"] == "choices" and item["to_name"] == "image"
            assert set(item["value"]["choices"]) <= set(interface.get_control(item["from_name"]).labels)
    for i in ANNOTATED:
        assert not any(p["model_version"] == live for p in label_studio.task_predictions(task_ids[i]))

    # "Retrieve predictions" over every task, and a job sent twice, still write no second copy.
    label_studio.retrieve_predictions(project, task_ids)
    again = requests.post(f"{api.url}/predict", json={"project": f"{project}.0", "tasks": [
        {"id": t, "data": {"image": "unused"}} for t in others]}, timeout=10).json()  # fmt: skip
    assert len(again["results"]) == len(others)
    job = store.jobs.create("import", project, len(others))
    again_tasks = [{"id": t, "data": label_studio.get_task(t)["data"]} for t in others]
    celery_app.send_task("plankton.predict_tasks", kwargs={"project": project, "tasks": again_tasks, "job_id": job},
                         queue="bulk")  # fmt: skip
    celery_app.send_task("plankton.fill_gaps", kwargs={"project": project}, queue="control")
    wait_until(lambda: store.jobs.get(job).state == "done", 60, "the repeated job")
    wait_until(lambda: store.delivery.size(project) == 0, 60, "the outbox to drain")
    for task in task_ids:
        counts = versions_per_task(label_studio.task_predictions(task))
        assert all(n == 1 for n in counts.values()), (task, counts)

    # Annotators change their minds: "Plankton" becomes "Not-plankton". After training, the other tasks get
    # predictions of a new version, and none of them says "Plankton" any more.
    for i, label in ANNOTATED.items():
        if label == "Plankton":
            changed = [choice("organism_type", "Not-plankton"), choice("shape", "Round")]
            label_studio.request("PATCH", f"/api/annotations/{annotation_ids[i]}", json={"result": changed})
    label_studio.start_training(backend_id)
    relearned = wait_until(lambda: predicted(version), 240, f"re-predictions ({worker.log_tail(30)})", interval=2)
    organism = collections.Counter()
    for task, predictions in relearned.items():
        assert max(versions_per_task(predictions).values()) == 1, f"task {task} has duplicate predictions"
        (mine,) = [p for p in predictions if p["model_version"] == live]
        organism.update(c for item in mine["result"] if item["from_name"] == "organism_type"
                        for c in item["value"]["choices"])  # fmt: skip
    assert "Plankton" not in organism and organism, organism
    log = (api.log_path.read_text() + worker.log_path.read_text()).lower()
    assert "traceback" not in log, log[-3000:]
    print(json.dumps({"version": version, "tasks": len(task_ids), "predicted": len(found)}))


@pytest.fixture
def backend_as_deployed(label_studio: LabelStudioServer, tmp_path: Path) -> Iterator[tuple[ApiProcess, WorkerProcess]]:
    """The default refit policy (REFIT_EVERY 5, REFIT_DELAY_SECONDS 10), two worker processes, and beat."""
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    env = worker_env(tmp_path, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key,
                     CHUNK_SIZE="512", WORKER_CONCURRENCY="2")  # fmt: skip
    api = ApiProcess(env, tmp_path / "api.log").start()
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    beat = BeatProcess(env, tmp_path / "beat.log", "beat").start()
    try:
        yield api, worker
    finally:
        beat.stop()
        api.stop()
        worker.stop()


def test_annotating_while_the_import_runs_leaves_no_task_behind(
    label_studio: LabelStudioServer, backend_as_deployed, label_config: str, data_dir: Path
):
    """As people work: import 39 images and annotate 6 of them one second later, while the import is still
    being embedded. Every other task ends with exactly one prediction of the version /setup returns, and
    that version learned all 6 annotations."""
    api, worker = backend_as_deployed
    project = label_studio.create_project("annotate during import", label_config)
    label_studio.connect_ml_backend(project, api.url)
    crops = sorted((data_dir / "flowcam" / "crops").glob("*.tif"))[:39]
    task_ids = label_studio.import_tasks(project, [{"image": f"/data/local-files/?d=flowcam/crops/{p.name}"}
                                                   for p in crops])  # fmt: skip
    time.sleep(1)
    store = Store.from_url(TEST_REDIS_URL, embedding_space(Settings()))
    embedded_when_annotating = store.embedding_count(project)
    labels = {task_ids[i]: ("Plankton" if i % 2 else "Debris") for i in range(6)}
    for task, label in labels.items():
        label_studio.create_annotation(task, [choice("organism_type", label)])
    others = [t for t in task_ids if t not in labels]

    def settled() -> str | None:
        fitted = store.fitted_labels(project, store.current_version(project))
        if {t: v["organism_type"] for t, v in fitted.items()} != {t: [label] for t, label in labels.items()}:
            return None
        return model_version(api, project) if current_answers_shown(label_studio, store, project, others) else None

    version = wait_until(settled, 180, f"every task predicted by a model of all 6 annotations ({worker.log_tail(30)})",
                         interval=2)  # fmt: skip
    for task in label_studio.list_tasks(project):
        counts = versions_per_task(task["predictions"])
        assert all(n == 1 for n in counts.values()), (task["id"], counts)
        assert counts[version] == 1 or task["id"] not in others, (task["id"], counts)
    print(json.dumps({"embedded when annotating": embedded_when_annotating, "version": version}))


def test_with_a_webhook_secret_connecting_the_model_is_the_only_step(
    label_studio: LabelStudioServer, tmp_path: Path, label_config: str, data_dir: Path
):
    """Label Studio creates the backend's webhook without headers; with WEBHOOK_SECRET set, the workers add
    the header to it themselves, and the webhooks then get through."""
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    secret = "a-long-random-webhook-secret-0123456789"
    env = worker_env(tmp_path, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key,
                     WEBHOOK_SECRET=secret, REFIT_EVERY="2")  # fmt: skip
    api = ApiProcess(env, tmp_path / "api.log").start()
    worker = WorkerProcess({**env, "BACKEND_URL": api.url}, tmp_path / "worker.log").start()
    try:
        project = label_studio.create_project("secret webhook", label_config)
        label_studio.connect_ml_backend(project, api.url)

        def secured() -> bool:
            hook = label_studio.find_webhook(project, f"{api.url}/webhook")
            return (hook.get("headers") or {}).get("X-Webhook-Secret") == secret

        wait_until(secured, 60, f"the secret header on the webhook ({worker.log_tail(20)})")
        crops = sorted((data_dir / "flowcam" / "crops").glob("*.tif"))[:6]
        ids = label_studio.import_tasks(project, [{"image": f"/data/local-files/?d=flowcam/crops/{p.name}"}
                                                 for p in crops])  # fmt: skip
        annotate_two_and_wait_for_the_rest(label_studio, api, worker, project, ids)
        assert "refused a webhook" not in api.log_path.read_text()
    finally:
        api.stop()
        worker.stop()


class Copycat:
    """A server that shows the real backend's /health word for word and answers /setup, as anyone who can
    read that /health could: it records every header it is sent."""

    def __init__(self, real: str) -> None:
        self.seen: list[dict[str, str]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self._answer(requests.get(f"{real}/health", timeout=5).content)

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer(json.dumps({"model_version": "copy"}).encode())

            def _answer(self, body: bytes) -> None:
                owner.seen.append(dict(self.headers))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_copy_of_the_backends_health_never_gets_the_webhook_secret(
    label_studio: LabelStudioServer, tmp_path: Path, label_config: str
):
    """A second ML backend on the project whose /health is a copy of this one's (model class, instance id): the
    workers add the secret header to the webhook of BACKEND_URL only, and the copy is never sent it."""
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    secret = "a-long-random-webhook-secret-9876543210"
    env = worker_env(tmp_path, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key,
                     WEBHOOK_SECRET=secret)  # fmt: skip
    api = ApiProcess(env, tmp_path / "api.log").start()
    worker = WorkerProcess({**env, "BACKEND_URL": api.url}, tmp_path / "worker.log").start()
    copycat = Copycat(api.url)
    try:
        project = label_studio.create_project("copycat", label_config)
        label_studio.connect_ml_backend(project, copycat.url, title="copy")
        label_studio.connect_ml_backend(project, api.url)

        def secured(url: str) -> bool:
            return (label_studio.find_webhook(project, f"{url}/webhook") or {}).get("headers", {}).get(
                "X-Webhook-Secret") == secret  # fmt: skip

        wait_until(lambda: secured(api.url), 60, f"the secret header on this backend's webhook ({worker.log_tail(20)})")
        requests.post(f"{api.url}/sync", json={"project": project}, timeout=10)  # one more sweep, to be sure
        time.sleep(5)
        assert not secured(copycat.url)
        label_studio.import_tasks(project, [{"image": "/data/local-files/?d=flowcam/crops/none.tif"}])
        time.sleep(2)
        assert copycat.seen and all("X-Webhook-Secret" not in h for h in copycat.seen), copycat.seen
    finally:
        copycat.close()
        api.stop()
        worker.stop()


def test_an_import_over_max_tasks_per_request_is_predicted_all_the_same(
    label_studio: LabelStudioServer, tmp_path: Path, label_config: str, data_dir: Path
):
    """Label Studio sends an import's tasks in one webhook, once. Over MAX_TASKS_PER_REQUEST, the first 5 are
    queued at once and a sync lists the other 7 from Label Studio (here while the new project's own sync may
    still run): every task is embedded, and every unannotated one ends with one prediction of the current
    version. No beat: no periodic sync comes to the rescue."""
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    env = worker_env(tmp_path, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key,
                     MAX_TASKS_PER_REQUEST="5", REFIT_EVERY="2")  # fmt: skip
    api = ApiProcess(env, tmp_path / "api.log").start()
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        project = label_studio.create_project("import over the limit", label_config)
        label_studio.connect_ml_backend(project, api.url)
        crops = sorted((data_dir / "flowcam" / "crops").glob("*.tif"))[:12]
        ids = label_studio.import_tasks(project, [{"image": f"/data/local-files/?d=flowcam/crops/{p.name}"}
                                                 for p in crops])  # fmt: skip
        store = Store.from_url(TEST_REDIS_URL, embedding_space(Settings()))
        wait_until(lambda: store.embedding_count(project) == 12, 120, f"all 12 embedded ({worker.log_tail(20)})")
        annotate_two_and_wait_for_the_rest(label_studio, api, worker, project, ids)
        assert "an import of 12 tasks, 7 over MAX_TASKS_PER_REQUEST" in api.log_path.read_text()
    finally:
        api.stop()
        worker.stop()
