"""Secrets out of log lines and error texts: every process's log records pass through `redact` (installed by
`install_log_redaction`, from the Celery app factory that the API, the worker, beat and Flower all call, and
from gunicorn.conf.py), and the API redacts the errors `/jobs` shows.

What is hidden, wherever it appears in a message or a traceback:
- the values of this deployment's secrets (`LABEL_STUDIO_API_KEY`, `BASIC_AUTH_PASS`, `WEBHOOK_SECRET`,
  `FLOWER_BASIC_AUTH`'s passwords, the password in `REDIS_URL`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`);
- a URL's user and password (`redis://:pw@redis:6379/0` becomes `redis://***@redis:6379/0`) and its query
  values, but the file a Label Studio path names (`d`, `fileuri`), as worker/http_client.py shows image URLs;
- query values whose name says secret (`token`, `key`, `signature`, `password`, ...) in a bare path or query
  (`GET /predict?token=...` in an access log line);
- the values of credential headers in a header dict or a header line (`'Authorization': 'Token ...'`,
  `Set-Cookie: sessionid=...`, `X-Webhook-Secret`, `X-Api-Key`), as the Label Studio SDK's `ApiError` prints
  its response headers.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_plus, urlsplit

MASK = "***"
# Query keys whose values are shown: the file a Label Studio path names (not a credential).
SHOWN_QUERY_KEYS = frozenset({"d", "fileuri"})
# A secret shorter than this would mask ordinary words: the settings refuse one (common/settings.py).
MIN_SECRET_LENGTH = 4
# How much of a URL an error message or a log line shows (an image URL may be kilobytes of query).
SHOWN_URL_LENGTH = 300

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>(){},]+")
_SECRET_KEY = r"[\w.-]*(?:token|secret|passw|pwd|key|sig|signature|credential|auth|session|cookie|code)[\w.-]*"
_QUERY_PAIR = re.compile(rf"(?i)([?&;]{_SECRET_KEY}=)[^&\s'\"#;]*")
_HEADERS = r"(?:proxy-)?authorization|cookie|set-cookie|x-api-key|x-webhook-secret|x-amz-security-token|x-auth-token"
# 'Authorization': 'Token abc' / "cookie": "a=b" (a dict's repr or JSON)
_HEADER_ITEM = re.compile(rf"""(?i)(['"](?:{_HEADERS})['"]\s*:\s*)(['"])(?:\\.|(?!\2).)*\2""")
# Authorization: Token abc (a header line; up to the end of the line)
_HEADER_LINE = re.compile(rf"(?im)^(\s*(?:{_HEADERS})\s*:\s*)\S.*$")


def redact_url(url: str, limit: int | None = SHOWN_URL_LENGTH) -> str:
    """The URL without its user and password and its fragment, with its query values masked but `d` and
    `fileuri`; at most `limit` characters (None: all of it)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@" + netloc.rpartition("@")[2]
    pieces = []
    for piece in parts.query.split("&") if parts.query else ():
        key, sep, value = piece.partition("=")
        pieces.append(key + sep + (value if not sep or unquote_plus(key) in SHOWN_QUERY_KEYS else MASK))
    shown = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else (f"//{netloc}" if netloc else "") + parts.path
    if pieces:
        shown += "?" + "&".join(pieces)
    return shown if limit is None or len(shown) <= limit else shown[: limit - 3] + "..."


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every secret above masked; `secrets`: the values to mask wherever they appear."""
    if not text:
        return text
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _URL.sub(lambda m: redact_url(m.group(0), None), text)
    text = _QUERY_PAIR.sub(lambda m: m.group(1) + MASK, text)
    text = _HEADER_ITEM.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}{m.group(2)}", text)
    return _HEADER_LINE.sub(lambda m: m.group(1) + MASK, text)


# -- every log record of the process ------------------------------------------------------------------------

_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()
_installed = False


def _redacted_record_factory(make: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it when the record is emitted
            return record
        shown = redact(message, _secrets)
        if shown != message:
            record.msg, record.args = shown, ()
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            shown = redact(text, _secrets)
            if shown != text:
                record.exc_text = shown
        if record.stack_info:
            record.stack_info = redact(record.stack_info, _secrets)
        return record

    return factory


def install_log_redaction(settings: Any) -> None:
    """Every log record made in this process from now on (any logger, any handler, installed before or after)
    is redacted when it is made, with this deployment's secrets (`Settings.deployment_secrets`). Calling it again
    updates the secrets."""
    global _secrets, _installed
    with _lock:
        _secrets = frozenset(settings.deployment_secrets())
        if not _installed:
            logging.setLogRecordFactory(_redacted_record_factory(logging.getLogRecordFactory()))
            _installed = True
