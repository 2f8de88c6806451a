"""Real parts for tests: a Celery worker in its own process, an HTTP image server, synthetic images."""

from __future__ import annotations

import http.server
import io
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def find_data_dir() -> Path:
    """The shared FlowCam data: `$PLANKTON_DATA_DIR`, else `../shared/data` beside the checkout, else the
    workplace's `/work/shared/data` (a clone made elsewhere, as CI may do)."""
    candidates = [os.environ.get("PLANKTON_DATA_DIR"), REPO.parent / "shared" / "data", "/work/shared/data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "label_config.xml").is_file():
            return Path(candidate).resolve()
    raise FileNotFoundError(f"no shared data (label_config.xml) in {[str(c) for c in candidates if c]}; "
                            "set PLANKTON_DATA_DIR")  # fmt: skip


DATA = find_data_dir()
LABEL_CONFIG = (DATA / "label_config.xml").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def procfile_command(name: str) -> list[str]:
    """The Procfile's command for that process, as arguments (run here with `python -m`, this Python's)."""
    for line in (REPO / "Procfile").read_text().splitlines():
        process, sep, command = line.partition(":")
        if sep and process.strip() == name and not line.startswith("#"):
            return shlex.split(command)
    raise KeyError(f"no {name!r} process in the Procfile")


class ChildProcess:
    """A service started in its own process group, so that stopping it stops its children too."""

    proc: subprocess.Popen[bytes] | None = None

    def kill(self) -> None:
        """SIGKILL the whole group (main process and pool): nothing gets to clean up."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


# Small settings for the processes the tests start, unless a test or the environment says otherwise. The
# processes read every option from these variables through the same configuration as production (the
# Procfile's commands; tests/test_settings.py checks that these are the same).
SMALL = {"WORKER_CONCURRENCY": "1", "LOG_LEVEL": "INFO"}


class WorkerProcess(ChildProcess):
    """`celery worker` as the Procfile starts it (options from the Celery configuration: queues interactive,
    control, then bulk, prefetch 1, WORKER_CONCURRENCY processes), named for the tests, without mingle and
    gossip."""

    def __init__(self, env: Mapping[str, str], log_path: Path, name: str = "w1") -> None:
        # Each worker counts its metrics into a folder of its own, set in its launch environment as `make run` and
        # Dockerfile.worker do (worker/metrics.py).
        metrics = {"PROMETHEUS_MULTIPROC_DIR": str(log_path.with_name(f"{log_path.stem}-metrics"))}
        self.env = {**SMALL, **os.environ, **metrics, **env, "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = self._spawn(log)
        wait_until(lambda: b" ready." in self.log_path.read_bytes() or self.proc.poll() is not None, timeout,
                   "the Celery worker to start")  # fmt: skip
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited:\n{self.log_tail()}")
        return self

    def _spawn(self, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", *procfile_command("worker"), "-n", f"{self.name}@%h",
             "--without-mingle", "--without-gossip"],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


class BeatProcess(WorkerProcess):
    """`celery beat`: the periodic reconciliation and checks (common/celery_app.py), as the Procfile starts it
    (from the Celery app alone: beat sends tasks by name and needs no worker code)."""

    def start(self, timeout: float = 60) -> BeatProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *procfile_command("beat")],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_until(lambda: b"beat: Starting" in self.log_path.read_bytes() or self.proc.poll() is not None, timeout,
                   "celery beat to start")  # fmt: skip
        if self.proc.poll() is not None:
            raise AssertionError(f"beat exited:\n{self.log_tail()}")
        return self


class _Handler(http.server.SimpleHTTPRequestHandler):
    routes: dict[str, Callable[[_Handler], None]] = {}

    def do_GET(self) -> None:  # noqa: N802
        route = self.routes.get(self.path.split("?")[0])
        if route:
            route(self)
        else:
            super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


class ImageServer:
    """Serves a folder over HTTP on loopback, plus special routes (slow, huge, ...)."""

    def __init__(self, root: Path) -> None:
        handler = type("Handler", (_Handler,), {"routes": {}})
        self.routes = handler.routes

        def make(*args: Any, **kwargs: Any) -> _Handler:
            return handler(*args, directory=str(root), **kwargs)

        # A listen backlog for hundreds of concurrent downloads (socketserver's default is 5: connections
        # beyond it stall for seconds in SYN retries, which a GPU benchmark's workers hit at once).
        server_class = type("Server", (http.server.ThreadingHTTPServer,), {"request_queue_size": 1024})
        self.httpd = server_class(("127.0.0.1", 0), make)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_particle(kind: str, seed: int, size: int = 28) -> np.ndarray:
    """Classes that differ visibly: bright round blobs, dark horizontal rods, noisy speckle."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.full((size, size, 3), 200, np.float32) + rng.normal(0, 6, (size, size, 3))
    c = size / 2 + rng.uniform(-2, 2, 2)
    if kind == "round":
        r = rng.uniform(size * 0.25, size * 0.38)
        mask = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < r**2
        img[mask] = [60, 140, 60]
    elif kind == "rod":
        half = rng.uniform(size * 0.3, size * 0.45)
        mask = (abs(yy - c[0]) < 2.5) & (abs(xx - c[1]) < half)
        img[mask] = [40, 30, 120]
    else:
        mask = rng.random((size, size)) < 0.35
        img[mask] = [110, 80, 50]
    return np.clip(img, 0, 255).astype(np.uint8)


class ApiProcess(ChildProcess):
    """The API under gunicorn as the Procfile starts it (gunicorn.conf.py), on a free loopback port (PORT and
    API_ADDRESS)."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.port = free_port()
        where = {"API_ADDRESS": "127.0.0.1", "PORT": str(self.port)}
        self.env = {**SMALL, **os.environ, **env, **where, "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> ApiProcess:
        import requests

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *procfile_command("api")],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"API exited:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                return requests.get(f"{self.url}/health", timeout=1).status_code in (200, 401)
            except requests.RequestException:
                return False

        wait_until(up, timeout, "the API to answer /health", interval=0.3)
        return self


class MeanColourEmbedder:
    """Stands in for the model where the pipeline around it is what is tested (its threads, its failures):
    a feature vector from the pixels' mean colour."""

    batch_size = 8
    resize_on_device = False

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        return np.stack([img.reshape(-1, 3).mean(axis=0) for img in images]).astype(np.float32)


class MemoryContentCache:
    """The content cache's two calls on a dict, for a pipeline tested without Redis."""

    def __init__(self) -> None:
        self.cache: dict[str, bytes] = {}

    def cached_embeddings(self, digests: list[str]) -> list[bytes | None]:
        return [self.cache.get(d) for d in digests]

    def cache_embeddings(self, blobs: dict[str, bytes]) -> None:
        self.cache.update(blobs)
