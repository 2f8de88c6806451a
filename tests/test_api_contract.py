"""The HTTP contract Label Studio relies on, against the real Redis (no worker: nothing is computed)."""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import sys
import threading
import time

import pytest
import redis

from api.app import create_app
from common.revisions import shown_as
from common.settings import Settings
from common.store import live_version_string, ours, version_number, version_string
from tests.helpers import LABEL_CONFIG, REPO


def make_client(**overrides):
    settings = dataclasses.replace(Settings.from_env(), **{"predict_wait_seconds": 0.2, **overrides})
    app = create_app(settings)
    return app.test_client(), app.extensions["store"]


def queued(r: redis.Redis, queue: str) -> list[dict]:
    return [json.loads(m) for m in r.lrange(queue, 0, -1)]


@pytest.fixture
def client(clean_redis):
    c, store = make_client()
    c.store = store
    return c


def setup_project(client, pid: int = 3) -> str:
    """Label Studio connecting the backend; the sync that a new project gets is left out of the queue."""
    reply = client.post("/setup", json={"project": f"{pid}.1700000000", "schema": LABEL_CONFIG})
    assert reply.status_code == 200
    client.store.r.delete("bulk")
    return reply.json["model_version"]


def test_a_new_project_is_synced_once(client, clean_redis):
    """Connecting a project: its webhook gets the secret, and what it already holds is learned."""
    client.post("/setup", json={"project": "3.1", "schema": LABEL_CONFIG})
    client.post("/setup", json={"project": "3.1", "schema": LABEL_CONFIG})
    (message,) = queued(clean_redis, "bulk")
    assert message["headers"]["task"] == "plankton.sync"
    assert json.loads(base64.b64decode(message["body"]))[1]["reason"] == "new project"


def test_setup_refuses_a_schema_that_does_not_parse(client, clean_redis):
    reply = client.post("/setup", json={"project": "3.1", "schema": "<View><Image"})
    assert reply.status_code == 400 and "schema" in reply.json["error"]
    assert client.store.label_config(3) is None


def test_health_and_root_answer_up(client):
    for path in ("/health", "/"):
        reply = client.get(path)
        assert reply.status_code == 200
        assert reply.json["status"] == "UP"


def test_health_shows_nothing_derived_from_the_webhook_secret(clean_redis):
    """/health is open to anyone: a digest of the secret there would let them test guesses of it offline."""
    replies = [make_client(webhook_secret=secret)[0].get("/health").json for secret in ("", "one-secret", "another")]
    assert replies[0] == replies[1] == replies[2]


def test_setup_returns_the_live_version_whatever_model_version_is_current(client, clean_redis):
    """Label Studio filters predictions by the name /setup returns: it stays the same across refits (each
    prediction written under it carries the current model's answer), and differs from every model version."""
    first = setup_project(client)
    assert first == setup_project(client) == client.store.live_version()
    assert "-live-" in first and version_number(clean_redis.get("plk:p:3:version").decode()) == 0
    assert client.store.label_config(3) == LABEL_CONFIG
    clean_redis.set("plk:p:3:version", version_string(client.store.space, 7, client.store.epoch()))
    other, _ = make_client()
    assert other.post("/setup", json={"project": "3.1"}).json["model_version"] == first


def test_setup_extra_params_choose_the_model_scope(client):
    setup_project(client)
    for extra in ({"model_scope": "bucket"}, json.dumps({"model_scope": "bucket"})):
        assert client.post("/setup", json={"project": "3.1", "extra_params": extra}).status_code == 200
        assert client.store.model_scope(3) == "bucket"
    reply = client.post("/setup", json={"project": "3.1", "extra_params": {"model_scope": "galaxy"}})
    assert reply.status_code == 400 and "model_scope" in reply.json["error"]
    assert client.post("/setup", json={"project": "3.1", "extra_params": None}).status_code == 200
    assert client.store.model_scope(3) == "bucket"


@pytest.mark.parametrize(
    "body",
    [None, "not json", "[1, 2]", json.dumps({"schema": LABEL_CONFIG}), json.dumps({"project": "abc.1"}),
     json.dumps({"project": "3.1", "extra_params": "{nope"})],
)  # fmt: skip
def test_setup_rejects_malformed_bodies_with_json_400(client, body):
    reply = client.post("/setup", data=body, content_type="application/json")
    assert reply.status_code == 400
    assert reply.is_json and reply.json["error"]


