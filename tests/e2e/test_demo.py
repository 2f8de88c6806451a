"""`make demo`'s setup (scripts/demo.py) against the session's real Label Studio: the project it makes, and
predictions that appear in Label Studio."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import redis

from common.models import embedding_space
from common.settings import Settings
from common.store import Store
from tests.conftest import TEST_REDIS_URL, worker_env
from tests.e2e.showing import current_answers_shown
from tests.helpers import DATA, REPO, ApiProcess, BeatProcess, WorkerProcess, wait_until

from .label_studio import LabelStudioServer

sys.path.insert(0, str(REPO / "scripts"))
import demo  # noqa: E402

pytestmark = pytest.mark.e2e


def test_the_demo_project_shows_predictions(label_studio: LabelStudioServer, tmp_path: Path):
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    env = worker_env(tmp_path, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key,
                     LOCAL_FILES_DOCUMENT_ROOT=str(DATA), REFIT_DELAY_SECONDS="2")  # fmt: skip
    api = ApiProcess(env, tmp_path / "api.log").start()
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    beat = BeatProcess(env, tmp_path / "beat.log", "beat").start()
    try:
        project, task_ids = demo.set_up_project(label_studio, api.url, DATA, tasks=60)
        assert len(task_ids) == 60
        tasks = label_studio.list_tasks(project)
        annotated = [t["id"] for t in tasks if t["annotations"]]
        assert len(annotated) == 3
        store = Store.from_url(TEST_REDIS_URL, embedding_space(Settings()))

        def shown() -> bool:
            others = [t for t in task_ids if t not in annotated]
            fitted = store.fitted_labels(project, store.current_version(project))
            return len(fitted) == 3 and bool(current_answers_shown(label_studio, store, project, others))

        wait_until(shown, 180, f"predictions of a model of the 3 seeds ({worker.log_tail(20)})", interval=2)
        assert demo.predicted(label_studio, project) >= 57
    finally:
        beat.stop()
        worker.stop()
        api.stop()
