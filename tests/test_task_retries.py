"""Celery's own retries (`autoretry_for`, JobTask's backoff) with a real worker: a sync whose Label Studio
answers 503 is tried again, with backoff, until Label Studio answers. Label Studio is a stand-in server here
(tests/servers.py): a real one cannot be made to answer 503 on demand."""

from __future__ import annotations

import dataclasses
import re

from common.settings import Settings
from tests.helpers import wait_until
from tests.servers import Handler, running, send
from worker.runtime import Runtime

PID = 17


def test_a_sync_is_retried_while_label_studio_answers_errors(clean_redis, start_worker):
    with running() as label_studio:
        asked: list[str] = []

        def project(handler: Handler) -> None:
            asked.append(handler.path)
            if len(asked) <= 6:  # two starts of the sync, each with the SDK's own two retries
                send(handler, 503, b'{"detail": "restarting"}', {"Content-Type": "application/json"})
            else:
                send(handler, 404, b'{"detail": "Not found."}', {"Content-Type": "application/json"})

        label_studio.routes[f"/api/projects/{PID}/"] = project
        worker = start_worker(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY="legacy-token-1234")
        rt = Runtime(dataclasses.replace(Settings.from_env(), label_studio_url=label_studio.url))
        rt.store.add_project(PID)
        job = rt.dispatcher.sync(PID, reason="test")
        wait_until(lambda: rt.store.jobs.get(job).state == "done", 120, f"the sync ({worker.log_tail(20)})")
        assert PID not in rt.store.projects()  # the answer that finally came: the project is gone
        assert len(asked) == 7
        retries = re.findall(r"Retry in (\d+)s: ApiError", worker.log_path.read_text())
        assert len(retries) == 2, worker.log_tail(40)