def test_predict_many_tasks_never_waits_and_queues_them_on_the_bulk_lane(client, clean_redis):
    version = setup_project(client)
    tasks = [{"id": i, "data": {"image": f"http://example.invalid/{i}.png"}} for i in range(1, 6)]
    reply = client.post("/predict", json={"project": "3.1700000000", "tasks": tasks, "label_config": LABEL_CONFIG})
    assert reply.status_code == 200
    assert reply.json["results"] == [[]] * 5
    assert reply.json["model_version"] == version
    bulk = queued(clean_redis, "bulk")
    assert clean_redis.llen("interactive") == 0
    sent = [t["id"] for m in bulk for t in json.loads(base64.b64decode(m["body"]))[1]["tasks"]]
    assert sorted(sent) == [1, 2, 3, 4, 5]
    # Asked again while queued: not queued twice.
    client.post("/predict", json={"project": "3.1700000000", "tasks": tasks})
    assert len(queued(clean_redis, "bulk")) == len(bulk)


def test_predict_lone_task_uses_the_interactive_lane(client, clean_redis):
    setup_project(client)
    reply = client.post("/predict", json={"project": "3.1", "tasks": [{"id": 9, "data": {"image": "x"}}]})
    assert reply.json["results"] == [[]]
    (message,) = queued(clean_redis, "interactive")
    assert message["headers"]["task"] == "plankton.predict_tasks"
    assert json.loads(base64.b64decode(message["body"]))[1]["interactive"] is True
    assert clean_redis.llen("bulk") == 0


def test_predict_returns_stored_predictions_in_order_and_claims_them(client):
    live = setup_project(client)
    version = client.store.current_version(3)
    pred = {
        "result": [
            {
                "id": "a1",
                "from_name": "organism_type",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": ["Debris"]},
                "score": 0.8,
            }
        ],
        "score": 0.8,
        "model_version": version,
    }
    client.store.save_predictions(3, version, {2: pred, 3: {**pred, "result": []}})
    tasks = [{"id": 1}, {"id": 2}, {"id": 3}]
    reply = client.post("/predict", json={"project": "3.1", "tasks": tasks}).json
    assert reply["results"] == [[], {**pred, "model_version": live}, []] and reply["model_version"] == live
    assert client.store.delivery.claims(3, version, [2])[2][0] == "api"
    assert client.store.shown(3) == {2: shown_as(version, pred)}  # what Label Studio stores from the reply


def test_predict_hands_over_a_prediction_a_worker_is_writing_and_says_so(client):
    """A blank labelling screen is worse than a second copy, which the worker removes when its write ends."""
    setup_project(client)
    version = client.store.current_version(3)
    pred = {"result": [{"id": "x", "from_name": "t", "type": "choices", "value": {"choices": ["A"]}}],
            "score": 0.5, "model_version": version}  # fmt: skip
    client.store.save_predictions(3, version, {7: pred, 8: pred})
    assert client.store.delivery.claim(3, version, 7, "writing")
    assert client.store.delivery.claim(3, version, 8, "refused")
    reply = client.post("/predict", json={"project": "3.1", "tasks": [{"id": 7}, {"id": 8}]}).json["results"]
    assert reply[0]["result"] == pred["result"] and reply[1] == []
    assert client.store.delivery.claims(3, version, [7])[7][0] == "api"


def test_predict_for_an_open_task_hands_over_the_answer_of_a_version_published_while_it_waited(clean_redis):
    """Annotating during an import, a refit publishes a version every few seconds: the worker predicts the open
    task with the version current when it runs, newer than the one /predict began waiting with."""
    client, store = make_client(predict_wait_seconds=5.0)
    client.store = store
    live = setup_project(client)
    asked = store.current_version(3)
    newer = store.next_version(3)
    pred = {"result": [{"id": "x", "from_name": "organism_type", "to_name": "image", "type": "choices",
                        "value": {"choices": ["Debris"]}}], "score": 0.7, "model_version": newer}  # fmt: skip

    def worker() -> None:
        time.sleep(0.5)
        store.publish_version(3, newer, b"model", {"reason": "annotations"}, {})
        store.save_predictions(3, newer, {9: pred})

    thread = threading.Thread(target=worker)
    thread.start()
    started = time.monotonic()
    reply = client.post("/predict", json={"project": "3.1", "tasks": [{"id": 9, "data": {"image": "x"}}]}).json
    thread.join()
    assert reply["results"] == [{**pred, "model_version": live}]
    assert time.monotonic() - started < 2.5  # woken by the worker, not at the end of the wait
    assert store.current_version(3) == newer != asked
    assert store.delivery.claims(3, newer, [9])[9][0] == "api"
    assert store.shown(3) == {9: shown_as(newer, pred)}


