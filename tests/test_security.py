"""Secure by default (README "Security"): nothing listens beyond loopback without its credentials, /health stays
open, /webhook takes the secret or the basic auth, and no log line or job error shows a secret. Real processes
where it matters: gunicorn, Flower, `make run`'s script, Celery beat, against a redis-server with a password."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from common.redact import install_log_redaction, redact, redact_url
from common.settings import Settings, SettingsError, is_loopback
from tests.helpers import LABEL_CONFIG, REPO, ApiProcess, BeatProcess, free_port, procfile_command, wait_until
from worker.label_studio import webhook_target

USER, PASSWORD, SECRET = "ls", "basic-pass-4711", "webhook-secret-4712"


def run(code: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BASIC_AUTH", "WEBHOOK", "FLOWER_", "API_"))}
    base.pop("ALLOW_UNAUTHENTICATED", None)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**base, **env}, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


# -- the start-up rule ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("::ffff:127.0.0.1", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("10.0.0.5", False), ("api", False),
     ("myhost.example.org", False)],
)  # fmt: skip
def test_what_counts_as_loopback(address: str, loopback: bool):
    assert is_loopback(address) is loopback


def test_a_name_is_loopback_only_as_it_resolves():
    """gunicorn resolves a host name through the system's resolver: `x.localhost` is loopback only where that
    resolver says so, and a name that does not resolve is not."""
    try:
        found = {info[4][0] for info in socket.getaddrinfo("x.localhost", None)}
    except socket.gaierror:
        found = set()
    assert is_loopback("x.localhost") is (bool(found) and found <= {"127.0.0.1", "::1"})
    assert is_loopback("nothing-here.invalid") is False
    assert is_loopback("") is False  # gunicorn's and tornado's spelling of every interface


def test_the_api_listens_on_loopback_by_default_and_needs_nothing_there():
    settings = Settings.from_env({})
    assert settings.api_address == "127.0.0.1" and settings.flower_address == "127.0.0.1"
    assert settings.api_exposure_problems() == [] and settings.flower_exposure_problems() == []


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({}, ["basic auth", "webhook secret"]),
        ({"BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD}, ["webhook secret"]),
        ({"WEBHOOK_SECRET": SECRET}, ["basic auth"]),
    ],
)
def test_beyond_loopback_the_api_needs_basic_auth_and_a_webhook_secret(env: dict, missing: list[str]):
    for address in ("0.0.0.0", "::", "192.168.1.20"):
        (problem,) = Settings.from_env({"API_ADDRESS": address, **env}).api_exposure_problems()
        assert f"API_ADDRESS={address}" in problem and "ALLOW_UNAUTHENTICATED=1" in problem
        assert all(what in problem for what in missing)
        assert "BASIC_AUTH_USER, BASIC_AUTH_PASS and WEBHOOK_SECRET" in problem  # what to do
    full = {"BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD, "WEBHOOK_SECRET": SECRET}
    assert Settings.from_env({"API_ADDRESS": "0.0.0.0", **full}).api_exposure_problems() == []
    assert Settings.from_env({"API_ADDRESS": "0.0.0.0", "ALLOW_UNAUTHENTICATED": "1"}).api_exposure_problems() == []


def test_beyond_loopback_flower_needs_its_basic_auth():
    (problem,) = Settings.from_env({"FLOWER_ADDRESS": "0.0.0.0"}).flower_exposure_problems()
    assert "FLOWER_BASIC_AUTH" in problem and "ALLOW_UNAUTHENTICATED=1" in problem
    with_auth = Settings.from_env({"FLOWER_ADDRESS": "0.0.0.0", "FLOWER_BASIC_AUTH": "a:pw-1"})
    assert with_auth.flower_exposure_problems() == []
    allowed = Settings.from_env({"FLOWER_ADDRESS": "0.0.0.0", "ALLOW_UNAUTHENTICATED": "yes"})
    assert allowed.flower_exposure_problems() == []


def test_gunicorn_refuses_to_start_beyond_loopback_without_credentials(tmp_path: Path):
    """The real `gunicorn -c gunicorn.conf.py` exits before it binds, saying what to set."""
    command = [sys.executable, "-m", *procfile_command("api")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BASIC_AUTH", "WEBHOOK"))}
    env.update(API_ADDRESS="0.0.0.0", PORT=str(free_port()), PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "the API will not start" in done.stderr and "API_ADDRESS=0.0.0.0" in done.stderr, done.stderr[-2000:]
    assert "WEBHOOK_SECRET" in done.stderr and "ALLOW_UNAUTHENTICATED=1" in done.stderr


def start_and_wait(command: list[str], env: dict[str, str], seconds: float = 20) -> tuple[int | None, str]:
    """Run `command` for at most `seconds`: its exit status (None: still running, then stopped) and output."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        code = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        code = None
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    return code, proc.stdout.read().decode(errors="replace") if proc.stdout else ""


