"""What `celery -A worker.worker_app worker` loads: the Celery app and its task modules."""

from worker import learn_tasks, predict_tasks
from worker.celery_app import app

__all__ = ["app", "learn_tasks", "predict_tasks"]
