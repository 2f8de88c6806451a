"""The Celery app. Torch-free, and without its task modules, so that the API and Flower (whose image has
no numpy or torch) can import it to send and watch tasks; `celery -A worker.worker_app worker` adds them."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from common.queues import BULK, INTERACTIVE
from common.settings import get_settings

settings = get_settings()

app = Celery("plankton", broker=settings.redis_url)
app.conf.update(
    task_queues=(Queue(INTERACTIVE), Queue(BULK)),
    task_default_queue=BULK,
    # A task is acknowledged only once it finished: a worker killed mid-batch leaves it in Redis and
    # another worker runs it again (write-back is idempotent, see worker/writeback.py).
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # One message at a time per process: an interactive task waits for at most the batch in progress.
    worker_prefetch_multiplier=1,
    # WORKER_CONCURRENCY (default: one process per core, at most 4); each runs cores/processes torch threads.
    worker_concurrency=settings.worker_concurrency,
    broker_transport_options={
        # Poll queues in the order the worker lists them (-Q interactive,bulk), not round robin.
        "queue_order_strategy": "priority",
        # An unacknowledged message is redelivered after this long; keep it above the longest task.
        "visibility_timeout": settings.visibility_timeout,
    },
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_hijack_root_logger=False,
)