@pytest.mark.parametrize(
    "body",
    [
        {"project": "3.1"},
        {"project": "3.1", "tasks": "nope"},
        {"project": "3.1", "tasks": [{"data": {}}]},
        {"project": "3.1", "tasks": [{"id": "1"}]},
        {"project": "3.1", "tasks": [{"id": 1, "data": "x"}]},
        {"tasks": [{"id": 1}]},
    ],
)
def test_predict_rejects_malformed_bodies(client, body):
    reply = client.post("/predict", json=body)
    assert reply.status_code == 400 and reply.json["error"]


def test_webhook_tasks_created_parks_a_big_import_for_one_fan_out_message(client, clean_redis):
    setup_project(client)
    tasks = [{"id": i, "data": {"image": f"/data/upload/3/{i}.png"}, "annotations": []} for i in range(1, 1001)]
    reply = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": tasks})
    assert reply.status_code == 200
    job = reply.json["job"]
    (message,) = queued(clean_redis, "control")
    assert message["headers"]["task"] == "plankton.fan_out"
    assert json.loads(base64.b64decode(message["body"]))[1]["job_id"] == job
    parked = client.store.jobs.parked_tasks(job)
    assert [t["id"] for t in parked] == list(range(1, 1001))
    assert all(set(t) == {"id", "data"} for t in parked)
    status = client.get(f"/jobs/{job}").json
    assert (status["state"], status["total"], status["done"], status["failed"]) == ("queued", 1000, 0, 0)
    # Label Studio sends a webhook once, but a proxy or a retry may deliver it twice: nothing is queued again.
    again = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": tasks})
    assert again.json["status"] == "already queued" and len(queued(clean_redis, "control")) == 1


def test_webhook_tasks_created_sends_a_small_import_as_one_chunk(client, clean_redis):
    setup_project(client)
    tasks = [{"id": i, "data": {"image": f"/data/upload/3/{i}.png"}} for i in range(1, 4)]
    job = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": tasks}).json["job"]
    (message,) = queued(clean_redis, "bulk")
    assert message["headers"]["task"] == "plankton.predict_tasks"
    assert message["headers"]["kwargsrepr"].startswith("{'project': 3, 'tasks': 3")
    body = json.loads(base64.b64decode(message["body"]))[1]
    assert body["job_id"] == job and [t["id"] for t in body["tasks"]] == [1, 2, 3]


def test_webhook_annotations_update_labels_and_schedule_a_refit(client, clean_redis):
    setup_project(client)
    choice = {"from_name": "organism_type", "to_name": "image", "type": "choices", "value": {"choices": ["Debris"]}}
    bad = {"from_name": "organism_type", "to_name": "image", "type": "choices", "value": {"choices": ["Whale"]}}
    ann = {"id": 11, "task": 5, "result": [choice, bad], "was_cancelled": False}
    reply = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": ann,
                                          "task": {"id": 5, "data": {"image": "x"}}})  # fmt: skip
    assert reply.status_code == 200
    assert client.store.labels(3) == {5: {"organism_type": ["Debris"]}}
    refits = [json.loads(base64.b64decode(m["body"]))[1] for m in queued(clean_redis, "control")]
    assert any(r.get("force") is False for r in refits)
    updated = {**ann, "result": [{**choice, "value": {"choices": ["Plankton"]}}]}
    client.post("/webhook", json={"action": "ANNOTATION_UPDATED", "project": {"id": 3}, "annotation": updated})
    assert client.store.labels(3) == {5: {"organism_type": ["Plankton"]}}
    cancelled = {"id": 12, "task": 6, "result": [choice], "was_cancelled": True}
    client.post("/webhook", json={"action": "ANNOTATIONS_CREATED", "project": {"id": 3}, "annotation": [cancelled]})
    assert 6 not in client.store.labels(3) and client.store.annotated_tasks(3) == {5}
    # A second annotation of task 5: the newest is its truth; deleting it brings the first one back.
    newer = {"id": 13, "task": 5, "result": [choice], "was_cancelled": False}
    client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": newer})
    assert client.store.labels(3) == {5: {"organism_type": ["Debris"]}}
    client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": 3}, "annotations": [{"id": 13}]})
    assert client.store.labels(3) == {5: {"organism_type": ["Plankton"]}}
    reply = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": 3},
                                          "annotations": [{"id": 11}]})  # fmt: skip
    assert client.store.labels(3) == {} and client.store.annotated_tasks(3) == set()
    assert reply.json["tasks"] == [5]
    # The task has no annotation any more: it needs a prediction of the current version now.
    sent = [m["headers"]["task"] for m in queued(clean_redis, "control")]
    assert "plankton.fill_gaps" in sent
    # The same event twice changes nothing the second time.
    again = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": 3},
                                          "annotations": [{"id": 11}]})  # fmt: skip
    assert again.json["tasks"] == []