@pytest.mark.parametrize(
    ("gunicorn_args", "env"),
    [({"GUNICORN_CMD_ARGS": "--bind 0.0.0.0:{port}"}, {}), ({}, {"API_ADDRESS": "127.0.0.1"}),
     ({"GUNICORN_CMD_ARGS": "--bind 127.0.0.1:{port} --bind [::]:{port}"}, {}),
     ({"GUNICORN_CMD_ARGS": "--bind nothing-here.invalid:{port}"}, {})],
)  # fmt: skip
def test_gunicorn_checks_the_addresses_it_finally_binds(gunicorn_args: dict, env: dict, tmp_path: Path):
    """GUNICORN_CMD_ARGS and the command line come after gunicorn.conf.py: the rule is applied to gunicorn's
    final bind list, before it binds."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BASIC_AUTH", "WEBHOOK", "API_", "GUNICORN"))}
    base.pop("ALLOW_UNAUTHENTICATED", None)
    base.update(PORT=str(port), PROMETHEUS_MULTIPROC_DIR=str(tmp_path), API_WORKERS="1", **env)
    base.update({k: v.format(port=port) for k, v in gunicorn_args.items()})
    code, output = start_and_wait([sys.executable, "-m", *procfile_command("api")], base)
    if not gunicorn_args:  # API_ADDRESS on loopback, nothing else: it runs
        assert code is None, output[-2000:]
        return
    assert code not in (None, 0), output[-2000:]
    assert "the API will not start" in output and "gunicorn's bind" in output and "Listening at" not in output


def test_flower_checks_the_address_of_its_command_line():
    """Flower reads its command line after scripts/flowerconfig.py: `--address=0.0.0.0` without basic auth
    is refused all the same, and with `--basic-auth` it runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_") and k != "ALLOW_UNAUTHENTICATED"}
    env.update(FLOWER_PORT=str(free_port()))
    command = [sys.executable, "-m", *procfile_command("flower"), "--address=0.0.0.0"]
    code, output = start_and_wait(command, env)
    assert code not in (None, 0) and "Flower will not start" in output, output[-2000:]
    code, output = start_and_wait([*command, "--basic-auth=ops:pass-1"], env, seconds=10)
    assert code is None and "Visit me at" in output, output[-2000:]


