"""Basic auth on every route but `/webhook`, which Label Studio calls without it (it can send a
configured header instead: `X-Webhook-Secret`)."""

from __future__ import annotations

import hmac

from flask import Flask, current_app, jsonify, request

from common.settings import Settings

WEBHOOK_SECRET_HEADER = "X-Webhook-Secret"


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _basic_auth_ok(settings: Settings) -> bool:
    auth = request.authorization
    return (
        auth is not None
        and _same(auth.username or "", settings.basic_auth_user)
        and _same(auth.password or "", settings.basic_auth_pass)
    )


def register_auth(app: Flask) -> None:
    @app.before_request
    def check_credentials():
        settings = current_app.config["SETTINGS"]
        if request.endpoint == "webhook.webhook":
            # Webhooks carry the configured header; "Start training" comes from the ML connector instead,
            # which sends the backend's basic auth but not the webhook's headers: either one will do.
            if (
                settings.webhook_secret
                and not _same(request.headers.get(WEBHOOK_SECRET_HEADER, ""), settings.webhook_secret)
                and not (settings.basic_auth_user and _basic_auth_ok(settings))
            ):
                return jsonify(error=f"missing or wrong {WEBHOOK_SECRET_HEADER} header"), 401
            return None
        if settings.basic_auth_user and not _basic_auth_ok(settings):
            response = jsonify(error="authentication required")
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Basic realm="plankton-ml-backend"'
            return response
        return None
