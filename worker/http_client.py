"""GET over keep-alive HTTP/1.1 connections, one set per download thread.

Python's `http.client` directly: urllib3's pool, retry and response layers took more CPU per image than the
request itself, and a worker downloads thousands of 1 KB particles a minute beside a model that needs about
a millisecond per image (bench/RESULTS.md). Connections stay open between images; one the server closed
while idle is opened again once, transparently.
"""

from __future__ import annotations

import http.client
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

REDIRECTS = frozenset({301, 302, 303, 307, 308})
# What a reused connection raises when the server closed it while it was idle.
STALE = (http.client.RemoteDisconnected, http.client.CannotSendRequest, ConnectionResetError, BrokenPipeError)
USER_AGENT = "plankton-ml-backend"


class FetchError(Exception):
    """The message says what went wrong, with the URL."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


Origin = tuple[str, str, int]


class KeepAliveClient:
    """Thread-safe: each thread keeps its own connections."""

    def __init__(self, timeout: float, max_bytes: int, max_redirects: int = 3) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self._local = threading.local()
        self._ssl_context: ssl.SSLContext | None = None

    def get(self, url: str, headers: Mapping[str, str] | None = None) -> Response:
        """The response to GET `url`, redirects followed. A body over `max_bytes` is an error; so are a
        timeout and a failed connection. Any status is returned: the caller decides what it means."""
        for _ in range(self.max_redirects + 1):
            status, location, body = self._get_once(url, headers or {})
            if status not in REDIRECTS or not location:
                return Response(status, body)
            url = urljoin(url, location)
        raise FetchError(f"GET {url} failed: more than {self.max_redirects} redirects")

    def _connections(self) -> dict[Origin, http.client.HTTPConnection]:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def _get_once(self, url: str, headers: Mapping[str, str]) -> tuple[int, str | None, bytes]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"GET {url} failed: not an http(s) URL")
        origin = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conns = self._connections()
        for attempt in range(2):
            conn = conns.get(origin)
            reused = conn is not None
            if conn is None:
                conn = conns[origin] = self._connect(url, origin)
            try:
                conn.request("GET", target, headers={"User-Agent": USER_AGENT, **headers})
                resp = conn.getresponse()
                status, location, body = resp.status, resp.getheader("Location"), self._read(url, resp)
            except STALE as exc:
                self._drop(origin)
                if reused and attempt == 0:
                    continue
                raise FetchError(f"GET {url} failed: {type(exc).__name__}: {exc}") from None
            except FetchError:
                self._drop(origin)
                raise
            except TimeoutError:
                self._drop(origin)
                raise FetchError(f"GET {url} timed out after {self.timeout:g} s") from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop(origin)
                raise FetchError(f"GET {url} failed: {type(exc).__name__}: {exc}") from None
            if resp.will_close or not resp.isclosed():
                self._drop(origin)
            return status, location, body
        raise AssertionError("unreachable")

    def _connect(self, url: str, origin: Origin) -> http.client.HTTPConnection:
        scheme, host, port = origin
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=self.timeout, context=self._ssl_context
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            conn.connect()
        except TimeoutError:
            raise FetchError(f"GET {url} timed out after {self.timeout:g} s (connecting)") from None
        except OSError as exc:
            raise FetchError(f"GET {url} failed: cannot connect ({type(exc).__name__}: {exc})") from None
        return conn

    def _read(self, url: str, resp: http.client.HTTPResponse) -> bytes:
        limit = self.max_bytes
        declared = resp.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise FetchError(f"{url} is {int(declared)} bytes, over the {limit}-byte limit (IMAGE_MAX_BYTES)")
        body = resp.read(limit + 1)
        if len(body) > limit:
            raise FetchError(f"{url} is over the {limit}-byte limit (IMAGE_MAX_BYTES)")
        return body

    def _drop(self, origin: Origin) -> None:
        conn = self._connections().pop(origin, None)
        if conn is not None:
            conn.close()