def test_webhook_annotations_embed_the_tasks_without_features(client, clean_redis):
    """An annotated task whose import webhook was missed is embedded, once per task."""
    setup_project(client)
    client.store.save_embeddings(3, {7: b"\0" * 8}, {7: "x7"})
    choice = {"from_name": "organism_type", "to_name": "image", "type": "choices", "value": {"choices": ["Debris"]}}
    anns = [{"id": 20 + t, "task": t, "result": [choice], "was_cancelled": False} for t in (7, 8, 8)]
    tasks = [{"id": t, "data": {"image": f"x{t}"}} for t in (7, 8)]
    body = {"action": "ANNOTATIONS_CREATED", "project": {"id": 3}, "annotation": anns, "task": tasks}
    assert client.post("/webhook", json=body).status_code == 200
    sent = [json.loads(base64.b64decode(m["body"]))[1] for m in queued(clean_redis, "bulk")]
    embeds = [b for b in sent if "tasks" in b]
    assert [[t["id"] for t in b["tasks"]] for b in embeds] == [[8]]
    assert client.store.tasks(3, [8]) == [{"id": 8, "data": {"image": "x8"}}]


def test_start_training_train_and_sync_queue_a_sync_of_the_project(client, clean_redis):
    """Start training learns from everything Label Studio holds (lost webhooks too), then refits."""
    setup_project(client)
    reply = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 3}})
    assert reply.status_code == 200 and reply.json["job"]
    reply = client.post("/train", json={"project": 3})
    assert reply.status_code == 201
    reply = client.post("/sync", json={"project": 3})
    assert reply.status_code == 202 and client.get(f"/jobs/{reply.json['job']}").json["kind"] == "sync"
    assert client.post("/sync", json={"project": 3, "retrain": "yes"}).status_code == 400
    messages = queued(clean_redis, "bulk")
    assert {m["headers"]["task"] for m in messages} == {"plankton.sync"}
    retrain = [json.loads(base64.b64decode(m["body"]))[1]["retrain"] for m in messages]
    assert retrain == [False, True, True]  # the broker's list holds the newest first


def test_webhook_project_updated_picks_up_a_changed_config(client):
    setup_project(client)
    smaller = LABEL_CONFIG.replace('<Choice value="Debris"/>', "")
    reply = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 3, "label_config": smaller}})
    assert reply.json["status"] == "config updated"
    assert client.store.label_config(3) == smaller
    again = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 3, "label_config": smaller}})
    assert again.json["status"] == "unchanged"


def test_webhook_ignores_other_actions(client):
    reply = client.post("/webhook", json={"action": "PROJECT_CREATED", "project": {"id": 3}})
    assert reply.status_code == 200 and reply.json["status"] == "ignored"


