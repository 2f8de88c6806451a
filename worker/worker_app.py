"""What `celery -A worker.worker_app worker` (and `beat`) loads: the Celery app and its task modules."""

import os

# Idle OpenMP threads sleep instead of spinning: the forward pass shares the cores with the download
# threads, and spinning workers slowed both (bench/throughput.py). Set before any pool process loads torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from worker.celery_app import app  # noqa: E402
from worker.tasks import deliver, ingest, learn  # noqa: E402

__all__ = ["app", "deliver", "ingest", "learn"]
