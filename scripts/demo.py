"""`make demo`: Label Studio, the backend and a project that shows predictions, on this machine, in minutes.

1. Label Studio 1.23 in its own virtualenv (.venv-label-studio, installed on first use as the tests do),
   serving the shared data folder as local files (no Docker).
2. The backend as `make run` starts it (scripts/run.py: the Procfile under honcho), with Label Studio's URL
   and key, reading the images straight from the same folder (LOCAL_FILES_DOCUMENT_ROOT).
3. A project from ../shared/data/label_config.xml, connected to the backend, with a local-files storage over
   the shared FlowCam particles and DEMO_TASKS of them imported (default 1000), and three seed annotations.

It prints Label Studio's URL and login, and the status page's, then waits: Ctrl-C stops everything.

    make demo            (or .venv/bin/python scripts/demo.py [--tasks 1000] [--port 8080])
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from tests.e2e.label_studio import LabelStudioClient, LabelStudioServer, free_port  # noqa: E402
from tests.helpers import find_data_dir  # noqa: E402

# Three particles and what an ecologist would call them: a round cell, a rod, a fibre of debris.
SEEDS = (("00007.png", "Plankton", "Round"), ("00011.png", "Plankton", "Rod-like"), ("00002.png", "Debris", "Rod-like"))


def log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def choice(tag: str, label: str) -> dict:
    return {"from_name": tag, "to_name": "image", "type": "choices", "value": {"choices": [label]}}


def set_up_project(ls: LabelStudioClient, backend_url: str, data: Path, tasks: int) -> tuple[int, list[int]]:
    """The demo project: config, backend, local-files tasks, three seed annotations. Returns the project and
    its task ids."""
    project = ls.create_project("Plankton demo", (data / "label_config.xml").read_text())
    ls.connect_ml_backend(project, backend_url, title="plankton backend")
    particles = sorted((data / "flowcam" / "particles").glob("*.png"))[:tasks]
    task_ids = ls.import_tasks(project, [{"image": f"/data/local-files/?d={p.relative_to(data)}"} for p in particles])
    by_name = dict(zip((p.name for p in particles), task_ids, strict=True))
    for name, organism, shape in SEEDS:
        if name in by_name:
            ls.create_annotation(by_name[name], [choice("organism_type", organism), choice("shape", shape)])
    return project, task_ids


def predicted(ls: LabelStudioClient, project: int) -> int:
    """Tasks showing a prediction in Label Studio (its own count)."""
    return sum(1 for t in ls.list_tasks(project, page_size=1000) if t.get("predictions"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=int(os.environ.get("DEMO_TASKS", "1000")))
    parser.add_argument("--port", type=int, default=int(os.environ.get("LABEL_STUDIO_PORT", "8080")))
    parser.add_argument("--backend-port", type=int, default=int(os.environ.get("PORT", "9090")))
    args = parser.parse_args()
    started = time.monotonic()
    data = find_data_dir()
    folder = Path(tempfile.mkdtemp(prefix="plankton-demo-"))
    port = args.port if _free(args.port) else free_port()
    ls = LabelStudioServer(data, port=port, data_dir=folder / "label-studio", log_path=folder / "label-studio.log")
    backend: subprocess.Popen[bytes] | None = None
    try:
        log(f"starting Label Studio on {ls.url} (first run: installs it into .venv-label-studio, a few minutes)")
        ls.start()
        env = {
            **os.environ,
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.api_key,
            "LOCAL_FILES_DOCUMENT_ROOT": str(data),
            "PORT": str(args.backend_port if _free(args.backend_port) else free_port()),
            "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/3"),
            "PYTHONUNBUFFERED": "1",
        }
        backend_url = f"http://127.0.0.1:{env['PORT']}"
        log(f"starting the backend (make run) at {backend_url}; its log: {folder / 'backend.log'}")
        with open(folder / "backend.log", "ab") as out:
            backend = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "run.py")], cwd=ROOT, env=env,
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        _wait_for(f"{backend_url}/health", backend, folder / "backend.log")
        project, task_ids = set_up_project(ls, backend_url, data, args.tasks)
        log(f"project {project}: {len(task_ids)} particles, 3 seed annotations; waiting for the first predictions")
        while predicted(ls, project) == 0:
            if backend.poll() is not None:
                raise SystemExit(f"the backend stopped: see {folder / 'backend.log'}")
            time.sleep(1)
        first = time.monotonic() - started
        print(f"""
==============================================================================================
  Label Studio:  {ls.url}/projects/{project}/data     login {ls.username} / {ls.password}
  Status page:   {backend_url}/ui/projects/{project}
  First predictions in Label Studio {first:.0f} s after `make demo` started; the rest follow.
  Ctrl-C stops everything (Label Studio's data is in {folder}).
==============================================================================================
""", flush=True)  # fmt: skip
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        log("stopping")
        if backend is not None and backend.poll() is None:
            os.killpg(backend.pid, signal.SIGINT)
            try:
                backend.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(backend.pid, signal.SIGKILL)
        ls.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _wait_for(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the backend stopped:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the backend did not answer {url} in {timeout:.0f} s")


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    sys.exit(main())
