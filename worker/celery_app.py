"""The worker's Celery app, built from the process's settings (common/celery_app.py)."""

from common.celery_app import make_celery
from common.settings import get_settings

app = make_celery(get_settings())
