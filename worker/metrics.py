"""Prometheus metrics of the workers: images, batches, downloads, the model, write-backs and refits.

Every pool process counts into prometheus-client's multiprocess directory, PROMETHEUS_MULTIPROC_DIR: it must be
in the worker's launch environment (`make run`, Dockerfile.worker and tests/helpers.py set it), since the
`celery` command imports prometheus_client (Flower's plugin) before any of this project's code, and
prometheus_client picks how it counts when it is imported. The worker's main process empties the folder at
start (worker/worker_app.py) and serves every process's counts on WORKER_METRICS_ADDRESS:WORKER_METRICS_PORT.
Queue depths and each project's current version are state in Redis, not events: the API exports them
(api/metrics.py).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import worker_process_shutdown, worker_ready
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, start_http_server

from common.settings import get_settings

log = logging.getLogger(__name__)

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

IMAGES = Counter("plankton_images_total", "Task images by outcome: embedded by the model, from the content "
                 "cache (same bytes seen before), failed", ["outcome"])  # fmt: skip
IMAGE_FAILURES = Counter("plankton_image_failures_total", "Task images that failed, by reason", ["reason"])
DOWNLOAD_SECONDS = Histogram("plankton_download_seconds", "Fetching one image (HTTP, S3 or a direct read)",
                             buckets=LATENCY)  # fmt: skip
MODEL_SECONDS = Histogram("plankton_model_seconds", "One forward pass of a batch", buckets=LATENCY)
BATCH_SECONDS = Histogram("plankton_batch_seconds", "One batch: its forward pass, and its features stored in the "
                          "content cache", buckets=LATENCY)  # fmt: skip
CHUNK_SECONDS = Histogram("plankton_chunk_seconds", "One chunk of tasks (a Celery message), start to end",
                          buckets=LATENCY)  # fmt: skip
WRITEBACK = Counter("plankton_writeback_predictions_total", "Predictions written to Label Studio, by outcome "
                    "(written, revised: replacing an older answer, refused as invalid)", ["outcome"])  # fmt: skip
WRITEBACK_FAILURES = Counter("plankton_writeback_failures_total", "Write requests to Label Studio that failed "
                             "(each is retried later)", ["kind"])  # fmt: skip
WRITEBACK_RETRIES = Counter("plankton_writeback_retries_total", "Predictions whose write was postponed after a "
                            "failure")  # fmt: skip
REFITS = Counter("plankton_refits_total", "Refits by outcome (fitted: a new version; unchanged; nothing new)",
                 ["outcome"])  # fmt: skip
REFIT_SECONDS = Histogram("plankton_refit_seconds", "One refit, snapshot to published version", buckets=LATENCY)


def failure_reason(message: str) -> str:
    """A short, bounded label for an image failure (the full message is in the job and the log)."""
    text = message.lower()
    for needle, reason in (
        ("refused", "refused"),
        ("timed out", "timeout"),
        ("answered http 4", "http 4xx"),
        ("answered http 5", "http 5xx"),
        ("http 4", "http 4xx"),
        ("http 5", "http 5xx"),
        ("cannot decode", "decode"),
        ("not a png", "format"),
        ("limit", "limits"),
        ("no '", "no image in task data"),
        ("cannot connect", "connection"),
        ("failed", "connection"),
    ):
        if needle in text:
            return reason
    return "other"


def serve(address: str, port: int) -> None:
    """Serve the metrics of every process of this worker (main process only)."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not port:
        return
    if not folder:
        log.warning("no metrics: PROMETHEUS_MULTIPROC_DIR is not set in the worker's launch environment (make run "
                    "and Dockerfile.worker set it)")  # fmt: skip
        return
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=folder)
    try:
        start_http_server(port, addr=address, registry=registry)
    except OSError as exc:  # another worker on this host has the port: the work goes on without it
        log.warning("cannot serve metrics on %s:%d (%s); set WORKER_METRICS_PORT to a free port, or 0", address,
                    port, exc)  # fmt: skip
        return
    log.info("metrics on %s:%d/metrics", address, port)


@worker_ready.connect
def _serve_when_ready(**_: Any) -> None:
    settings = get_settings()
    serve(settings.worker_metrics_address, settings.worker_metrics_port)


@worker_process_shutdown.connect
def _pool_process_gone(pid: int | None = None, **_: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid or os.getpid())
