"""Prometheus metrics of the API (`GET /metrics`, behind the same auth as the other routes).

Requests by route and status, and their latency, counted by every gunicorn worker into prometheus-client's
multiprocess directory when PROMETHEUS_MULTIPROC_DIR is set (gunicorn.conf.py sets a fresh one); and, read
from Redis at each scrape, the state the workers leave there: queue depths, each project's current model
version, and the predictions still to write to Label Studio.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from common import queues
from common.store import Store

bp = Blueprint("metrics", __name__)

REQUESTS = Counter("plankton_http_requests_total", "API requests by route, method and status",
                   ["route", "method", "status"])  # fmt: skip
LATENCY = Histogram("plankton_http_request_seconds", "API request latency by route and method", ["route", "method"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))  # fmt: skip


# The methods counted by name; any other (a client may send any token as its method) counts as "other", so
# that no request, refused or not, can add a series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


class StateCollector(Collector):
    """What Redis holds now: read at scrape time, never counted."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("plankton_queue_depth", "Messages waiting in each Celery queue", labels=["queue"])
        for name in queues.QUEUES:
            depth.add_metric([name], self.store.r.llen(name))
        yield depth
        version = InfoMetricFamily("plankton_model_version", "Each project's current model version",
                                   labels=["project"])  # fmt: skip
        outbox = GaugeMetricFamily("plankton_outbox_predictions", "Predictions waiting to be written to Label "
                                   "Studio", labels=["project"])  # fmt: skip
        embedded = GaugeMetricFamily("plankton_tasks_embedded", "Tasks with features stored", labels=["project"])
        for pid in self.store.projects():
            version.add_metric([str(pid)], {"version": self.store.current_version(pid)})
            outbox.add_metric([str(pid)], self.store.delivery.size(pid))
            embedded.add_metric([str(pid)], self.store.embedding_count(pid))
        yield from (version, outbox, embedded)


def register_metrics(app: Flask) -> None:
    @app.before_request
    def start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method = method_label(request.method)
        REQUESTS.labels(route, method, str(response.status_code)).inc()
        if "started" in g:
            LATENCY.labels(route, method).observe(time.perf_counter() - g.started)
        return response

    app.register_blueprint(bp)


@bp.get("/metrics")
def metrics() -> Response:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        counted = CollectorRegistry()
        MultiProcessCollector(counted)
    else:
        counted = REGISTRY
    state = CollectorRegistry()
    state.register(StateCollector(current_app.extensions["store"]))
    return Response(generate_latest(counted) + generate_latest(state), mimetype=CONTENT_TYPE_LATEST)
