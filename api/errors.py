"""JSON errors everywhere: Label Studio shows the body, and an HTML 500 helps nobody."""

from __future__ import annotations

import logging

import redis
from flask import Flask, current_app, jsonify
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from common.redact import redact

log = logging.getLogger(__name__)


class BadPayload(ValueError):
    """A request body that is JSON but not what the route expects."""


class UnknownProject(LookupError):
    """A project this backend has never been connected to (no /setup): a JSON 404, and nothing stored."""


class TooLarge(RequestEntityTooLarge):
    """More than the API takes in one request (MAX_REQUEST_BYTES, MAX_TASKS_PER_REQUEST): a JSON 413."""

    def __init__(self, message: str) -> None:
        super().__init__(description=message)


def _shown(text: str) -> str:
    return redact(text, current_app.config["SETTINGS"].deployment_secrets())


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(BadPayload)
    def bad_payload(exc: BadPayload):
        log.warning("bad request: %s", exc)
        return jsonify(error=str(exc)), 400

    @app.errorhandler(UnknownProject)
    def unknown_project(exc: UnknownProject):
        log.warning("refused: %s", exc)
        return jsonify(error=str(exc)), 404

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc: RequestEntityTooLarge):
        if isinstance(exc, TooLarge):
            message = exc.description
        else:  # werkzeug's, from MAX_CONTENT_LENGTH
            limit = current_app.config.get("MAX_CONTENT_LENGTH")
            message = f"request body larger than {limit} bytes (MAX_REQUEST_BYTES)"
        log.warning("refused: %s", message)
        return jsonify(error=message), 413

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        response = jsonify(error=exc.description or exc.name)
        response.status_code = exc.code or 500
        if exc.code == 405 and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(RecursionError)
    def too_deep(exc: RecursionError):
        # JSON nested deeper than the interpreter's recursion limit, found while parsing or while handling it.
        log.warning("bad request: JSON nested too deeply (%s)", exc)
        return jsonify(error="request body: JSON nested too deeply"), 400

    @app.errorhandler(redis.RedisError)
    def redis_down(exc: redis.RedisError):
        log.error("Redis unavailable: %s", exc)
        return jsonify(error=f"Redis unavailable: {_shown(str(exc))}"), 503

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return jsonify(error=f"internal error: {type(exc).__name__}"), 500
