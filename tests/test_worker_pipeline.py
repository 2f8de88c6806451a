"""The API and real Celery workers over the real Redis: imports, bad input, learning, lanes, crashes."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from api.app import create_app
from common.settings import Settings
from common.store import version_number
from tests.helpers import DATA, LABEL_CONFIG, png_bytes, synthetic_particle, wait_until
from worker.celery_app import app as celery_app

PID = 5
CROPS = sorted((DATA / "flowcam" / "crops").glob("*.tif"))


@pytest.fixture
def api(clean_redis):
    settings = dataclasses.replace(
        Settings.from_env(), predict_wait_seconds=20, chunk_size=8, refit_every=1000, refit_delay_seconds=3600
    )
    client = create_app(settings).test_client()
    assert client.post("/setup", json={"project": f"{PID}.1", "schema": LABEL_CONFIG}).status_code == 200
    return client


def put(server, name: str, data: bytes) -> str:
    (server.root / "tmp" / name).write_bytes(data)
    return f"{server.url}/tmp/{name}"


def slow_particle_route(kind: str, delay: float):
    """A route answering `/<name>?s=<seed>` with a synthetic particle after `delay` seconds."""

    def route(handler):
        time.sleep(delay)
        body = png_bytes(synthetic_particle(kind, int(handler.path.split("=")[-1])))
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return route


def job_done(api, job: str, timeout: float = 120) -> dict:
    return wait_until(lambda: (s := api.get(f"/jobs/{job}").json)["state"] == "done" and s, timeout, f"job {job}")


def import_tasks(api, tasks: list[dict]) -> dict:
    reply = api.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": PID}, "tasks": tasks})
    assert reply.status_code == 200, reply.json
    return job_done(api, reply.json["job"])


def annotate(api, ann_id: int, task: dict, labels: dict[str, list[str]]) -> None:
    result = [{"from_name": tag, "to_name": "image", "type": "choices", "value": {"choices": chosen}}
              for tag, chosen in labels.items()]  # fmt: skip
    body = {"action": "ANNOTATION_CREATED", "project": {"id": PID}, "task": task,
            "annotation": {"id": ann_id, "task": task["id"], "result": result, "was_cancelled": False}}  # fmt: skip
    assert api.post("/webhook", json=body).status_code == 200


def test_import_embeds_every_good_image_and_fails_only_the_bad_ones(api, image_server, start_worker, tmp_path):
    start_worker(IMAGE_MAX_PIXELS="1000000", DOWNLOAD_TIMEOUT="2")
    good = [{"id": i + 1, "data": {"image": f"{image_server.url}/data/flowcam/crops/{p.name}"}}
            for i, p in enumerate(CROPS[:12])]  # fmt: skip
    grey16 = next((DATA / "flowcam" / "greyscale16").glob("*.tif"))
    good.append({"id": 13, "data": {"image": f"{image_server.url}/data/flowcam/greyscale16/{grey16.name}"}})
    whole = png_bytes(synthetic_particle("round", 1))
    huge = Image.new("L", (1200, 1000))
    huge_path = image_server.root / "tmp" / "huge.png"
    huge.save(huge_path)

    def slow(handler):
        time.sleep(4)
        handler.send_response(200)
        handler.end_headers()

    image_server.routes["/slow.png"] = slow
    bad = {
        101: {"image": put(image_server, "truncated.png", whole[: len(whole) // 2])},
        102: {"image": put(image_server, "random.png", np.random.default_rng(0).bytes(500))},
        103: {"image": f"{image_server.url}/tmp/missing.png"},
        104: {"image": f"{image_server.url}/tmp/huge.png"},
        105: {"picture": "elsewhere"},
        106: {"image": f"{image_server.url}/slow.png"},
    }
    tasks = good + [{"id": tid, "data": data} for tid, data in bad.items()]
    status = import_tasks(api, tasks)
    assert (status["done"], status["failed"]) == (13, 6)
    errors = {e["task"]: e["error"] for e in status["errors"]}
    assert "cannot decode" in errors[101] and "cannot decode" in errors[102]
    assert "404" in errors[103]
    assert "IMAGE_MAX_PIXELS" in errors[104]
    assert "no 'image'" in errors[105]
    assert "timed out" in errors[106]
    store = api.application.extensions["store"]
    assert sorted(store.embeddings(PID)) == list(range(1, 14))


def _synthetic_project(image_server, n_per_class: int = 12):
    kinds = {"round": "Plankton", "rod": "Not-plankton", "speckle": "Debris"}
    tasks, truth = [], {}
    for k, kind in enumerate(kinds):
        for j in range(n_per_class):
            tid = 1 + k * n_per_class + j
            url = put(image_server, f"{kind}-{j}.png", png_bytes(synthetic_particle(kind, seed=100 * k + j)))
            tasks.append({"id": tid, "data": {"image": url}})
            truth[tid] = kinds[kind]
    return tasks, truth


def test_annotations_refit_a_new_version_that_predicts_the_other_tasks(api, image_server, start_worker):
    start_worker(KMEANS_CLUSTERS="3", REFIT_EVERY="100", REFIT_DELAY_SECONDS="600")
    tasks, truth = _synthetic_project(image_server)
    import_tasks(api, tasks)
    live = api.post("/setup", json={"project": f"{PID}.1"}).json["model_version"]
    v0 = api.get(f"/projects/{PID}").json["model_version"]
    annotated = [t for t in tasks if (t["id"] - 1) % 12 < 3]
    for t in annotated:
        annotate(api, 1000 + t["id"], t, {"organism_type": [truth[t["id"]]]})
    assert api.post("/webhook", json={"action": "START_TRAINING", "project": {"id": PID}}).status_code == 200
    v1 = wait_until(lambda: (v := api.get(f"/projects/{PID}").json["model_version"]) != v0 and v,
                    60, "a new model version")  # fmt: skip
    assert version_number(v1) == 1
    assert api.post("/setup", json={"project": f"{PID}.1"}).json["model_version"] == live
    others = [t for t in tasks if t not in annotated]
    results = wait_until(
        lambda: all(r := api.post("/predict", json={"project": f"{PID}.1", "tasks": others}).json["results"]) and r,
        60, "predictions of the new version",
    )  # fmt: skip
    correct = 0
    for task, pred in zip(others, results, strict=True):
        assert pred["model_version"] == live
        (item,) = pred["result"]
        assert item["from_name"] == "organism_type" and item["type"] == "choices"
        correct += item["value"]["choices"] == [truth[task["id"]]]
    assert correct / len(others) >= 0.9
    assert api.get("/versions").json["versions"] == [live]
    assert [v["version"] for v in api.get(f"/versions?project={PID}").json["projects"][str(PID)]] == [v0, v1]


def test_tasks_imported_again_are_not_left_queued(api, image_server, start_worker):
    """A second TASKS_CREATED for tasks already embedded (a duplicate webhook, a sync meanwhile) settles from the
    stored features; the project must not count them as queued for ever (the deliverer waits while any are)."""
    start_worker(KMEANS_CLUSTERS="3")
    tasks, _ = _synthetic_project(image_server, n_per_class=2)
    import_tasks(api, tasks)
    assert api.get(f"/projects/{PID}").json["tasks"]["queued"] == 0
    again = import_tasks(api, tasks)
    assert (again["done"], again["failed"]) == (len(tasks), 0)
    assert api.get(f"/projects/{PID}").json["tasks"]["queued"] == 0


def test_a_lone_task_waits_for_its_prediction(api, image_server, start_worker):
    start_worker(KMEANS_CLUSTERS="3")
    tasks, truth = _synthetic_project(image_server, n_per_class=4)
    import_tasks(api, tasks)
    for t in tasks[::2]:
        annotate(api, 2000 + t["id"], t, {"organism_type": [truth[t["id"]]], "shape": ["Round", "Spiky"]})
    api.post("/webhook", json={"action": "START_TRAINING", "project": {"id": PID}})
    # At least one: the fifth annotation may have refitted already (REFIT_EVERY), and training refits again.
    wait_until(lambda: version_number(api.get(f"/projects/{PID}").json["model_version"]) >= 1, 60, "the refit")
    new = {"id": 500, "data": {"image": put(image_server, "new-rod.png", png_bytes(synthetic_particle("rod", 999)))}}
    (result,) = api.post("/predict", json={"project": f"{PID}.1", "tasks": [new]}).json["results"]
    assert result, "the lone task's prediction arrived within the wait"
    chosen = {item["from_name"]: item["value"]["choices"] for item in result["result"]}
    assert chosen["organism_type"] == ["Not-plankton"]
    assert chosen["shape"] == ["Round", "Spiky"]


def test_the_interactive_lane_overtakes_a_bulk_import(api, image_server, start_worker):
    start_worker(CHUNK_SIZE="4", DOWNLOAD_WORKERS="4")

    image_server.routes["/slowish.png"] = slow_particle_route("speckle", 0.4)
    bulk = [{"id": i, "data": {"image": f"{image_server.url}/slowish.png?s={i}"}} for i in range(1, 61)]
    reply = api.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": PID}, "tasks": bulk})
    job = reply.json["job"]
    wait_until(lambda: api.get(f"/jobs/{job}").json["done"] >= 4, 60, "the import to start")
    done_before = api.get(f"/jobs/{job}").json["done"]
    lone = {"id": 999, "data": {"image": f"{image_server.url}/slowish.png?s=999"}}
    api.post("/predict", json={"project": f"{PID}.1", "tasks": [lone]})
    store = api.application.extensions["store"]
    wait_until(lambda: store.embeddings(PID, [999]), 60, "the interactive task")
    done_after = api.get(f"/jobs/{job}").json["done"]
    # At most the chunk in progress (4 tasks) and one prefetched message finished in between.
    assert done_after - done_before <= 8, (done_before, done_after)
    assert done_after < 60


def test_a_bulk_chunk_gives_way_only_to_interactive_work_its_worker_serves(clean_redis):
    """The question a bulk chunk asks after each batch, against the broker's real queue in Redis."""
    from worker.celery_app import app
    from worker.runtime import Runtime

    queues_ = app.amqp.queues
    before = queues_._consume_from  # None: no -Q given (consume every queue); select() sets it
    try:
        queues_.select(["interactive", "bulk"])  # what `-Q interactive,bulk` does
        serving = Runtime(Settings.from_env())
        assert not serving.interactive_waiting()
        app.send_task("plankton.predict_tasks", kwargs={"project": PID, "tasks": []}, queue="interactive")
        assert serving.interactive_waiting()
        queues_.select(["bulk"])  # a worker started with `-Q bulk`: nothing to give way to
        assert not Runtime(Settings.from_env()).interactive_waiting()
    finally:
        queues_._consume_from = before


