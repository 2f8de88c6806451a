"""Run a real Label Studio for end-to-end tests and talk to its REST API.

Label Studio is installed into its own virtualenv (it pins many dependencies that must not touch the
project's ``.venv``) by :func:`ensure_label_studio_venv`, started on loopback by :class:`LabelStudioServer`
and driven through :class:`LabelStudioClient` (plain ``requests``, no SDK needed in the test process).

Facts measured against Label Studio 1.23.2 (community edition, sqlite):

* The fixed ``LABEL_STUDIO_USER_TOKEN`` becomes the user's *legacy* token. It only authenticates when legacy
  tokens are enabled for the organisation (``--enable-legacy-api-token`` /
  ``LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true`` at first start, when the organisation is created). It then
  works as ``Authorization: Token <key>`` for the REST API, for ``/data/local-files/?d=...`` downloads and as
  ``api_key`` for label-studio-sdk 2.x ``LabelStudio(base_url=..., api_key=...)``.
* Adding an ML backend (``POST /api/ml``) makes Label Studio itself create a webhook ``<backend>/webhook``
  for the project (``send_payload=true``, all actions), unless ``SSRF_PROTECTION_ENABLED`` blocks loopback.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

LABEL_STUDIO_VERSION = "1.23.2"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_ROOT / ".venv-label-studio"
# Every package of that venv, exact versions and hashes (`make lock` remakes it from label-studio.in).
LABEL_STUDIO_LOCK = REPO_ROOT / "requirements" / "label-studio.txt"
DEFAULT_USERNAME = "e2e@example.com"
DEFAULT_PASSWORD = "e2e-password-123"
# Every webhook action Label Studio 1.23 knows (used when the ML webhook must be created by hand).
WEBHOOK_ACTIONS = (
    "PROJECT_CREATED",
    "PROJECT_UPDATED",
    "PROJECT_DELETED",
    "TASKS_CREATED",
    "TASKS_DELETED",
    "ANNOTATION_CREATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_DELETED",
    "LABEL_LINK_CREATED",
    "LABEL_LINK_UPDATED",
    "LABEL_LINK_DELETED",
    "REVIEW_CREATED",
    "REVIEW_UPDATED",
    "REVIEWS_DELETED",
)


class LabelStudioError(RuntimeError):
    """Label Studio could not be installed or started, or an API call failed."""


def _log(message: str) -> None:
    print(f"[label-studio e2e] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def default_venv_path() -> Path:
    """``$LABEL_STUDIO_VENV`` or ``<repo>/.venv-label-studio`` (gitignored)."""
    return Path(os.environ.get("LABEL_STUDIO_VENV") or DEFAULT_VENV)


def ensure_label_studio_venv(path: str | os.PathLike[str] | None = None) -> Path:
    """Return a virtualenv holding Label Studio exactly as ``requirements/label-studio.txt`` locks it.

    The venv records the digest of the lock it was installed from; a venv made from another lock (or before
    there was one) is brought to this one, and a creation cut short (no ``bin/pip``) is made again. The first
    install takes minutes; pip's output goes to stderr. A lock file in the virtualenv's folder keeps two
    processes from installing at once. Raises :class:`LabelStudioError` on failure.
    """
    venv = Path(path) if path is not None else default_venv_path()
    venv = venv.absolute()
    executable = venv / "bin" / "label-studio"
    installed_from = venv / ".installed-lock-sha256"
    wanted = hashlib.sha256(LABEL_STUDIO_LOCK.read_bytes()).hexdigest()

    def current() -> bool:
        return executable.exists() and installed_from.exists() and installed_from.read_text().strip() == wanted

    if current():
        return venv
    # Beside the venv, not in it: `venv --clear` empties the folder. `.venv-label-studio.install-lock` is gitignored.
    with _file_lock(venv.with_name(venv.name + ".install-lock")):
        if current():  # another process installed it while we waited
            return venv
        started = time.monotonic()
        python = venv / "bin" / "python"
        if not (venv / "bin" / "pip").exists():
            _log(f"creating virtualenv {venv}")
            _run_checked([_base_python(), "-m", "venv", "--clear", str(venv)])
        _log(f"installing label-studio=={LABEL_STUDIO_VERSION} from {LABEL_STUDIO_LOCK.name} (minutes the first time)")
        _run_checked(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--require-hashes",
             "-r", str(LABEL_STUDIO_LOCK)]
        )  # fmt: skip
        if not executable.exists():
            raise LabelStudioError(f"pip finished but {executable} does not exist")
        installed_from.write_text(wanted + "\n")
        _log(f"label-studio installed in {time.monotonic() - started:.0f} s")
    return venv


def _base_python() -> str:
    """An interpreter to create the virtualenv with (the one running the tests is fine, venv or not)."""
    return sys.executable or shutil.which("python3") or "python3"


def _run_checked(command: list[str]) -> None:
    # stdout to our stderr so pytest's capture shows progress with -s and keeps it on failure otherwise.
    result = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, check=False)
    if result.returncode != 0:
        raise LabelStudioError(f"command failed with exit code {result.returncode}: {' '.join(command)}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LabelStudioClient:
    """Thin helpers over Label Studio's REST API, authenticated with ``Authorization: Token <api_key>``."""

    def __init__(self, url: str, api_key: str, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {api_key}"

    # -- plumbing ---------------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, expect: tuple[int, ...] = (200, 201), **kwargs: Any) -> Any:
        """Call ``path`` (relative to the server URL), check the status, return the decoded JSON (or None)."""
        kwargs.setdefault("timeout", self.timeout)
        response = self.session.request(method, self.url + path, **kwargs)
        if response.status_code not in expect:
            raise LabelStudioError(f"{method} {path} -> HTTP {response.status_code}: {response.text[:2000]}")
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, payload: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, json=payload, **kwargs)

    def download(self, url: str) -> bytes:
        """Fetch a Label Studio data URL such as ``/data/local-files/?d=flowcam/crops/x.tif`` with the token."""
        full = url if url.startswith(("http://", "https://")) else self.url + url
        response = self.session.get(full, timeout=self.timeout)
        if response.status_code != 200:
            raise LabelStudioError(f"GET {url} -> HTTP {response.status_code}: {response.text[:500]}")
        return response.content

    # -- projects ---------------------------------------------------------------------------------------
    def create_project(self, title: str, label_config: str, **extra: Any) -> int:
        """``POST /api/projects``; returns the project id."""
        project = self.post("/api/projects", {"title": title, "label_config": label_config, **extra})
        return int(project["id"])

    def get_project(self, project_id: int) -> dict[str, Any]:
        """``GET /api/projects/{id}`` (holds ``model_version``, ``label_config``, counters...)."""
        return dict(self.get(f"/api/projects/{project_id}"))

    def update_project(self, project_id: int, **fields: Any) -> dict[str, Any]:
        """``PATCH /api/projects/{id}`` (e.g. ``model_version=...`` or ``label_config=...``)."""
        return dict(self.request("PATCH", f"/api/projects/{project_id}", json=fields))

    def add_local_storage(self, project_id: int, path: str | os.PathLike[str], title: str = "local files") -> int:
        """``POST /api/storages/localfiles`` (not synced): lets the project serve ``/data/local-files/`` under ``path``.

        Label Studio 1.23 answers 404 to ``/data/local-files/?d=...`` unless a Local Files storage of a
        project the user can see has a path that contains the file. ``path`` must be absolute and a strict
        subdirectory of ``LOCAL_FILES_DOCUMENT_ROOT`` (the root itself is refused).
        """
        payload = {"project": project_id, "path": str(path), "title": title, "use_blob_urls": True}
        return int(self.post("/api/storages/localfiles", payload)["id"])

    def list_local_storages(self, project_id: int) -> list[dict[str, Any]]:
        """``GET /api/storages/localfiles?project=..``."""
        return list(self.get("/api/storages/localfiles", params={"project": project_id}))

    # -- ML backend and webhooks ------------------------------------------------------------------------
    def connect_ml_backend(self, project_id: int, url: str, title: str = "plankton-ml-backend", **extra: Any) -> int:
        """Add the ML backend at ``url`` to the project (``POST /api/ml``); returns the ML backend id.

        Label Studio calls ``GET <url>/health`` and ``POST <url>/setup`` while handling this request and
        answers 400 if they fail. Label Studio 1.23.2 then creates the webhook ``<url>/webhook`` for the
        project by itself (``send_payload=true``, ``send_for_all_actions=true``): that is what happened in
        every measured run. If it ever is missing (e.g. ``SSRF_PROTECTION_ENABLED`` on, or a future version
        stops doing it), this helper creates it explicitly with ``POST /api/webhooks`` and logs that it did.
        """
        backend = self.post(
            "/api/ml", {"url": url, "project": project_id, "title": title, "is_interactive": False, **extra}
        )
        webhook_url = url.rstrip("/") + "/webhook"
        if self.find_webhook(project_id, webhook_url) is None:
            _log(f"Label Studio did not create {webhook_url}: creating it explicitly")
            self.create_webhook(project_id, webhook_url)
        return int(backend["id"])

    def get_ml_backend(self, ml_backend_id: int) -> dict[str, Any]:
        """``GET /api/ml/{id}`` (note: Label Studio calls the backend's /health and /setup on every read)."""
        return dict(self.get(f"/api/ml/{ml_backend_id}"))

    def list_webhooks(self, project_id: int) -> list[dict[str, Any]]:
        """``GET /api/webhooks?project=..``."""
        return list(self.get("/api/webhooks", params={"project": project_id}))

    def find_webhook(self, project_id: int, webhook_url: str) -> dict[str, Any] | None:
        for hook in self.list_webhooks(project_id):
            if hook.get("url") == webhook_url and hook.get("project") == project_id:
                return hook
        return None

    def create_webhook(
        self, project_id: int, url: str, headers: dict[str, str] | None = None, actions: tuple[str, ...] = ()
    ) -> int:
        """``POST /api/webhooks`` with ``send_payload=true``; all actions unless ``actions`` is given."""
        payload: dict[str, Any] = {
            "project": project_id,
            "url": url,
            "send_payload": True,
            "send_for_all_actions": not actions,
            "actions": list(actions),
            "headers": headers or {},
            "is_active": True,
        }
        return int(self.post("/api/webhooks", payload)["id"])

    def add_webhook_header(self, project_id: int, webhook_url: str, name: str, value: str) -> dict[str, Any]:
        """Make the project's webhook ``webhook_url`` send the extra header ``name: value`` (e.g. a secret).

        Webhooks carry only the headers configured on them (no basic auth), so a secret header is how the
        backend can protect ``/webhook``. ``START_TRAINING`` is not a webhook: Label Studio posts it to
        ``/webhook`` itself, without these headers (measured on 1.23.2).
        """
        hook = self.find_webhook(project_id, webhook_url)
        if hook is None:
            raise LabelStudioError(f"project {project_id} has no webhook {webhook_url}")
        headers = dict(hook.get("headers") or {})
        headers[name] = value
        return dict(self.request("PATCH", f"/api/webhooks/{hook['id']}", json={"headers": headers}))

    def start_training(self, ml_backend_id: int) -> Any:
        """``POST /api/ml/{id}/train`` ("Start training"): 1.23 posts ``START_TRAINING`` to ``<backend>/webhook``."""
        return self.post(f"/api/ml/{ml_backend_id}/train", {})

    # -- tasks, annotations, predictions ----------------------------------------------------------------
    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> list[int]:
        """``POST /api/projects/{id}/import?return_task_ids=true``; returns the created task ids in order.

        ``tasks`` are task data dicts (``{"image": "/data/local-files/?d=flowcam/crops/x.tif"}``) or full
        tasks (``{"data": {...}, "predictions": [...]}``). The import emits ``TASKS_CREATED`` synchronously.
        """
        reply = self.post(f"/api/projects/{project_id}/import", tasks, params={"return_task_ids": "true"})
        ids = [int(i) for i in reply.get("task_ids", [])]
        if len(ids) != len(tasks):
            raise LabelStudioError(f"imported {len(tasks)} tasks but Label Studio returned ids {ids}: {reply}")
        return ids

    def get_task(self, task_id: int) -> dict[str, Any]:
        """``GET /api/tasks/{id}``: like opening the task, it makes Label Studio call the backend's
        /health, /setup and /predict (one task) first if the task has no prediction at all."""
        return dict(self.get(f"/api/tasks/{task_id}"))

    def list_tasks(self, project_id: int, page_size: int = 100) -> list[dict[str, Any]]:
        """All tasks of the project with their ``predictions`` and ``annotations`` (``fields=all``, paged)."""
        tasks: list[dict[str, Any]] = []
        page = 1
        while True:
            response = self.session.get(
                self.url + "/api/tasks",
                params={"project": str(project_id), "fields": "all", "page": str(page), "page_size": str(page_size)},
                timeout=self.timeout,
            )
            if response.status_code == 404 and page > 1:  # past the last page
                break
            if response.status_code != 200:
                raise LabelStudioError(f"GET /api/tasks -> HTTP {response.status_code}: {response.text[:2000]}")
            body = response.json()
            batch = body["tasks"] if isinstance(body, dict) else body
            tasks.extend(batch)
            total = body.get("total") if isinstance(body, dict) else None
            if not batch or len(batch) < page_size or (total is not None and len(tasks) >= total):
                break
            page += 1
        return tasks

    def task_predictions(self, task_id: int) -> list[dict[str, Any]]:
        """``GET /api/predictions?task=..``: every stored prediction of the task."""
        return list(self.get("/api/predictions", params={"task": task_id}))

    def create_annotation(self, task_id: int, result: list[dict[str, Any]], **extra: Any) -> int:
        """``POST /api/tasks/{id}/annotations``; returns the annotation id (emits ``ANNOTATION_CREATED``)."""
        return int(self.post(f"/api/tasks/{task_id}/annotations", {"result": result, **extra})["id"])

    def create_prediction(
        self, task_id: int, result: list[dict[str, Any]], model_version: str, score: float | None = None
    ) -> int:
        """``POST /api/predictions`` (what the SDK's ``predictions.create`` does)."""
        payload: dict[str, Any] = {"task": task_id, "result": result, "model_version": model_version}
        if score is not None:
            payload["score"] = score
        return int(self.post("/api/predictions", payload)["id"])

    def retrieve_predictions(self, project_id: int, task_ids: list[int]) -> Any:
        """Data Manager action "Retrieve predictions": Label Studio posts the tasks to the backend's /predict.

        Runs synchronously inside this request (up to the backend's 100 s predict timeout). Its reply says
        "Retrieved N" whatever happened: read predictions back to check.
        """
        return self.post(
            "/api/dm/actions",
            {"selectedItems": {"all": False, "included": list(task_ids)}},
            params={"id": "retrieve_tasks_predictions", "project": project_id},
        )


