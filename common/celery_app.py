"""The Celery app, built from settings. Torch-free and without task modules, so the API and Flower can
send and watch tasks; `celery -A worker.worker_app` adds the tasks."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger
from kombu import Queue

from common import queues
from common.redact import install_log_redaction
from common.settings import Settings

TICK_SECONDS = 15.0

# The worker's and beat's log level is LOG_LEVEL: Celery has no configuration key for it (only `-l`, whose
# default is WARNING), so the level is set once Celery has set up its loggers. The app made last in a process
# (the one `celery -A` loads) decides.
_log_level = "INFO"


def _apply_log_level(logger: Any = None, **_: Any) -> None:
    if logger is not None:
        logger.setLevel(_log_level)


after_setup_logger.connect(_apply_log_level, weak=False, dispatch_uid="plankton-log-level")
after_setup_task_logger.connect(_apply_log_level, weak=False, dispatch_uid="plankton-task-log-level")


def make_celery(settings: Settings) -> Celery:
    """The app with every worker option in its configuration: `celery -A worker.worker_app worker` needs no
    flags (README "Configuration"; the Procfile, the Dockerfiles, compose and tests/helpers.py start it so)."""
    global _log_level
    _log_level = settings.log_level
    # Every process makes its app here (API, worker, beat, Flower): no log line of theirs shows a secret.
    install_log_redaction(settings)
    app = Celery("plankton", broker=settings.redis_url)
    beat_schedule = {"tick": {"task": queues.TICK, "schedule": TICK_SECONDS, "options": {"queue": queues.CONTROL}}}
    if settings.sync_interval_seconds > 0:
        beat_schedule["sync-all"] = {
            "task": queues.SYNC_ALL,
            "schedule": settings.sync_interval_seconds,
            "options": {"queue": queues.CONTROL},
        }
    app.conf.update(
        # A worker started without -Q consumes every queue listed here, in this order: interactive first
        # (with the "priority" queue order below). `-Q bulk` still makes a bulk-only worker.
        task_queues=tuple(Queue(name) for name in queues.QUEUES),
        task_default_queue=queues.BULK,
        # A task is acknowledged only once it finished: a worker killed mid-batch leaves it in Redis and
        # another worker runs it again (every task is idempotent; see README "Every task, exactly once").
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message at a time per process: an interactive task waits for at most the batch in progress.
        # Tasks go to pool processes that are free ("fair"): Celery's default scheduling since 4.0 (`-O fair`
        # and `-O default` both select it; there is no configuration key), checked by tests/test_settings.py.
        worker_prefetch_multiplier=1,
        # WORKER_CONCURRENCY (default: one process per core, at most 4); each runs cores/processes torch threads.
        worker_concurrency=settings.worker_concurrency,
        broker_transport_options={
            # Poll queues in the order the worker consumes them (task_queues above), not round robin.
            "queue_order_strategy": "priority",
            # An unacknowledged message (its worker died) is redelivered after this long; keep it above the
            # longest task. Looked for every 10 s.
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            # A Redis that went away without closing the connection must not hang a publish forever.
            "socket_timeout": 30,
            "socket_connect_timeout": 5,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        # The periodic work (README "Reconciliation"): beat keeps its schedule in memory, nothing on disk.
        beat_schedule=beat_schedule,
        beat_scheduler="celery.beat:Scheduler",
    )
    return app
