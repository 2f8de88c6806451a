"""A bad-request corpus: requests to every route of the API, malformed, hostile or too big (bodies, project
ids, tasks, label configs, webhook bodies, credentials), against the real application and the real Redis.
Each gets a JSON 4xx with a clear reason (never a 5xx, never HTML), and a request about a project this
backend was never connected to stores nothing. With tests/test_bad_images.py (the images' corpus) this makes
the bad-input corpus of README "Security".

`python -m tests.test_bad_requests` prints what each kind returns.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest

from api.app import create_app
from common.label_config import MAX_CHOICES_TAGS, MAX_CONFIG_BYTES, MAX_LABELS_PER_TAG
from common.settings import Settings
from tests.helpers import LABEL_CONFIG, ApiProcess

KNOWN = 3  # connected through /setup before each kind
UNKNOWN = 777  # never connected
MAX_TASKS = 50
MAX_BYTES = 2 * 1024 * 1024
USER, PASSWORD, SECRET = "ls", "a-long-password", "a-long-webhook-secret"
GOOD_AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


def config_with(choices: str, tags: int = 1) -> str:
    tag = '<Choices name="t{i}" toName="image">' + choices + "</Choices>"
    return '<View><Image name="image" value="$image"/>' + "".join(tag.format(i=i) for i in range(tags)) + "</View>"


def task(i: int, **extra: Any) -> dict[str, Any]:
    return {"id": i, "data": {"image": f"https://example.org/{i}.png"}, **extra}


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def webhook(action: str, **body: Any) -> dict[str, Any]:
    return {"action": action, "project": {"id": KNOWN}, **body}


@dataclass(frozen=True)
class Kind:
    """One bad request: `json` (a body to encode) or `raw` (bytes as sent), and what must come back."""

    name: str
    method: str
    path: str
    status: int
    says: str  # in the JSON `error` (case-insensitive)
    json: Any = None
    raw: bytes | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    auth: bool = False  # the app with BASIC_AUTH_* and WEBHOOK_SECRET set
    basic_only: bool = False  # the app with BASIC_AUTH_* and no WEBHOOK_SECRET
    stores_nothing_for: int | None = None  # a project id no key may mention afterwards


KINDS: list[Kind] = [
    # -- any body ----------------------------------------------------------------------------------------
    Kind("not JSON", "POST", "/setup", 400, "must be JSON", raw=b"{broken"),
    Kind("empty body", "POST", "/predict", 400, "must be JSON", raw=b""),
    Kind("JSON array body", "POST", "/setup", 400, "JSON object", raw=b"[1, 2]"),
    Kind("JSON string body", "POST", "/webhook", 400, "JSON object", raw=b'"TASKS_CREATED"'),
    Kind("JSON sent as text/plain", "POST", "/setup", 400, "must be JSON",
         raw=json.dumps({"project": KNOWN}).encode(), content_type="text/plain"),
    Kind("invalid UTF-8 in JSON", "POST", "/setup", 400, "must be JSON", raw=b'{"project": "\xff\xfe"}'),
    Kind("JSON nested 100,000 deep", "POST", "/webhook", 400, "nested too deeply",
         raw=('{"action": "TASKS_CREATED", "tasks": ' + deep(100_000) + "}").encode()),
    Kind("JSON nested 995 deep (just past the parser)", "POST", "/predict", 400, "nested too deeply",
         raw=('{"project": 3, "tasks": ' + deep(995) + "}").encode()),
    Kind("task data nested 900 deep (parses, would fail the worker)", "POST", "/predict", 400, "deeper than",
         raw=('{"project": 3, "tasks": [{"id": 1, "data": {"image": "x", "d": ' + deep(900) + "}}]}").encode()),
    Kind("integer of 5,000 digits", "POST", "/setup", 400, "must be JSON",
         raw=('{"project": ' + "9" * 5000 + "}").encode()),
    Kind("NaN as project", "POST", "/sync", 400, "not float", raw=b'{"project": NaN}'),
    Kind("body over MAX_REQUEST_BYTES", "POST", "/webhook", 413, "MAX_REQUEST_BYTES",
         json=webhook("TASKS_CREATED", tasks=[task(1, pad="x" * MAX_BYTES)])),
    # -- project ids ---------------------------------------------------------------------------------------
    Kind("project missing", "POST", "/setup", 400, "project id missing", json={"schema": LABEL_CONFIG}),
    Kind("project not a number", "POST", "/setup", 400, "not a number", json={"project": "abc.1"}),
    Kind("project in unicode digits", "POST", "/setup", 400, "not a number",
         json={"project": "\uff11\uff12\uff13.1", "schema": LABEL_CONFIG}),
    Kind("project 0", "POST", "/train", 400, "out of range", json={"project": 0}),
    Kind("project negative", "POST", "/sync", 400, "not a number", json={"project": "-3.1"}),
    Kind("project 10^13", "POST", "/setup", 400, "out of range", json={"project": 10**13, "schema": LABEL_CONFIG}),
    Kind("project true", "POST", "/train", 400, "not bool", json={"project": True}),
    Kind("project 3.5 (a float)", "POST", "/setup", 400, "not float", json={"project": 3.5, "schema": LABEL_CONFIG}),
    Kind("project as a list", "POST", "/sync", 400, "not list", json={"project": [3]}),
    Kind("project object with a float id", "POST", "/webhook", 400, "not float",
         json={"action": "START_TRAINING", "project": {"id": 3.0}}),
    # -- /setup ---------------------------------------------------------------------------------------------
    Kind("unknown project without a schema", "POST", "/setup", 400, "required for project 777",
         json={"project": f"{UNKNOWN}.1"}, stores_nothing_for=UNKNOWN),
    Kind("schema that is not XML", "POST", "/setup", 400, "not valid XML",
         json={"project": f"{UNKNOWN}.1", "schema": "<View><Image"}, stores_nothing_for=UNKNOWN),
    Kind("schema without an Image tag", "POST", "/setup", 400, "no <Image",
         json={"project": f"{UNKNOWN}.1", "schema": "<View><Text name='t' value='$t'/></View>"},
         stores_nothing_for=UNKNOWN),
    Kind("schema that is a number", "POST", "/setup", 400, "XML text",
         json={"project": f"{UNKNOWN}.1", "schema": 5}, stores_nothing_for=UNKNOWN),
    Kind("schema with a lone surrogate", "POST", "/setup", 400, "not valid XML",
         raw=b'{"project": "777.1", "schema": "<View>\\ud800</View>"}', stores_nothing_for=UNKNOWN),
    Kind("schema with entities (billion laughs)", "POST", "/setup", 400, "DOCTYPE",
         json={"project": f"{UNKNOWN}.1", "schema": '<!DOCTYPE v [<!ENTITY a "aaaaaaaaaa">]><View a="&a;"/>'},
         stores_nothing_for=UNKNOWN),
    Kind("schema over 512 KiB", "POST", "/setup", 400, "bytes; at most",
         json={"project": f"{UNKNOWN}.1", "schema": config_with('<Choice value="a"/>') + " " * MAX_CONFIG_BYTES},
         stores_nothing_for=UNKNOWN),
    Kind("schema with 5,001 choices in a tag", "POST", "/setup", 400, f"at most {MAX_LABELS_PER_TAG}",
         json={"project": f"{UNKNOWN}.1",
               "schema": config_with("".join(f'<Choice value="c{i}"/>' for i in range(MAX_LABELS_PER_TAG + 1)))},
         stores_nothing_for=UNKNOWN),
    Kind("schema with 101 Choices tags", "POST", "/setup", 400, f"more than {MAX_CHOICES_TAGS}",
         json={"project": f"{UNKNOWN}.1", "schema": config_with('<Choice value="a"/>', MAX_CHOICES_TAGS + 1)},
         stores_nothing_for=UNKNOWN),
    Kind("schema with a 1,000-character choice", "POST", "/setup", 400, "characters; at most",
         json={"project": f"{UNKNOWN}.1", "schema": config_with(f'<Choice value="{"x" * 1000}"/>')},
         stores_nothing_for=UNKNOWN),
    Kind("extra_params that are not JSON", "POST", "/setup", 400, "extra_params is not JSON",
         json={"project": f"{UNKNOWN}.1", "schema": LABEL_CONFIG, "extra_params": "{nope"},
         stores_nothing_for=UNKNOWN),
    Kind("an unknown model_scope", "POST", "/setup", 400, "model_scope",
         json={"project": f"{KNOWN}.1", "extra_params": {"model_scope": "galaxy"}}),
    # -- /predict -------------------------------------------------------------------------------------------
    Kind("tasks missing", "POST", "/predict", 400, "'tasks' must be a list", json={"project": KNOWN}),
    Kind("tasks not a list", "POST", "/predict", 400, "'tasks' must be a list", json={"project": KNOWN, "tasks": {}}),
    Kind("task without id", "POST", "/predict", 400, "integer 'id'", json={"project": KNOWN, "tasks": [{"data": {}}]}),
    Kind("task id as text", "POST", "/predict", 400, "integer 'id'", json={"project": KNOWN, "tasks": [{"id": "1"}]}),
    Kind("task id true", "POST", "/predict", 400, "integer 'id'", json={"project": KNOWN, "tasks": [{"id": True}]}),
    Kind("task id negative", "POST", "/predict", 400, "positive task id",
         json={"project": KNOWN, "tasks": [{"id": -1}]}),
    Kind("task data not an object", "POST", "/predict", 400, "data must be an object",
         json={"project": KNOWN, "tasks": [{"id": 1, "data": "x.png"}]}),
    Kind("more tasks than MAX_TASKS_PER_REQUEST", "POST", "/predict", 413, "MAX_TASKS_PER_REQUEST",
         json={"project": KNOWN, "tasks": [task(i) for i in range(1, MAX_TASKS + 2)]}),
    Kind("predict for an unknown project", "POST", "/predict", 404, "unknown project 777",
         json={"project": f"{UNKNOWN}.1", "tasks": [task(1)], "label_config": LABEL_CONFIG},
         stores_nothing_for=UNKNOWN),
    Kind("label_config that is a number", "POST", "/predict", 400, "XML text",
         json={"project": KNOWN, "tasks": [task(1)], "label_config": 7}),
    Kind("label_config that is not XML", "POST", "/predict", 400, "label_config: label config is not valid XML",
         json={"project": KNOWN, "tasks": [task(1)], "label_config": "<View"}),
    Kind("tasks without a project", "POST", "/predict", 400, "'project' is missing", json={"tasks": [task(1)]}),
    # -- /webhook -------------------------------------------------------------------------------------------
    Kind("action missing", "POST", "/webhook", 400, "'action'", json={"project": {"id": KNOWN}}),
    Kind("action not a string", "POST", "/webhook", 400, "'action'", json={"action": 5, "project": {"id": KNOWN}}),
    Kind("handled action without a project", "POST", "/webhook", 400, "project id missing",
         json={"action": "TASKS_CREATED", "tasks": [task(1)]}),
    Kind("webhook for an unknown project", "POST", "/webhook", 404, "unknown project 777",
         json={"action": "TASKS_CREATED", "project": {"id": UNKNOWN, "label_config": LABEL_CONFIG},
               "tasks": [task(1)]}, stores_nothing_for=UNKNOWN),
    Kind("annotation for an unknown project", "POST", "/webhook", 404, "unknown project 777",
         json={"action": "ANNOTATION_CREATED", "project": {"id": UNKNOWN, "label_config": LABEL_CONFIG},
               "annotation": {"id": 1, "task": 1, "result": []}}, stores_nothing_for=UNKNOWN),
    Kind("START_TRAINING for an unknown project", "POST", "/webhook", 404, "unknown project 777",
         json={"action": "START_TRAINING", "project": {"id": UNKNOWN}}, stores_nothing_for=UNKNOWN),
    Kind("TASKS_CREATED with tasks not a list", "POST", "/webhook", 400, "'tasks' must be a list",
         json=webhook("TASKS_CREATED", tasks="1,2,3")),
    Kind("TASKS_CREATED over the limit, no LABEL_STUDIO_URL", "POST", "/webhook", 413, "MAX_TASKS_PER_REQUEST",
         json=webhook("TASKS_CREATED", tasks=[task(i) for i in range(1, MAX_TASKS + 2)])),
    Kind("TASKS_CREATED with a non-string label_config", "POST", "/webhook", 400, "label_config must be a string",
         json={"action": "TASKS_CREATED", "project": {"id": KNOWN, "label_config": {"xml": 1}},
               "tasks": [task(1)]}),
    Kind("TASKS_DELETED with text ids", "POST", "/webhook", 400, "integer 'id'",
         json=webhook("TASKS_DELETED", tasks=[{"id": "1"}])),
    Kind("annotation without an id", "POST", "/webhook", 400, "integer 'id'",
         json=webhook("ANNOTATION_CREATED", annotation={"task": 1, "result": []})),
    Kind("annotation that is a number", "POST", "/webhook", 400, "object or a list of objects",
         json=webhook("ANNOTATION_CREATED", annotation=5)),
    Kind("annotated task data nested 900 deep", "POST", "/webhook", 400, "nesting at most",
         raw=json.dumps(webhook("ANNOTATION_CREATED", annotation={"id": 1, "task": 1, "result": []}))
         .replace('"project"', '"task": {"id": 1, "data": {"d": ' + deep(900) + '}}, "project"').encode()),
    Kind("ANNOTATIONS_DELETED with bad ids", "POST", "/webhook", 400, "integer 'id'",
         json=webhook("ANNOTATIONS_DELETED", annotations=[{"pk": 1}])),
    Kind("PROJECT_UPDATED with a config that is not XML", "POST", "/webhook", 400, "not valid XML",
         json={"action": "PROJECT_UPDATED", "project": {"id": KNOWN, "label_config": "<View"}}),
    Kind("PROJECT_UPDATED with 5,001 choices", "POST", "/webhook", 400, f"at most {MAX_LABELS_PER_TAG}",
         json={"action": "PROJECT_UPDATED", "project": {"id": KNOWN, "label_config": config_with(
             "".join(f'<Choice value="c{i}"/>' for i in range(MAX_LABELS_PER_TAG + 1)))}}),
    # -- /train, /sync ----------------------------------------------------------------------------------------
    Kind("train an unknown project", "POST", "/train", 404, "unknown project 777", json={"project": UNKNOWN},
         stores_nothing_for=UNKNOWN),
    Kind("sync an unknown project", "POST", "/sync", 404, "unknown project 777", json={"project": UNKNOWN},
         stores_nothing_for=UNKNOWN),
    Kind("sync with retrain as text", "POST", "/sync", 400, "'retrain'", json={"project": KNOWN, "retrain": "yes"}),
    # -- reads --------------------------------------------------------------------------------------------------
    Kind("versions of a project that is not a number", "GET", "/versions?project=abc", 400, "not a number"),
    Kind("job id that is not hexadecimal", "GET", "/jobs/nope", 404, "32 hexadecimal digits"),
    Kind("job id with a ':' suffix", "GET", "/jobs/" + "a" * 32 + ":failed", 404, "32 hexadecimal digits"),
    Kind("job that does not exist", "GET", "/jobs/" + "a" * 32, 404, "no job"),
    Kind("project status of a non-number", "GET", "/projects/abc", 400, "not a number"),
    Kind("project status of an unknown project", "GET", f"/projects/{UNKNOWN}", 404, "no project 777",
         stores_nothing_for=UNKNOWN),
    Kind("map of an unknown project", "GET", f"/ui/projects/{UNKNOWN}/map.json", 404, "no map yet",
         stores_nothing_for=UNKNOWN),
    Kind("new map without a JSON body", "POST", f"/ui/projects/{KNOWN}/map", 400, "must be JSON", raw=b"",
         content_type="application/x-www-form-urlencoded"),
    Kind("new map of an unknown project", "POST", f"/ui/projects/{UNKNOWN}/map", 404, "no project 777", json={},
         stores_nothing_for=UNKNOWN),
    Kind("a path out of the static folder", "GET", "/ui/static/../../common/settings.py", 404, "not found"),
    Kind("a route that does not exist", "GET", "/admin", 404, "not found"),
    Kind("a method the route does not take", "GET", "/setup", 405, "method is not allowed"),
    Kind("DELETE on /webhook", "DELETE", "/webhook", 405, "method is not allowed"),
    # -- credentials ----------------------------------------------------------------------------------------
    Kind("no credentials", "GET", "/projects", 401, "authentication required", auth=True),
    Kind("wrong password", "POST", "/sync", 401, "authentication required", json={"project": KNOWN}, auth=True,
         headers={"Authorization": "Basic " + base64.b64encode(f"{USER}:nope".encode()).decode()}),
    Kind("basic auth that is not base64", "GET", "/metrics", 401, "authentication required", auth=True,
         headers={"Authorization": "Basic !!!not-base64!!!"}),
    Kind("a bearer token instead of basic auth", "GET", "/openapi.json", 401, "authentication required", auth=True,
         headers={"Authorization": f"Bearer {PASSWORD}"}),
    Kind("webhook without its secret", "POST", "/webhook", 401, "X-Webhook-Secret", auth=True,
         json=webhook("TASKS_DELETED", tasks=[{"id": 1}])),
    Kind("webhook with a wrong secret", "POST", "/webhook", 401, "X-Webhook-Secret", auth=True,
         json=webhook("TASKS_DELETED", tasks=[{"id": 1}]), headers={"X-Webhook-Secret": "guess"}),
    Kind("webhook without basic auth where no secret is set", "POST", "/webhook", 401, "set WEBHOOK_SECRET",
         basic_only=True, json=webhook("TASKS_DELETED", tasks=[{"id": 1}])),
]  # fmt: skip


def make_app(kind: Kind):
    auth: dict[str, Any] = {}
    if kind.auth or kind.basic_only:
        auth = {"basic_auth_user": USER, "basic_auth_pass": PASSWORD}
    if kind.auth:
        auth["webhook_secret"] = SECRET
    settings = dataclasses.replace(Settings.from_env(), predict_wait_seconds=0.0, max_tasks_per_request=MAX_TASKS,
                                   max_request_bytes=MAX_BYTES, **auth)  # fmt: skip
    return create_app(settings)


def send(client: Any, kind: Kind) -> Any:
    data = kind.raw if kind.raw is not None else json.dumps(kind.json).encode() if kind.json is not None else None
    return client.open(kind.path, method=kind.method, data=data, content_type=kind.content_type,
                       headers=kind.headers)  # fmt: skip


def project_keys(r: Any, pid: int) -> list[bytes]:
    mentioned = [k for k in r.scan_iter(f"plk:p:{pid}:*")]
    return mentioned + ([b"plk:projects"] if r.sismember("plk:projects", pid) else [])


@pytest.fixture
def connected(clean_redis):
    app = make_app(Kind("setup", "POST", "/setup", 200, ""))
    reply = app.test_client().post("/setup", json={"project": f"{KNOWN}.1", "schema": LABEL_CONFIG})
    assert reply.status_code == 200
    return clean_redis


def test_the_corpus_is_large():
    assert len(KINDS) >= 80
    assert len({k.name for k in KINDS}) == len(KINDS)


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_each_bad_request_gets_a_clear_json_4xx(kind: Kind, connected):
    reply = send(make_app(kind).test_client(), kind)
    assert reply.status_code == kind.status, (reply.status_code, reply.get_data()[:300])
    assert reply.is_json, reply.get_data()[:300]
    error = reply.json["error"]
    assert kind.says.lower() in error.lower(), error
    assert len(error) < 600
    if kind.stores_nothing_for is not None:
        assert project_keys(connected, kind.stores_nothing_for) == []


def test_the_connected_project_still_works_after_the_corpus(connected):
    """Nothing in the corpus broke the project Label Studio connected (each kind ran against its own app)."""
    client = make_app(Kind("x", "GET", "/", 200, "")).test_client()
    for kind in KINDS:
        if not (kind.auth or kind.basic_only):
            send(client, kind)
    assert client.post("/setup", json={"project": f"{KNOWN}.1"}).status_code == 200
    reply = client.post("/predict", json={"project": KNOWN, "tasks": [task(1), task(2)]})
    assert reply.status_code == 200 and reply.json["results"] == [[], []]
    assert project_keys(connected, UNKNOWN) == []


# -- over real HTTP: gunicorn in front of the same application ---------------------------------------------


def raw_http(port: int, request: bytes, timeout: float = 10) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received or len(received) < received.index(b"\r\n\r\n") + 4 + _length(received):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _length(received: bytes) -> int:
    head = received.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    for line in head.split("\r\n"):
        if line.startswith("content-length:"):
            return int(line.split(":", 1)[1])
    return 0


def test_over_http_a_body_too_big_is_refused_before_it_is_read(connected, tmp_path):
    """gunicorn + Flask: a Content-Length over MAX_REQUEST_BYTES is answered 413 (JSON) without the body
    being sent; a chunked body that grows past it is cut off with a 413 too."""
    api = ApiProcess({"MAX_REQUEST_BYTES": "100000", "API_WORKERS": "1"}, tmp_path / "api.log").start()
    try:
        head = b"Host: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
        status, body = raw_http(api.port, b"POST /webhook HTTP/1.1\r\n" + head + b"Content-Length: 500000000\r\n\r\n")
        assert status == 413 and b"MAX_REQUEST_BYTES" in body, body
        chunks = [b'{"project": "', *[b"9" * 65536] * 4, b'"}']
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"
        status, body = raw_http(api.port, b"POST /setup HTTP/1.1\r\n" + head + b"Transfer-Encoding: chunked\r\n\r\n"
                                + chunked)  # fmt: skip
        assert status == 413 and b"MAX_REQUEST_BYTES" in body, body
        status, body = raw_http(api.port, b"POST /setup HTTP/1.1\r\n" + head + b"Content-Length: 12\r\n\r\n"
                                + deep(6).encode())  # fmt: skip
        assert status == 400 and json.loads(body)["error"], body
    finally:
        api.stop()


def report(kinds: list[Kind] = KINDS) -> list[tuple[str, int, str]]:
    """(kind, status, error) for every kind, against a fresh project 3 in the test Redis database."""
    import redis

    from tests.conftest import TEST_REDIS_URL

    r = redis.Redis.from_url(TEST_REDIS_URL)
    r.flushdb()
    make_app(Kind("x", "GET", "/", 200, "")).test_client().post("/setup", json={"project": "3.1",
                                                                              "schema": LABEL_CONFIG})  # fmt: skip
    rows = []
    for kind in kinds:
        reply = send(make_app(kind).test_client(), kind)
        rows.append((kind.name, reply.status_code, (reply.json or {}).get("error", "") if reply.is_json else "HTML"))
    r.flushdb()
    return rows


if __name__ == "__main__":
    width = max(len(k.name) for k in KINDS)
    for name, status, error in report():
        print(f"{name:<{width}}  {status}  {error[:140]}", file=sys.stdout)