@pytest.mark.parametrize(
    ("env", "starts"),
    [
        ({"API_ADDRESS": "0.0.0.0"}, False),
        ({"API_ADDRESS": "0.0.0.0", "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD}, False),
        ({"API_ADDRESS": "0.0.0.0", "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD, "WEBHOOK_SECRET": SECRET},
         True),
        ({"API_ADDRESS": "0.0.0.0", "ALLOW_UNAUTHENTICATED": "1"}, True),
        ({"API_ADDRESS": "127.0.0.1"}, True),
    ],
)  # fmt: skip
def test_gunicorn_conf_applies_the_rule(env: dict, starts: bool, tmp_path: Path):
    code = "import runpy; print(runpy.run_path('gunicorn.conf.py')['bind'])"
    done = run(code, PROMETHEUS_MULTIPROC_DIR=str(tmp_path), **env)
    assert (done.returncode == 0) is starts, done.stderr[-2000:]


def test_worker_metrics_listen_on_loopback_only(start_worker):
    """The worker's metrics have no auth: by default they are served on 127.0.0.1 (WORKER_METRICS_ADDRESS),
    not on every interface, and still answer there."""
    port = free_port()
    worker = start_worker(WORKER_METRICS_PORT=str(port))
    listening = wait_until(lambda: [c.laddr for c in psutil.Process(worker.proc.pid).net_connections("tcp")
                                    if c.status == psutil.CONN_LISTEN and c.laddr.port == port], 30,
                           "the metrics server")  # fmt: skip
    assert [address.ip for address in listening] == ["127.0.0.1"], listening
    assert "plankton_refit_seconds_count" in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def test_a_worker_refuses_to_serve_metrics_beyond_loopback_without_allow_unauthenticated(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("ALLOW_UNAUTHENTICATED", "WORKER_METRICS_PORT")}
    env.update(WORKER_METRICS_ADDRESS="0.0.0.0", PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", *procfile_command("worker")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "WORKER_METRICS_ADDRESS=0.0.0.0" in done.stderr, done.stderr[-2000:]
    assert "ALLOW_UNAUTHENTICATED=1" in done.stderr and " ready." not in done.stdout + done.stderr
    allowed = Settings.from_env({"WORKER_METRICS_ADDRESS": "0.0.0.0", "ALLOW_UNAUTHENTICATED": "1"})
    assert allowed.worker_metrics_exposure_problems() == []
    assert Settings.from_env({"WORKER_METRICS_ADDRESS": "0.0.0.0", "WORKER_METRICS_PORT": "0"})


@pytest.mark.parametrize(
    ("env", "starts"),
    [
        ({"FLOWER_ADDRESS": "0.0.0.0"}, False),
        ({"FLOWER_ADDRESS": "0.0.0.0", "FLOWER_BASIC_AUTH": "ops:pw-1"}, True),
        ({"FLOWER_ADDRESS": "0.0.0.0", "ALLOW_UNAUTHENTICATED": "1"}, True),
        ({}, True),
    ],
)
def test_flower_conf_applies_the_rule(env: dict, starts: bool):
    done = run("import runpy; print(runpy.run_path('scripts/flowerconfig.py')['address'])", **env)
    assert (done.returncode == 0) is starts, done.stderr[-2000:]
    if not starts:
        assert "Flower will not start" in done.stderr and "FLOWER_BASIC_AUTH" in done.stderr


def test_flower_itself_refuses_to_start_beyond_loopback_without_auth():
    """The Procfile's `flower` line, for real: it exits at once with the reason."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env.update(FLOWER_ADDRESS="0.0.0.0", FLOWER_PORT=str(free_port()))
    done = subprocess.run([sys.executable, "-m", *procfile_command("flower")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0
    assert "Flower will not start" in done.stderr + done.stdout, (done.stdout + done.stderr)[-2000:]


def test_make_run_refuses_before_starting_anything():
    done = run("import runpy; runpy.run_path('scripts/run.py', run_name='__main__')", API_ADDRESS="0.0.0.0",
               REDIS_URL="redis://127.0.0.1:1/0")  # fmt: skip
    assert done.returncode == 2
    assert "not starting" in done.stderr and "API_ADDRESS=0.0.0.0" in done.stderr
    assert "redis-server" not in done.stderr  # nothing was started


def test_make_run_banner_says_how_to_expose_the_api():
    done = run("import runpy; from common.settings import Settings; "
               "print(runpy.run_path('scripts/run.py')['banner'](Settings.from_env()))")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "http://localhost:9090" in done.stdout and "cannot reach" in done.stdout
    assert "API_ADDRESS=0.0.0.0 BASIC_AUTH_USER=... BASIC_AUTH_PASS=... WEBHOOK_SECRET=..." in done.stdout


# -- who may call what ------------------------------------------------------------------------------------------


def basic(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def app_client(**auth: str):
    return create_app(dataclasses.replace(Settings.from_env(), **auth)).test_client()


def test_health_is_open_whatever_the_auth(clean_redis):
    client = app_client(basic_auth_user=USER, basic_auth_pass=PASSWORD, webhook_secret=SECRET)
    for path in ("/health", "/"):
        reply = client.get(path)
        assert reply.status_code == 200 and reply.json["status"] == "UP"
    for path in ("/metrics", "/projects", "/ui/", "/openapi.json", "/versions"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers=basic()).status_code == 200, path


@pytest.mark.parametrize(
    ("auth", "headers", "status"),
    [
        ({}, {}, 200),  # loopback, nothing set: open
        ({"webhook_secret": SECRET}, {}, 401),
        ({"webhook_secret": SECRET}, {"X-Webhook-Secret": SECRET}, 200),
        ({"webhook_secret": SECRET}, basic(), 401),  # no basic auth configured: no basic auth opens it
        ({"basic_auth_user": USER, "basic_auth_pass": PASSWORD}, {}, 401),  # basic auth only: it, not open
        ({"basic_auth_user": USER, "basic_auth_pass": PASSWORD}, basic(), 200),
        ({"basic_auth_user": USER, "basic_auth_pass": PASSWORD}, basic(password="nope"), 401),
        ({"basic_auth_user": USER, "basic_auth_pass": PASSWORD, "webhook_secret": SECRET}, {}, 401),
        ({"basic_auth_user": USER, "basic_auth_pass": PASSWORD, "webhook_secret": SECRET},
         {"X-Webhook-Secret": SECRET}, 200),  # Label Studio's webhooks
        ({"basic_auth_user": USER, "basic_auth_pass": PASSWORD, "webhook_secret": SECRET}, basic(), 200),  # training
        ({"basic_auth_user": USER, "basic_auth_pass": PASSWORD, "webhook_secret": SECRET},
         {"X-Webhook-Secret": "guess"}, 401),
    ],
)  # fmt: skip
def test_who_may_send_webhooks(auth: dict, headers: dict, status: int, clean_redis):
    reply = app_client(**auth).post("/webhook", json={"action": "PROJECT_CREATED", "project": {"id": 3}},
                                    headers=headers)  # fmt: skip
    assert reply.status_code == status and reply.is_json


MIB = 1024 * 1024


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes: what a parse cost, even once freed."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_a_refused_request_costs_the_api_none_of_its_body(tmp_path: Path, clean_redis):
    """A request without credentials is answered from its headers: a 100 MiB body (under MAX_REQUEST_BYTES
    here) sent to /webhook and /predict without them costs gunicorn's worker under 10 MiB of peak memory. The
    refused webhook's log line still names its action and project, from the body's first bytes."""
    env = {"API_WORKERS": "1", "API_THREADS": "2", "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD,
           "WEBHOOK_SECRET": SECRET, "MAX_REQUEST_BYTES": str(200 * MIB)}  # fmt: skip
    api = ApiProcess(env, tmp_path / "api.log").start()
    try:
        (worker,) = psutil.Process(api.proc.pid).children()
        small = {"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": []}
        assert requests.post(f"{api.url}/webhook", json=small, timeout=10).status_code == 401  # warmed up
        before = peak_rss(worker.pid)
        body = b'{"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": [], "pad": "' + b"x" * (100 * MIB) + b'"}'
        for path in ("/webhook", "/predict"):
            reply = requests.post(f"{api.url}{path}", data=body, headers={"Content-Type": "application/json"},
                                  timeout=120)  # fmt: skip
            assert reply.status_code == 401 and reply.json()["error"]
        grown = peak_rss(worker.pid) - before
        assert grown < 10 * MIB, f"a refused 100 MiB body cost the API {grown / MIB:.0f} MiB"
        assert requests.get(f"{api.url}/health", timeout=10).json()["status"] == "UP"
    finally:
        api.stop()
    assert "refused a webhook (TASKS_CREATED, project 3)" in (tmp_path / "api.log").read_text()


def test_the_default_body_limit_refuses_an_authenticated_flood_unread(tmp_path: Path, clean_redis):
    """MAX_REQUEST_BYTES (32 MiB) is three times Label Studio's webhooks for a 20,000-task import; 40 MiB of
    `{"id": 1}` items, which would parse into some 600 MiB, is refused from its Content-Length, unread."""
    env = {"API_WORKERS": "1", "API_THREADS": "2", "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD,
           "WEBHOOK_SECRET": SECRET}  # fmt: skip
    api = ApiProcess(env, tmp_path / "api.log").start()
    try:
        (worker,) = psutil.Process(api.proc.pid).children()
        assert requests.get(f"{api.url}/projects", headers=basic(), timeout=10).status_code == 200  # warmed up
        before = peak_rss(worker.pid)
        items = b",".join([b'{"id": 1}'] * (40 * MIB // 10))
        body = b'{"project": "3.1", "tasks": [' + items + b"]}"
        reply = requests.post(f"{api.url}/predict", data=body, timeout=120,
                              headers={"Content-Type": "application/json", **basic()})  # fmt: skip
        assert reply.status_code == 413 and "MAX_REQUEST_BYTES" in reply.json()["error"]
        grown = peak_rss(worker.pid) - before
        assert grown < 10 * MIB, f"a 40 MiB body over the limit cost the API {grown / MIB:.0f} MiB"
    finally:
        api.stop()


def test_unauthenticated_requests_cannot_add_metric_series(tmp_path: Path, clean_redis):
    """Every method a client invents counts as "other": 300 refused requests with random methods leave
    /metrics (gunicorn, multiprocess mode) with the label values it had, and its size."""
    env = {"API_WORKERS": "1", "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD, "WEBHOOK_SECRET": SECRET}
    api = ApiProcess(env, tmp_path / "api.log").start()
    try:
        with requests.Session() as session:
            for _ in range(3):
                session.request("BREW", f"{api.url}/setup", timeout=10)
            before = session.get(f"{api.url}/metrics", headers=basic(), timeout=10).text
            invented = [f"M{secrets.token_hex(4).upper()}" for _ in range(300)]
            statuses = {session.request(method, f"{api.url}/setup", timeout=10).status_code for method in invented}
            after = session.get(f"{api.url}/metrics", headers=basic(), timeout=10).text
    finally:
        api.stop()
    assert statuses <= {401, 405}, statuses
    methods = {s.labels["method"] for f in text_string_to_metric_families(after) for s in f.samples
               if "method" in s.labels}  # fmt: skip
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, methods
    assert "other" in methods and not any(m in after for m in invented)
    assert len(after) < len(before) + 2000, (len(before), len(after))


def test_unknown_projects_create_no_state(clean_redis):
    """Only /setup (as Label Studio calls it, with the label config) makes a project known; every other call
    about a project it never connected is a 404 that stores nothing."""
    client = app_client()
    calls = [("/predict", {"project": "9.1", "tasks": [{"id": 1, "data": {"image": "x"}}],
                           "label_config": LABEL_CONFIG}),
             ("/webhook", {"action": "TASKS_CREATED", "project": {"id": 9, "label_config": LABEL_CONFIG},
                           "tasks": [{"id": 1, "data": {"image": "x"}}]}),
             ("/webhook", {"action": "PROJECT_UPDATED", "project": {"id": 9, "label_config": LABEL_CONFIG}}),
             ("/webhook", {"action": "TASKS_DELETED", "project": {"id": 9}, "tasks": [{"id": 1}]}),
             ("/train", {"project": 9}), ("/sync", {"project": 9})]  # fmt: skip
    for path, body in calls:
        reply = client.post(path, json=body)
        assert reply.status_code == 404 and "unknown project 9" in reply.json["error"], (path, reply.json)
    assert client.post("/setup", json={"project": "9.1"}).status_code == 400
    assert clean_redis.keys("plk:p:9:*") == [] and not clean_redis.sismember("plk:projects", 9)
    # Label Studio connecting the project: from then on, everything works.
    assert client.post("/setup", json={"project": "9.1", "schema": LABEL_CONFIG}).status_code == 200
    for path, body in calls:
        assert client.post(path, json=body).status_code in (200, 201, 202), path


@pytest.mark.parametrize(
    ("hook", "ours"),
    [("http://api:9090/webhook", True), ("http://API:9090//webhook/", True), ("http://api:9090/webhook?x=1", True),
     ("http://api:9091/webhook", False), ("https://api:9090/webhook", False), ("http://api2:9090/webhook", False),
     ("http://api:9090/other/webhook", False), ("http://evil:9090\\@api:9090/webhook", False),
     ("http://api:9090\\@evil:9090/webhook", False), ("http://u:p@api:9090/webhook", False), ("", False)],
)  # fmt: skip
def test_which_webhook_is_this_deployments(hook: str, ours: bool):
    """Decided from BACKEND_URL (http://api:9090 here) and the webhook's own URL, read as a client connects:
    never from what a server answers."""
    assert (webhook_target(hook) == webhook_target("http://api:9090/webhook")) is ours


# -- secrets out of logs and job errors --------------------------------------------------------------------


def test_redact():
    secrets = {"my-api-key-0123"}
    assert redact("token my-api-key-0123 refused", secrets) == "token *** refused"
    assert redact_url("redis://:p%40ss@redis:6379/0") == "redis://***@redis:6379/0"
    assert redact("GET /predict?token=abc&project=3 HTTP/1.1") == "GET /predict?token=***&project=3 HTTP/1.1"
    sdk = (
        "headers: {'content-type': 'application/json', 'set-cookie': 'sessionid=abc; Path=/'}, status_code: 401,"
        " body: {'detail': 'Invalid token.'}"
    )  # what label_studio_sdk's ApiError prints
    assert "sessionid" not in redact(sdk) and "status_code: 401" in redact(sdk)
    assert redact("Authorization: Token 0123456789") == "Authorization: ***"
    assert redact('{"X-Webhook-Secret": "abc"}') == '{"X-Webhook-Secret": "***"}'
    shown = redact("https://b.s3.amazonaws.com/a.png?X-Amz-Signature=dead&X-Amz-Credential=AKIA")
    assert "dead" not in shown and "AKIA" not in shown
    assert redact("http://ls/data/local-files/?d=flowcam/a.png") == "http://ls/data/local-files/?d=flowcam/a.png"


def test_the_deployments_secrets():
    settings = Settings.from_env({"LABEL_STUDIO_API_KEY": "lskey-1", "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "bp-2",
                                  "WEBHOOK_SECRET": "ws-3", "FLOWER_BASIC_AUTH": "a:fp-4,b:fp-5",
                                  "REDIS_URL": "redis://:rp%2F6@redis:6379/0"})  # fmt: skip
    found = settings.deployment_secrets({"AWS_SECRET_ACCESS_KEY": "aws-7"})
    assert {"lskey-1", "bp-2", "ws-3", "fp-4", "fp-5", "rp%2F6", "rp/6", "aws-7"} <= found
    assert "u" not in found


@pytest.mark.parametrize(
    ("name", "short", "enough"),
    [("BASIC_AUTH_PASS", "pw1", "pw-1"), ("WEBHOOK_SECRET", "ab", "ab-1"), ("LABEL_STUDIO_API_KEY", "k", "k-12"),
     ("FLOWER_BASIC_AUTH", "ops:long-one,adm:xyz", "ops:long-one,adm:xyz1"),
     ("REDIS_URL", "redis://:pw@redis:6379/0", "redis://:pw-1@redis:6379/0")],
)  # fmt: skip
def test_a_secret_too_short_to_redact_stops_start_up(name: str, short: str, enough: str):
    """A secret under four characters would never be masked in a log line (it would mask ordinary words): the
    settings refuse it, naming the variable and never showing the value."""
    user = {"BASIC_AUTH_USER": "u"} if name == "BASIC_AUTH_PASS" else {}
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({**user, name: short})
    (problem,) = caught.value.problems
    assert problem.startswith(name) and "at least 4 characters" in problem
    assert not any(value in problem for value in ("pw1", ":ab", "xyz", ":pw@"))
    Settings.from_env({**user, name: enough})


def test_every_log_record_is_redacted(caplog):
    settings = Settings.from_env(
        {"LABEL_STUDIO_API_KEY": "lskey-secret-1", "REDIS_URL": "redis://:redis-pw-2@r:6379/0"}
    )
    install_log_redaction(settings)
    log = logging.getLogger("tests.security")
    with caplog.at_level(logging.INFO):
        log.info("connecting to %s with %s", settings.redis_url, {"Authorization": "Token lskey-secret-1"})
        try:
            raise RuntimeError("Label Studio refused lskey-secret-1")
        except RuntimeError:
            log.exception("sync failed")
    text = caplog.text + "".join(logging.Formatter().format(r) for r in caplog.records)
    assert "lskey-secret-1" not in text and "redis-pw-2" not in text, text
    assert "redis://***@r:6379/0" in text and "sync failed" in text and "RuntimeError" in text
    install_log_redaction(Settings.from_env())


def test_job_errors_are_shown_without_secrets(clean_redis):
    settings = dataclasses.replace(Settings.from_env(), label_studio_api_key="lskey-secret-3")
    app = create_app(settings)
    store = app.extensions["store"]
    job = store.jobs.create("sync", 3, 1)
    store.jobs.progress(job, errors={3: "ApiError: headers: {'set-cookie': 'sessionid=s9'}, status_code: 401, body: "
                                        "{'detail': 'key lskey-secret-3 is invalid'}"})  # fmt: skip
    error = app.test_client().get(f"/jobs/{job}").json["errors"][0]["error"]
    assert "lskey-secret-3" not in error and "sessionid" not in error and "status_code: 401" in error
    install_log_redaction(Settings.from_env())


@pytest.fixture
def redis_with_password(tmp_path: Path):
    port, password = free_port(), "redis-pass-0815"
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--requirepass", password], stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        wait_until(lambda: subprocess.run(["redis-cli", "-p", str(port), "--no-auth-warning", "-a", password, "ping"],
                                          capture_output=True).returncode == 0, 10, "redis-server")  # fmt: skip
        yield url, password
    finally:
        proc.terminate()
        proc.wait(10)


def test_processes_never_log_the_redis_password_or_query_tokens(redis_with_password, tmp_path: Path):
    """The API (gunicorn, access log included) and Celery beat against a Redis with a password: no log line
    shows the password, or a token a client put in a query string."""
    url, password = redis_with_password
    env = {"REDIS_URL": url, "LOG_LEVEL": "DEBUG", "API_WORKERS": "1", "LABEL_STUDIO_API_KEY": "lskey-secret-9"}
    api = ApiProcess(env, tmp_path / "api.log").start()
    beat = BeatProcess(env, tmp_path / "beat.log")
    try:
        beat.start()
        requests.get(f"{api.url}/health?token=query-token-77&project=3", timeout=10)
        requests.post(f"{api.url}/setup", json={"project": "3.1", "schema": LABEL_CONFIG}, timeout=10)
        time.sleep(1.0)
    finally:
        beat.stop()
        api.stop()
    for name in ("api.log", "beat.log"):
        text = (tmp_path / name).read_text(errors="replace")
        assert password not in text and "lskey-secret-9" not in text and "query-token-77" not in text, name
    assert "token=***" in (tmp_path / "api.log").read_text()
    assert "beat: Starting" in (tmp_path / "beat.log").read_text()


def test_openapi_document_is_served_and_lists_the_secure_routes(clean_redis):
    client = app_client(basic_auth_user=USER, basic_auth_pass=PASSWORD, webhook_secret=SECRET)
    doc = client.get("/openapi.json", headers=basic()).json
    assert doc["paths"]["/health"]["get"]["security"] == []
    assert doc["paths"]["/webhook"]["post"]["security"] == [{"webhookSecret": []}, {"basicAuth": []}]
    assert json.dumps(doc).count('"basicAuth"') > 10
