"""An image that kills its worker process, in a chunk of 512, with a real Celery worker, beat and Redis: the
other 511 are embedded, the one is failed with its reason (/jobs, the status page), and no worker process is
killed again afterwards (README "Every task, exactly once", *Crashes*).

The image kills through a TEST-ONLY hook (tests/crash_hook/sitecustomize.py, put on the worker's PYTHONPATH
here and nowhere else): the worker process aborts when it opens an image that carries a marker, as if
decoding it crashed; no real image is known to crash the pinned decoders. `POISON_WATCH_SECONDS` (60 by
default; 300 is the issue's five minutes) is how long the test then watches for another crash, with beat's
tick (every 15 s) re-queuing whatever it finds stalled, and BROKER_VISIBILITY_TIMEOUT at 10 s, so that a
stalled task is found within the first ticks."""

from __future__ import annotations

import dataclasses
import io
import os
import time
from pathlib import Path

from PIL import Image, PngImagePlugin

from api.app import create_app
from common.settings import Settings
from tests.conftest import worker_env
from tests.crash_hook.sitecustomize import MARKER
from tests.helpers import LABEL_CONFIG, REPO, BeatProcess, png_bytes, synthetic_particle, wait_until

PID = 31
POISON = 301  # task id of the image that kills
WATCH_SECONDS = float(os.environ.get("POISON_WATCH_SECONDS", "60"))


def poison_png() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", MARKER.decode())
    buf = io.BytesIO()
    Image.fromarray(synthetic_particle("rod", 0)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_a_chunk_with_an_image_that_kills_its_worker(clean_redis, image_server, start_worker, tmp_path: Path):
    crashes = tmp_path / "crashes.log"
    crashes.touch()
    env = {"CHUNK_SIZE": "512", "IMAGE_SIZE": "32", "BROKER_VISIBILITY_TIMEOUT": "10", "TORCHSCRIPT": "0"}
    worker = start_worker(**env, PYTHONPATH=str(REPO / "tests" / "crash_hook"),
                          PLANKTON_TEST_CRASH_LOG=str(crashes))  # fmt: skip
    beat = BeatProcess(worker_env(tmp_path, **env), tmp_path / "beat.log", "beat").start()
    try:
        settings = dataclasses.replace(Settings.from_env(), chunk_size=512, image_size=32, visibility_timeout=10)
        api = create_app(settings).test_client()
        assert api.post("/setup", json={"project": f"{PID}.1", "schema": LABEL_CONFIG}).status_code == 200
        tasks = []
        for tid in range(1, 513):
            data = poison_png() if tid == POISON else png_bytes(synthetic_particle("round", tid))
            (image_server.root / "tmp" / f"c{tid}.png").write_bytes(data)
            tasks.append({"id": tid, "data": {"image": f"{image_server.url}/tmp/c{tid}.png"}})
        reply = api.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": PID}, "tasks": tasks})
        job = reply.json["job"]
        status = wait_until(lambda: (s := api.get(f"/jobs/{job}").json)["state"] == "done" and s, 600,
                            f"the import ({worker.log_tail(15)})", interval=1)  # fmt: skip
        assert (status["done"], status["failed"]) == (511, 1), status
        (error,) = status["errors"]
        assert error["task"] == POISON and "killed the worker process" in error["error"], error
        store = api.application.extensions["store"]
        assert sorted(store.embeddings(PID)) == [t for t in range(1, 513) if t != POISON]
        assert "killed the worker process" in store.failures(PID)[POISON]["reason"]
        assert not store.failures(PID)[POISON]["transient"] and store.pending(PID) == {}
        page = api.get(f"/ui/projects/{PID}").get_data(as_text=True)
        assert "killed the worker process" in page and str(POISON) in page
        killed = len(crashes.read_text().splitlines())
        # About ten levels of halving, two deaths alone, and the tick's re-queues of the task that kills while
        # it is alone (BROKER_VISIBILITY_TIMEOUT is 10 s here); before, three a round, every round.
        assert 1 <= killed <= 30, f"{killed} crashes to find one task in 512"
        time.sleep(WATCH_SECONDS)  # beat's tick runs all along
        assert len(crashes.read_text().splitlines()) == killed, "the task that kills was tried again"
        assert api.get(f"/jobs/{job}").json["failed"] == 1 and sorted(store.embeddings(PID))[-1] == 512
    finally:
        beat.stop()
    print(f"{killed} worker processes killed to find the one task of 512; none in the {WATCH_SECONDS:g} s after")
