"""Application factory: `gunicorn "api.app:create_app()"`."""

from __future__ import annotations

import logging

from celery import Celery
from flask import Flask

from api import ml, openapi, projects, ui, webhook
from api.auth import register_auth
from api.errors import register_error_handlers
from api.metrics import register_metrics
from common.celery_app import make_celery
from common.dispatch import Dispatcher
from common.models import embedding_space
from common.redact import install_log_redaction
from common.settings import Settings, get_settings
from common.store import Store


def create_app(settings: Settings | None = None, celery: Celery | None = None) -> Flask:
    settings = settings or get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction(settings)
    celery = celery or make_celery(settings)
    app = Flask(__name__)
    app.config["SETTINGS"] = settings
    app.json.sort_keys = False
    # Werkzeug refuses a larger body (Content-Length, or as it streams in) with a 413, before any parsing.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    store = Store.from_url(settings.redis_url, embedding_space(settings))
    app.extensions["store"] = store
    app.extensions["dispatcher"] = Dispatcher(celery, store, settings)
    register_auth(app)
    register_error_handlers(app)
    register_metrics(app)
    app.register_blueprint(ml.bp)
    app.register_blueprint(webhook.bp)
    app.register_blueprint(projects.bp)
    app.register_blueprint(ui.bp)
    app.register_blueprint(openapi.bp)
    return app