def test_a_big_bulk_chunk_gives_way_to_the_interactive_lane(clean_redis, image_server, start_worker):
    """One 60-task chunk: the lone task does not wait for the chunk. The chunk stops after its batch in
    progress, sends its unstarted tasks back to the bulk queue, and they all finish later. The chunk is sent
    as one message: an import of 60 is cut into chunks of 15 and fewer (`chunk_sizes`), which may be wholly
    downloaded before the lone task comes, and then has nothing left to give back."""
    settings = dataclasses.replace(Settings.from_env(), predict_wait_seconds=20, chunk_size=64)
    api = create_app(settings).test_client()
    assert api.post("/setup", json={"project": f"{PID}.1", "schema": LABEL_CONFIG}).status_code == 200
    worker = start_worker(BATCH_SIZE="4", DOWNLOAD_WORKERS="4")

    image_server.routes["/slowish.png"] = slow_particle_route("rod", 0.3)
    bulk = [{"id": i, "data": {"image": f"{image_server.url}/slowish.png?s={i}"}} for i in range(1, 61)]
    store = api.application.extensions["store"]
    job = store.jobs.create("import", PID, len(bulk))
    celery_app.send_task("plankton.predict_tasks", kwargs={"project": PID, "tasks": bulk, "job_id": job},
                         queue="bulk")  # fmt: skip
    wait_until(lambda: store.embedding_count(PID) >= 4 or api.get(f"/jobs/{job}").json["done"], 60, "the import")
    lone = {"id": 999, "data": {"image": f"{image_server.url}/slowish.png?s=999"}}
    api.post("/predict", json={"project": f"{PID}.1", "tasks": [lone]})
    wait_until(lambda: store.embeddings(PID, [999]), 60, "the interactive task")
    assert api.get(f"/jobs/{job}").json["done"] < 60, "the lone task did not wait for the whole chunk"
    # The lone task runs in the other pool process; the chunk logs once its batch in progress is stored,
    # which may be after the lone task is done.
    wait_until(lambda: "tasks back to the bulk queue" in worker.log_path.read_text(), 30, "the chunk giving way")
    pool = psutil.Process(worker.proc.pid).children()
    assert pool and all(p.nice() == 10 for p in pool), "pool processes yield the CPU to the API (WORKER_NICE)"

    status = job_done(api, job)
    assert (status["done"], status["failed"]) == (60, 0)
    assert sorted(store.embeddings(PID)) == [*range(1, 61), 999]