class LabelStudioServer(LabelStudioClient):
    """``label-studio start`` on 127.0.0.1 with a throw-away data dir; a context manager and an API client.

    ``document_root`` becomes ``LOCAL_FILES_DOCUMENT_ROOT``, so tasks can reference
    ``/data/local-files/?d=<path relative to it>``. ``url`` and ``api_key`` are valid once started; the key
    is a legacy token that works for the REST API (``Authorization: Token``), local-files downloads and
    label-studio-sdk 2.x. The log is kept in ``log_path`` (inside the data dir unless given).
    """

    def __init__(
        self,
        document_root: str | os.PathLike[str],
        *,
        venv: str | os.PathLike[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        username: str = DEFAULT_USERNAME,
        password: str = DEFAULT_PASSWORD,
        api_key: str | None = None,
        startup_timeout: float = 900.0,
        extra_env: dict[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.document_root = Path(document_root).resolve()
        self._venv_arg = venv
        self._data_dir_arg = Path(data_dir) if data_dir is not None else None
        self.port = port or free_port()
        self.username = username
        self.password = password
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self._log_path_arg = Path(log_path) if log_path is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._log_file: Any = None
        self.process: subprocess.Popen[bytes] | None = None
        self.data_dir: Path | None = None
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None
        self.locked_retries: list[str] = []
        super().__init__(f"http://127.0.0.1:{self.port}", api_key or secrets.token_hex(20))

    # -- plumbing ---------------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, expect: tuple[int, ...] = (200, 201), **kwargs: Any) -> Any:
        """Like :meth:`LabelStudioClient.request`, as a person at the UI would: once more on "database is locked".

        Label Studio on SQLite answers 500 when two of its threads write at once: Django opens deferred
        transactions, so one whose read turns into a write cannot wait for the other's lock (or waits 5 s).
        The person clicks again. So does this, twice at most, when Label Studio's log shows that error since
        the call began; each retry is kept in ``locked_retries``. A DELETE tried again may find the row
        already gone (404): that is the delete done. Any other failure carries the log written during the
        call, so a CI failure shows Label Studio's traceback.
        """
        for attempt in range(3):
            start = self.log_size()
            try:
                return super().request(method, path, expect=expect, **kwargs)
            except LabelStudioError as error:
                logged = self.log_since(start)
                if attempt == 2 or "-> HTTP 500" not in str(error) or "database is locked" not in logged:
                    raise LabelStudioError(f"{error}\n--- Label Studio's log during the call ---\n"
                                           f"{logged[-6000:]}") from None  # fmt: skip
                self.locked_retries.append(f"{method} {path}")
                _log(f"{method} {path}: Label Studio's SQLite was locked; trying again")
                if method == "DELETE":
                    expect = (*expect, 404)
                time.sleep(1.0 + attempt)
        raise AssertionError("unreachable")

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path is not None and self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(1 << 20).decode("utf-8", "replace")

    # -- local files ------------------------------------------------------------------------------------
    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> list[int]:
        """Like :meth:`LabelStudioClient.import_tasks`, and first makes ``/data/local-files/?d=<top>/...`` servable.

        For every top-level directory ``<top>`` of ``document_root`` that the tasks reference, a (non-synced)
        Local Files storage ``<document_root>/<top>`` is added to the project if it has none, since without
        one Label Studio answers 404 to the image URLs.
        """
        self.ensure_local_storage(project_id, _local_file_dirs(tasks))
        return super().import_tasks(project_id, tasks)

    def ensure_local_storage(self, project_id: int, top_dirs: set[str]) -> None:
        """Add a Local Files storage ``<document_root>/<dir>`` to the project for each missing ``dir``."""
        if not top_dirs:
            return
        existing = {str(Path(s["path"]).resolve()) for s in self.list_local_storages(project_id)}
        for name in sorted(top_dirs):
            path = (self.document_root / name).resolve()
            if str(path) not in existing and path.is_dir() and self.document_root in path.parents:
                self.add_local_storage(project_id, path, title=f"local {name}")

    # -- lifecycle --------------------------------------------------------------------------------------
    def environment(self) -> dict[str, str]:
        """The environment ``label-studio start`` runs with."""
        assert self.data_dir is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "HEARTEX_"))}
        env.pop("VIRTUAL_ENV", None)
        env.update(
            {
                "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
                "LABEL_STUDIO_USERNAME": self.username,
                "LABEL_STUDIO_PASSWORD": self.password,
                "LABEL_STUDIO_USER_TOKEN": self.api_key,
                "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
                "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
                "ML_BLOCK_LOCAL_IP": "false",
                "SSRF_PROTECTION_ENABLED": "false",
                "COLLECT_ANALYTICS": "false",
                "LOCAL_FILES_SERVING_ENABLED": "true",
                "LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self) -> LabelStudioServer:
        """Install if needed, start, and wait until the API answers with the token. Raises on failure."""
        if self.process is not None:
            return self
        venv = ensure_label_studio_venv(self._venv_arg)
        if self._data_dir_arg is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="label-studio-e2e-")
            self.data_dir = Path(self._tmp.name)
        else:
            self.data_dir = self._data_dir_arg.absolute()
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self._log_path_arg or self.data_dir / "label-studio.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        command = [
            str(venv / "bin" / "label-studio"),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--username",
            self.username,
            "--password",
            self.password,
            "--user-token",
            self.api_key,
            "--enable-legacy-api-token",
        ]
        _log(f"starting Label Studio on {self.url} (data {self.data_dir}, log {self.log_path})")
        started = time.monotonic()
        self.process = subprocess.Popen(
            command,
            cwd=self.data_dir,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() kills label-studio and its children
        )
        try:
            self._wait_until_ready()
        except BaseException as error:
            tail = self.log_tail()
            self.stop()
            raise LabelStudioError(f"Label Studio did not start: {error}\n--- log tail ---\n{tail}") from error
        self.startup_seconds = time.monotonic() - started
        _log(f"Label Studio is up after {self.startup_seconds:.0f} s")
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise LabelStudioError(f"label-studio exited with code {code}")
            try:
                response = self.session.get(self.url + "/api/current-user/whoami", timeout=5)
                if response.status_code == 200 and response.json().get("email") == self.username:
                    return
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code in (401, 403):
                    # The server is up but rejects the token: waiting will not fix that.
                    raise LabelStudioError(f"the API token is rejected: {last}")
            except (requests.ConnectionError, requests.Timeout) as error:
                last = type(error).__name__
            time.sleep(1.0)
        raise TimeoutError(f"no answer after {self.startup_timeout:.0f} s ({last})")

    def log_tail(self, lines: int = 80) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        with self.log_path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the whole process group (SIGTERM, then SIGKILL) and remove the temporary data dir."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=20)
        if process is not None:
            with contextlib.suppress(ProcessLookupError):  # leftovers of the group, if any
                os.killpg(process.pid, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.session.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _local_file_dirs(tasks: list[dict[str, Any]]) -> set[str]:
    """Top-level directories named by ``/data/local-files/?d=<dir>/...`` values in task data."""
    dirs: set[str] = set()
    for task in tasks:
        data = task.get("data", task)
        for value in data.values() if isinstance(data, dict) else ():
            if isinstance(value, str) and "/data/local-files/" in value:
                relative = parse_qs(urlsplit(value).query).get("d", [""])[0].lstrip("/")
                if "/" in relative:
                    dirs.add(relative.split("/", 1)[0])
    return dirs


def dump(value: Any) -> str:
    """Pretty JSON for assertion messages."""
    return json.dumps(value, indent=1, sort_keys=True, default=str)[:4000]
