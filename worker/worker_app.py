"""What `celery -A worker.worker_app worker` (and `beat`) loads: the Celery app and its task modules."""

import os
import tempfile

# Idle OpenMP threads sleep instead of spinning: the forward pass shares the cores with the download
# threads, and spinning workers slowed both (bench/throughput.py). Set before any pool process loads torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Every pool process counts its Prometheus metrics into one folder, fresh at each start (worker/metrics.py);
# set before anything imports prometheus_client.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="plankton-worker-metrics-")

from worker.celery_app import app  # noqa: E402
from worker.tasks import deliver, ingest, learn, maps  # noqa: E402

__all__ = ["app", "deliver", "ingest", "learn", "maps"]
