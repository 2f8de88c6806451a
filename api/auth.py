"""Who may call what (README "Security").

- `/health` and `/` are open: compose's healthchecks and Label Studio's health call (which comes before its
  credentials are even entered) must reach them, and they tell nothing but "UP" and the deployment's names.
- Every other route needs the basic auth when `BASIC_AUTH_USER`/`BASIC_AUTH_PASS` are set.
- A refused request is answered from its headers alone: of its body, at most a few KB are read for a log line
  (a body of MAX_REQUEST_BYTES parsed as JSON costs the API ten times that in memory).
- `/webhook`: Label Studio's webhooks carry only the headers configured on the webhook, never basic auth,
  while *Start training* comes from the ML connector with the basic auth and without those headers. So, with
  `WEBHOOK_SECRET` set, either the header `X-Webhook-Secret` or the basic auth will do; with only the basic
  auth set, the basic auth only (Label Studio's own webhooks are then refused, and logged with what to do:
  the periodic sync still learns what they carried); with neither, it is open, which the start-up rule
  allows only on loopback or with `ALLOW_UNAUTHENTICATED=1`.
"""

from __future__ import annotations

import hmac
import logging
import re

from flask import Flask, current_app, jsonify, request

from common.settings import Settings
from common.webhook_secret import HEADER as WEBHOOK_SECRET_HEADER

log = logging.getLogger(__name__)

# Endpoints anyone may call.
OPEN_ENDPOINTS = frozenset({"ml.health"})
REALM = 'Basic realm="plankton-ml-backend"'


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _basic_auth_ok(settings: Settings) -> bool:
    try:
        auth = request.authorization
    except Exception:  # a malformed header is no credential
        return False
    return (
        auth is not None
        and auth.type == "basic"
        and _same(auth.username or "", settings.basic_auth_user)
        and _same(auth.password or "", settings.basic_auth_pass)
    )


def _refused(message: str, basic: bool):
    response = jsonify(error=message)
    response.status_code = 401
    if basic:
        response.headers["WWW-Authenticate"] = REALM
    return response


# A refused webhook's log line names its action and project from at most this much of its body: a refused
# request costs the API what it reads, and the whole body may be MAX_REQUEST_BYTES of JSON.
LOG_PEEK_BYTES = 4096
_ACTION = re.compile(rb'"action"\s*:\s*"([A-Za-z_]{1,40})"')
_PROJECT = re.compile(rb'"project"\s*:\s*(?:\{[^{}]*?"id"\s*:\s*)?"?([0-9][0-9.]{0,39})')


def _webhook_event() -> tuple[str, str]:
    """The refused webhook's action and project, for the log line, from the first LOG_PEEK_BYTES of its body
    (nothing more is read, and nothing is parsed as JSON)."""
    try:
        head = request.stream.read(LOG_PEEK_BYTES)
    except Exception:  # a client that hung up, a body over MAX_REQUEST_BYTES: no names to log
        return "?", "?"
    action, project = _ACTION.search(head), _PROJECT.search(head)
    return (action.group(1).decode() if action else "?"), (project.group(1).decode() if project else "?")


def register_auth(app: Flask) -> None:
    @app.before_request
    def check_credentials():
        settings = current_app.config["SETTINGS"]
        if request.endpoint in OPEN_ENDPOINTS:
            return None
        basic = bool(settings.basic_auth_user)
        if request.endpoint == "webhook.webhook":
            secret = settings.webhook_secret
            if not secret and not basic:
                return None
            if secret and _same(request.headers.get(WEBHOOK_SECRET_HEADER, ""), secret):
                return None
            if basic and _basic_auth_ok(settings):
                return None
            action, project = _webhook_event()
            if secret:
                log.warning(
                    "refused a webhook (%s, project %s) without the right %s header: the workers add it to the "
                    "webhook Label Studio created once they reach Label Studio (LABEL_STUDIO_URL and "
                    "LABEL_STUDIO_API_KEY); or add it in the project's Settings > Webhooks",
                    action, project, WEBHOOK_SECRET_HEADER,
                )  # fmt: skip
                return _refused(f"missing or wrong {WEBHOOK_SECRET_HEADER} header", basic=False)
            log.warning(
                "refused a webhook (%s, project %s) without basic auth: Label Studio's webhooks carry none. Set "
                "WEBHOOK_SECRET (the workers add its header to the project's webhook); until then the periodic "
                "sync (SYNC_INTERVAL_SECONDS) learns what the webhooks would have said",
                action, project,
            )  # fmt: skip
            return _refused("authentication required (basic auth, or set WEBHOOK_SECRET for webhooks)", basic=True)
        if basic and not _basic_auth_ok(settings):
            return _refused("authentication required", basic=True)
        return None
