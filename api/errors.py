"""JSON errors everywhere: Label Studio shows the body, and an HTML 500 helps nobody."""

from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class BadPayload(ValueError):
    """A request body that is JSON but not what the route expects."""


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(BadPayload)
    def bad_payload(exc: BadPayload):
        log.warning("bad request: %s", exc)
        return jsonify(error=str(exc)), 400

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return jsonify(error=exc.description or exc.name), exc.code or 500

    @app.errorhandler(redis.RedisError)
    def redis_down(exc: redis.RedisError):
        log.error("Redis unavailable: %s", exc)
        return jsonify(error=f"Redis unavailable: {exc}"), 503

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return jsonify(error=f"internal error: {type(exc).__name__}"), 500
