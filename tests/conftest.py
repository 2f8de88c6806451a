"""Shared fixtures: the real Redis on loopback (a database of its own), real Celery workers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before any project module reads its settings.
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
os.environ["REDIS_URL"] = TEST_REDIS_URL
os.environ.pop("LABEL_STUDIO_URL", None)
os.environ.pop("LABEL_STUDIO_API_KEY", None)

import redis  # noqa: E402

from tests.helpers import DATA, ImageServer, WorkerProcess  # noqa: E402


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(
            f"Redis is not answering at {TEST_REDIS_URL} ({exc}). Start it: "
            'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no'
        )
    return client


@pytest.fixture
def clean_redis(redis_client: redis.Redis) -> redis.Redis:
    redis_client.flushdb()
    return redis_client


@pytest.fixture(scope="session")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageServer]:
    """Serves ../shared/data (the real FlowCam images) at /data/... and test-made files at /tmp/..."""
    root = tmp_path_factory.mktemp("www")
    (root / "data").symlink_to(DATA)
    (root / "tmp").mkdir()
    server = ImageServer(root)
    server.root = root  # type: ignore[attr-defined]
    yield server
    server.close()


def worker_env(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "REDIS_URL": TEST_REDIS_URL,
        "MODEL_DIR": str(tmp / "models"),
        "LOG_LEVEL": "INFO",
        "CHUNK_SIZE": "8",
        "PREDICT_WAIT_SECONDS": "5",
        # The test image servers listen on loopback, which the outbound guard refuses unless listed.
        "IMAGE_HOSTS": "127.0.0.1,localhost",
        # Several workers run on this host at once: metrics only where a test asks for them.
        "WORKER_METRICS_PORT": "0",
        **extra,
    }


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator:
    started: list[WorkerProcess] = []

    def start(name: str = "w1", **env: str) -> WorkerProcess:
        w = WorkerProcess(worker_env(tmp_path, **env), tmp_path / f"worker-{name}-{len(started)}.log", name)
        started.append(w)
        return w.start()

    yield start
    for w in started:
        w.stop()