@pytest.mark.parametrize(
    "body",
    [
        "{broken",
        "[]",
        json.dumps({"project": {"id": 3}}),
        json.dumps({"action": "TASKS_CREATED", "tasks": []}),
        json.dumps({"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": [{"id": "x"}]}),
        json.dumps({"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"task": 1}}),
        json.dumps({"action": "ANNOTATIONS_DELETED", "project": {"id": 3}, "annotations": [{"pk": 1}]}),
        json.dumps({"action": "PROJECT_UPDATED", "project": {"id": 3, "label_config": "<View"}}),
    ],
)
def test_webhook_malformed_bodies_get_a_json_400(client, body):
    setup_project(client)
    reply = client.post("/webhook", data=body, content_type="application/json")
    assert reply.status_code == 400
    assert reply.is_json and reply.json["error"]


def test_versions_and_jobs(client):
    first = setup_project(client)
    assert client.get("/versions").json["versions"] == [first]
    reply = client.get("/versions?project=3").json
    assert reply["versions"] == [first] and [v["version"] for v in reply["projects"]["3"]] == [
        client.store.current_version(3)
    ]
    assert client.get("/jobs/nope").status_code == 404
    assert client.get("/jobs/" + "a" * 32 + ":failed").status_code == 404
    assert client.get("/jobs/" + "a" * 32).status_code == 404


def test_basic_auth_protects_every_route_but_health(clean_redis):
    """/health and / stay open (compose's healthchecks, Label Studio's health call); /webhook with basic auth
    and no WEBHOOK_SECRET takes the basic auth only (README "Security")."""
    c, _ = make_client(basic_auth_user="ls", basic_auth_pass="secret")
    good = {"Authorization": "Basic " + base64.b64encode(b"ls:secret").decode()}
    wrong = {"Authorization": "Basic " + base64.b64encode(b"ls:nope").decode()}
    for path in ("/health", "/"):
        assert c.get(path).status_code == 200, path
    calls = [("post", "/setup", {"project": "3.1"}), ("post", "/predict", {"project": "3.1", "tasks": []}),
             ("get", "/versions", None), ("post", "/train", {"project": 3}), ("post", "/sync", {"project": 3}),
             ("get", "/jobs/x", None), ("get", "/projects", None), ("get", "/projects/3", None),
             ("get", "/metrics", None), ("get", "/openapi.json", None), ("get", "/ui/", None),
             ("post", "/webhook", {"action": "PROJECT_CREATED", "project": {"id": 3}})]  # fmt: skip
    for method, path, body in calls:
        assert getattr(c, method)(path, json=body).status_code == 401, path
        assert getattr(c, method)(path, json=body, headers=wrong).status_code == 401, path
        assert getattr(c, method)(path, json=body, headers=good).status_code != 401, path
    reply = c.post("/webhook", json={"action": "PROJECT_CREATED", "project": {"id": 3}}, headers=good)
    assert reply.status_code == 200


def test_webhook_secret_header(clean_redis):
    c, _ = make_client(webhook_secret="s3cret")
    body = {"action": "PROJECT_CREATED", "project": {"id": 3}}
    assert c.post("/webhook", json=body).status_code == 401
    assert c.post("/webhook", json=body, headers={"X-Webhook-Secret": "wrong"}).status_code == 401
    assert c.post("/webhook", json=body, headers={"X-Webhook-Secret": "s3cret"}).status_code == 200


def test_start_training_from_the_ml_connector_passes_with_basic_auth_instead_of_the_secret(clean_redis):
    """Label Studio's ML connector sends START_TRAINING with the backend's basic auth, without the webhook's
    custom headers."""
    c, _ = make_client(webhook_secret="s3cret", basic_auth_user="ls", basic_auth_pass="pw-12")
    c.post("/setup", json={"project": "3.1", "schema": LABEL_CONFIG},
           headers={"Authorization": "Basic " + base64.b64encode(b"ls:pw-12").decode()})  # fmt: skip
    body = {"action": "START_TRAINING", "project": {"id": 3}}
    assert c.post("/webhook", json=body).status_code == 401
    wrong = {"Authorization": "Basic " + base64.b64encode(b"ls:nope").decode()}
    assert c.post("/webhook", json=body, headers=wrong).status_code == 401
    good = {"Authorization": "Basic " + base64.b64encode(b"ls:pw-12").decode()}
    assert c.post("/webhook", json=body, headers=good).status_code == 200


def test_health_answers_when_redis_is_down():
    settings = dataclasses.replace(Settings.from_env(), redis_url="redis://127.0.0.1:1/0")
    reply = create_app(settings).test_client().get("/health")
    assert reply.status_code == 200 and reply.json["status"] == "UP"


def test_setup_reports_redis_down_as_json_503():
    settings = dataclasses.replace(Settings.from_env(), redis_url="redis://127.0.0.1:1/0")
    reply = create_app(settings).test_client().post("/setup", json={"project": "3.1"})
    assert reply.status_code == 503 and "Redis" in reply.json["error"]


def printed_by_a_fresh_interpreter(code: str) -> str:
    """What `code` prints in a new Python process (what a process imports can only be seen from a fresh one)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_the_api_never_imports_torch():
    code = (
        "import sys; from api.app import create_app; app = create_app(); "
        "app.test_client().get('/health'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'torchvision', 'sklearn', 'label_studio_sdk', 'worker')))"
    )
    assert printed_by_a_fresh_interpreter(code) == "[]"


def test_the_worker_main_process_loads_the_sdk_for_its_pool_and_never_torch():
    """Pool processes are forked from it: the SDK they write with comes loaded, instead of costing each one
    about half a CPU second on its first write, in the middle of an import. The model stays in the pool."""
    code = (
        "import sys, worker.worker_app; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'label_studio_sdk'}))"
    )
    assert printed_by_a_fresh_interpreter(code) == "['label_studio_sdk']"


def test_the_worker_main_process_freezes_its_objects_before_the_pool_forks():
    """Celery sends `worker_init` in the main process before it starts the pool."""
    code = (
        "import gc, worker.worker_app; from celery.signals import worker_init; "
        "before = gc.get_freeze_count(); worker_init.send(sender=None); print(before, gc.get_freeze_count() > 0)"
    )
    assert printed_by_a_fresh_interpreter(code) == "0 True"


def test_version_strings_are_not_substrings_of_each_other():
    versions = [version_string("efficientnet-lite0-64px", n, e) for n in (0, 1, 10, 100, 1000, 10000)
                for e in ("t4l2qk", "t4l2ql")]  # fmt: skip
    lives = [live_version_string("efficientnet-lite0-64px", e) for e in ("t4l2qk", "t4l2ql")]
    assert len(set(versions + lives)) == len(versions + lives)
    for a in versions + lives:
        assert not any(a != b and a in b for b in versions + lives)
        assert ours(a)
        assert (version_number(a) is not None) == (a in versions)
    assert not ours("plankton-ml-backend") and not ours("my-model-v0001-x") and not ours(lives[0] + "-copy")


def test_versions_are_never_reused_even_if_redis_loses_everything(client, clean_redis):
    first = setup_project(client)
    clean_redis.flushdb()
    clean_redis.set("plk:epoch", "zzzzzz")  # what a later start of an empty Redis makes: another clock reading
    assert setup_project(client) != first


def test_an_import_over_max_tasks_per_request_is_queued_up_to_it_and_the_rest_listed_by_a_sync(clean_redis):
    """Label Studio sends an import's tasks in one webhook, once: over the limit it is not refused (that
    would leave the import unpredicted until the next periodic sync). The first MAX_TASKS_PER_REQUEST are
    queued at once; a sync lists the others from Label Studio."""
    client, store = make_client(max_tasks_per_request=3, label_studio_url="http://127.0.0.1:1",
                                label_studio_api_key="key-1")  # fmt: skip
    client.store = store
    setup_project(client)
    tasks = [{"id": i, "data": {"image": f"/data/local-files/?d=p/{i}.png"}} for i in range(1, 6)]
    reply = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": tasks})
    assert reply.status_code == 200, reply.json
    assert (reply.json["status"], reply.json["tasks"], reply.json["over_limit"]) == ("queued", 3, 2)
    assert sorted(store.pending(3)) == [1, 2, 3]
    (message,) = [m for m in queued(clean_redis, "bulk") if m["headers"]["task"] == "plankton.sync"]
    kwargs = json.loads(base64.b64decode(message["body"]))[1]
    assert kwargs["asked"] and "2 tasks of an import over MAX_TASKS_PER_REQUEST" in kwargs["reason"]
    assert store.sync_asked(3) is not None


def test_a_project_refitting_often_gets_one_map_a_minute(client, clean_redis):
    """Each refit asks for the status page's map; while annotators work that is every few seconds."""
    dispatcher = client.application.extensions["dispatcher"]
    for _ in range(5):
        dispatcher.refresh_map_soon(3)
    maps = [m for m in queued(clean_redis, "bulk") if m["headers"]["task"] == "plankton.refresh_map"]
    assert len(maps) == 1 and maps[0]["headers"]["eta"]
    assert 0 < clean_redis.ttl("plk:p:3:map_scheduled") <= 60
