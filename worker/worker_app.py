"""What `celery -A worker.worker_app worker` loads: the Celery app and its task modules.

Before any of them: the worker refuses to start where its metrics, which have no auth, would be served beyond
loopback without ALLOW_UNAUTHENTICATED (README "Security"), and empties its metrics folder
(PROMETHEUS_MULTIPROC_DIR, from the launch environment: worker/metrics.py) of a previous run's counts."""

import os
from pathlib import Path

from common.settings import SettingsError, get_settings

# Idle OpenMP threads sleep instead of spinning: the forward pass shares the cores with the download
# threads, and spinning workers slowed both (bench/throughput.py). Set before any pool process loads torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    _problems = get_settings().worker_metrics_exposure_problems()
except SettingsError as exc:
    raise SystemExit(f"worker: {exc}") from None
if _problems:
    raise SystemExit("worker: will not start:\n  " + "\n  ".join(_problems))
if _metrics_folder := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    Path(_metrics_folder).mkdir(parents=True, exist_ok=True)
    for _old in Path(_metrics_folder).glob("*.db"):
        _old.unlink()

from worker.celery_app import app  # noqa: E402
from worker.tasks import deliver, ingest, learn, maps  # noqa: E402

__all__ = ["app", "deliver", "ingest", "learn", "maps"]
