"""Prometheus metrics during a real import: the API under gunicorn (multiprocess mode) and a real Celery
worker serving its own, scraped while the import runs, with the counters moving."""

from __future__ import annotations

import re
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import worker_env
from tests.helpers import LABEL_CONFIG, ApiProcess, free_port, png_bytes, synthetic_particle, wait_until

PID = 21


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(url, timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, v_) in ls for k, v_ in labels.items()))


def test_metrics_move_during_an_import(clean_redis, image_server, start_worker, tmp_path):
    port = free_port()
    start_worker(WORKER_METRICS_PORT=str(port), CHUNK_SIZE="8")
    api = ApiProcess(worker_env(tmp_path), tmp_path / "api.log").start()
    try:
        assert requests.post(f"{api.url}/setup", json={"project": f"{PID}.1", "schema": LABEL_CONFIG}).ok
        for i in range(40):
            (image_server.root / "tmp" / f"m{i}.png").write_bytes(png_bytes(synthetic_particle("round", i)))
        tasks = [{"id": i + 1, "data": {"image": f"{image_server.url}/tmp/m{i}.png"}} for i in range(40)]
        tasks.append({"id": 99, "data": {"image": f"{image_server.url}/tmp/missing.png"}})
        before = scrape(f"http://127.0.0.1:{port}/metrics")
        reply = requests.post(f"{api.url}/webhook", json={"action": "TASKS_CREATED", "project": {"id": PID},
                                                          "tasks": tasks}, timeout=10)  # fmt: skip
        job = reply.json()["job"]
        during = [scrape(f"http://127.0.0.1:{port}/metrics")]
        while requests.get(f"{api.url}/jobs/{job}", timeout=5).json()["state"] != "done":
            during.append(scrape(f"http://127.0.0.1:{port}/metrics"))
            time.sleep(0.2)
        metrics = f"http://127.0.0.1:{port}/metrics"
        after = wait_until(lambda: (s := scrape(metrics)) and total(s, "plankton_images_total", outcome="embedded")
                           >= 40 and s, 30, "the counts")  # fmt: skip
        assert total(before, "plankton_images_total", outcome="embedded") == 0
        assert total(after, "plankton_images_total", outcome="embedded") == 40
        assert total(after, "plankton_images_total", outcome="failed") == 1
        assert total(after, "plankton_image_failures_total", reason="http 4xx") == 1
        assert total(after, "plankton_model_seconds_count") >= 2  # batches of 32 at most: 40 images
        assert total(after, "plankton_download_seconds_count") >= 41
        assert total(after, "plankton_chunk_seconds_count") >= 6  # chunks of 8
        counts = [total(s, "plankton_images_total", outcome="embedded") for s in during + [after]]
        assert counts == sorted(counts), "counters never go back"

        api_metrics = scrape(f"{api.url}/metrics")
        assert total(api_metrics, "plankton_http_requests_total", route="/webhook", status="200") == 1
        assert total(api_metrics, "plankton_http_requests_total", route="/jobs/<job_id>") >= 1
        assert total(api_metrics, "plankton_http_request_seconds_count", route="/setup") == 1
        assert total(api_metrics, "plankton_queue_depth", queue="bulk") >= 0
        (version,) = [dict(ls)["version"] for (n, ls), _ in api_metrics.items() if n == "plankton_model_version_info"]
        assert re.search(r"-v0000-", version)
        assert total(api_metrics, "plankton_tasks_embedded", project=str(PID)) == 40
    finally:
        api.stop()