def test_a_worker_killed_mid_batch_loses_no_task(api, image_server, start_worker, tmp_path: Path):
    env = {"CHUNK_SIZE": "4", "DOWNLOAD_WORKERS": "2", "BROKER_VISIBILITY_TIMEOUT": "5"}
    first = start_worker("crash", **env)

    image_server.routes["/slow-rod.png"] = slow_particle_route("rod", 0.5)
    tasks = [{"id": i, "data": {"image": f"{image_server.url}/slow-rod.png?s={i}"}} for i in range(1, 25)]
    reply = api.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": PID}, "tasks": tasks})
    job = reply.json["job"]
    wait_until(lambda: api.get(f"/jobs/{job}").json["done"] >= 4, 60, "the first chunk")
    first.kill()
    start_worker("rescue", **env)
    status = job_done(api, job, timeout=120)
    assert status["failed"] == 0
    store = api.application.extensions["store"]
    assert sorted(store.embeddings(PID)) == list(range(1, 25))


def test_annotations_trigger_debounced_refits(clean_redis, image_server, start_worker):
    settings = dataclasses.replace(Settings.from_env(), chunk_size=8, refit_every=3, refit_delay_seconds=4.0)
    api = create_app(settings).test_client()
    api.post("/setup", json={"project": f"{PID}.1", "schema": LABEL_CONFIG})
    start_worker(KMEANS_CLUSTERS="3")
    tasks, truth = _synthetic_project(image_server, n_per_class=4)
    import_tasks(api, tasks)
    version = lambda: api.get(f"/projects/{PID}").json["model_version"]  # noqa: E731

    def annotate_and_reply(ann_id: int, task: dict) -> dict:
        result = [{"from_name": "organism_type", "to_name": "image", "type": "choices",
                   "value": {"choices": [truth[task["id"]]]}}]  # fmt: skip
        body = {"action": "ANNOTATION_CREATED", "project": {"id": PID}, "task": task,
                "annotation": {"id": ann_id, "task": task["id"], "result": result}}  # fmt: skip
        return api.post("/webhook", json=body).json

    # One annotation: a refit is scheduled REFIT_DELAY_SECONDS later, and happens.
    assert annotate_and_reply(1, tasks[0])["refit_job"]
    wait_until(lambda: version_number(version()) == 1, 60, "the delayed refit")
    # Three more: the first schedules a delayed refit, the second rides on it, the third refits at once.
    replies = [annotate_and_reply(10 + i, tasks[4 * i + 1]) for i in range(3)]
    assert [bool(r["refit_job"]) for r in replies] == [True, False, True]
    # At least 2: annotations that land while the first refit ends are learned at once by one more.
    wait_until(lambda: version_number(version()) >= 2, 60, "the refit after REFIT_EVERY annotations")
