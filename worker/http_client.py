"""Outbound HTTP for the worker's image downloads: urllib3 behind an address guard.

- **Address guard.** Every hop (the first request and each redirect) is resolved by `OutboundGuard`, which
  refuses loopback, private, link-local, multicast, reserved and unspecified addresses (IPv4, IPv6, and
  IPv4 inside IPv6: mapped, 6to4, NAT64) unless the host is allowed: Label Studio's host:port
  (`LABEL_STUDIO_URL`), the S3 endpoint (`S3_ENDPOINT_URL`) and `IMAGE_HOSTS`. The socket then connects to
  the address that was checked, never to a second lookup (no DNS-rebinding gap). A refused address is
  refused before any packet is sent, with one message whatever the port, so job statuses cannot be used
  to scan a network.
- **Redirects** are followed here, not inside urllib3: at most `MAX_REDIRECTS`, never in a loop, never from
  https to http, and the caller's headers (`Authorization`) go only to the first origin: once a redirect
  leaves it, they are dropped for good.
- **One deadline per fetch** covers everything (connect, TLS handshake, every read, every redirect): each
  socket read waits at most until it, so a server that drips a byte at a time cannot hold a download thread.
- **Pools.** Each download thread keeps its own urllib3 `PoolManager` (keep-alive connections, no locks
  shared between threads); bodies are read with `preload_content=False`, up to the byte limit.

Why urllib3 and not the hand-written `http.client` client this replaced: `bench/http_clients.py` measured
both through a real keep-alive server (README "Fetching images safely"); the difference is a few percent
of the model's own CPU per image, too little to keep a hand-written HTTP client in a security boundary.
"""

from __future__ import annotations

import errno
import http.client
import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    LocationParseError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util import Url, parse_url

from common.redact import redact, redact_url

REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
SMALL_BODY = 64 * 1024  # a redirect's or an error's body is read (keeping the connection) up to this
USER_AGENT = "plankton-ml-backend"

log = logging.getLogger(__name__)


class FetchError(Exception):
    """The message says what went wrong, with the URL (redacted). `transient`: it may work later."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), str(self), self.transient)


class Refused(FetchError):
    """The guard refused an address or a redirect before connecting. Never transient."""


def _rebuild(cls: type[FetchError], message: str, transient: bool) -> FetchError:
    return cls(message, transient=transient)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    url: str  # the last hop's URL (after redirects)


# -- the address guard -----------------------------------------------------------------------------

_NUMERIC_IPV4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

Address = tuple[int, tuple[Any, ...]]  # (socket family, sockaddr)
Resolver = Callable[[str, int], list[Address]]


def canonical_host(host: str) -> str:
    """Lower case, no brackets, no trailing dot; IP literals in their one standard spelling, including the
    forms `inet_aton` accepts (127.1, 2130706433, 0x7f.1, 0177.0.0.1), which resolvers accept too."""
    h = host.strip().lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    h = h.rstrip(".")
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        pass
    if _NUMERIC_IPV4.match(h):
        try:
            return socket.inet_ntoa(socket.inet_aton(h))
        except OSError:
            pass
    return h


def refusal_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a connection to `ip` is refused by default, or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return refusal_reason(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            return refusal_reason(ip.sixtofour)
        if ip.teredo is not None:
            return "reserved"
        if ip in _NAT64:
            return refusal_reason(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip in _IPV4_COMPATIBLE and not ip.is_loopback and not ip.is_unspecified:
            return "reserved"
    for reason, flag in (("loopback", ip.is_loopback), ("unspecified", ip.is_unspecified),
                         ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                         ("private", ip.is_private), ("reserved", ip.is_reserved)):  # fmt: skip
        if flag:
            return reason
    return None if ip.is_global else "private"


def system_resolver(host: str, port: int) -> list[Address]:
    seen: list[Address] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if (family, sockaddr) not in seen:
            seen.append((family, sockaddr))
    return seen


def parse_host_list(raw: str, what: str = "IMAGE_HOSTS") -> list[tuple[str, int | None]]:
    """`host` or `host:port` entries, comma-separated (`[v6]:port`, bare IPv6 and URLs accepted too)."""
    rules: list[tuple[str, int | None]] = []
    for item in (i.strip() for i in raw.split(",")):
        if not item:
            continue
        port: str | int | None = None
        if "://" in item:
            parts = urlsplit(item)
            host, port = parts.hostname or "", parts.port
        elif item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else None
        elif item.count(":") == 1:
            host, port = item.split(":")
        else:
            host = item
        try:
            port = int(port) if port not in (None, "") else None
        except ValueError:
            port = -1
        if not host or (port is not None and not 0 < port < 65536) or any(c in host for c in "/@ "):
            raise ValueError(f"{what}: {item!r} is not host or host:port")
        rules.append((canonical_host(host), port))
    return rules


def origin_rule(url: str) -> tuple[str, int | None] | None:
    """The host:port rule of a configured service URL (LABEL_STUDIO_URL, S3_ENDPOINT_URL)."""
    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    return (canonical_host(parts.hostname), port) if parts.hostname else None


class OutboundGuard:
    """Which (host, port) may be connected to, and at which addresses. Thread-safe (read-only)."""

    def __init__(self, allowed: Iterable[tuple[str, int | None]] = (), resolver: Resolver | None = None) -> None:
        self.any_port: set[str] = set()
        self.ports: set[tuple[str, int]] = set()
        for host, port in allowed:
            if port is None:
                self.any_port.add(canonical_host(host))
            else:
                self.ports.add((canonical_host(host), port))
        self.resolver: Resolver = resolver or system_resolver

    @classmethod
    def from_settings(cls, settings: Any, resolver: Resolver | None = None) -> OutboundGuard:
        rules = parse_host_list(getattr(settings, "image_hosts", "") or "")
        for url in (settings.label_studio_url, settings.s3_endpoint_url):
            rule = origin_rule(url) if url else None
            if rule:
                rules.append(rule)
        return cls(rules, resolver)

    def addresses(self, host: str, port: int) -> list[Address]:
        """The addresses to connect to for host:port, each checked; Refused when there is none. A listed host
        (IMAGE_HOSTS, Label Studio, the S3 endpoint) may resolve to any address; any other must be public.

        An unlisted host gets one refusal whether it resolves to a private address or not at all, so that job
        errors cannot tell which internal names exist; the log says which."""
        canon = canonical_host(host)
        listed = canon in self.any_port or (canon, port) in self.ports
        try:
            found = self.resolver(canon, port)
        except socket.gaierror as exc:
            if not listed:
                raise self._refused(host, canon, f"cannot resolve: {exc.strerror or exc}") from None
            # A listed host is expected to exist (a service restarting in compose): worth another try.
            raise FetchError(f"cannot resolve {host}", transient=True) from None
        except (OSError, UnicodeError, ValueError) as exc:
            if not listed:
                raise self._refused(host, canon, f"cannot resolve: {type(exc).__name__}") from None
            raise FetchError(f"cannot resolve {host}") from None
        if listed:
            if not found:
                raise FetchError(f"cannot resolve {host}")
            return found
        usable, reasons = [], []
        for family, sockaddr in found:
            try:
                reason = refusal_reason(ipaddress.ip_address(str(sockaddr[0]).split("%")[0]))
            except ValueError:
                reason = "not an IP address"
            if reason is None:
                usable.append((family, sockaddr))
            else:
                reasons.append(reason)
        if not usable:
            raise self._refused(host, canon, ", ".join(dict.fromkeys(reasons)) or "no address")
        return usable

    def _refused(self, host: str, canon: str, why: str) -> Refused:
        log.info("refused %s: %s", canon[:100], why)
        if any(h == canon for h, _ in self.ports):
            return Refused(f"refused: {host} is not a public address and is allowed on other ports only "
                           "(IMAGE_HOSTS, LABEL_STUDIO_URL, S3_ENDPOINT_URL)")  # fmt: skip
        return Refused(f"refused: {host} is not a public address; list it in IMAGE_HOSTS to fetch from a private "
                       "image server")  # fmt: skip


# -- one deadline per fetch, enforced at every socket read -----------------------------------------

_deadline = threading.local()


def _time_left() -> float | None:
    end = getattr(_deadline, "end", None)
    if end is None:
        return None
    left = end - time.monotonic()
    if left <= 0:
        raise TimeoutError("the fetch's deadline passed")
    return left


class _UnderDeadline:
    """Every receive and send waits at most until the calling thread's fetch deadline (mixed into the plain
    and the TLS socket class)."""

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        self._wait_at_most_what_is_left()
        return super().recv_into(*args, **kwargs)  # type: ignore[misc]

    def sendall(self, *args: Any, **kwargs: Any) -> None:
        self._wait_at_most_what_is_left()
        return super().sendall(*args, **kwargs)  # type: ignore[misc]

    def _wait_at_most_what_is_left(self) -> None:
        left = _time_left()
        if left is not None:
            self.settimeout(left)  # type: ignore[attr-defined]


class _DeadlineSocket(_UnderDeadline, socket.socket):
    pass


class _DeadlineSSLSocket(_UnderDeadline, ssl.SSLSocket):
    pass


def _open_socket(addresses: list[Address], options: Any, default_timeout: float) -> socket.socket:
    """Connect to the first of the checked addresses that answers (within the deadline)."""
    last: OSError | None = None
    for family, sockaddr in addresses:
        sock = _DeadlineSocket(family, socket.SOCK_STREAM)
        try:
            for option in options or ():
                sock.setsockopt(*option)
            left = _time_left()
            sock.settimeout(default_timeout if left is None else left)
            sock.connect(sockaddr)
            left = _time_left()  # the TLS handshake, if any, runs under what is left
            if left is not None:
                sock.settimeout(left)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last or OSError("no address to connect to")


class _GuardedConnectionMixin:
    guard: OutboundGuard  # set on the per-client subclasses
    host: str
    port: int
    socket_options: Any
    timeout: Any

    def _new_conn(self) -> socket.socket:
        addresses = self.guard.addresses(self.host, self.port)  # FetchError / Refused go straight up
        timeout = self.timeout if isinstance(self.timeout, int | float) else 10.0
        try:
            return _open_socket(addresses, self.socket_options, timeout)
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"connecting to {self.host} timed out") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"cannot connect to {self.host}: {_os_reason(exc)}") from exc  # type: ignore[arg-type]


def _os_reason(exc: BaseException) -> str:
    names = {errno.ECONNREFUSED: "connection refused", errno.ECONNRESET: "connection reset",
             errno.EHOSTUNREACH: "host unreachable", errno.ENETUNREACH: "network unreachable",
             errno.ECONNABORTED: "connection aborted", errno.EPIPE: "connection closed"}  # fmt: skip
    if isinstance(exc, OSError) and exc.errno in names:
        return names[exc.errno]
    return type(exc).__name__


def _root_cause(exc: BaseException) -> BaseException:
    seen = 0
    while seen < 10:
        inner = exc.args[1] if isinstance(exc, ProtocolError) and len(exc.args) > 1 else None
        inner = inner if isinstance(inner, BaseException) else (exc.__cause__ or exc.__context__)
        if inner is None:
            return exc
        exc, seen = inner, seen + 1
    return exc


class HttpClient:
    """GET with the guard, the deadline and the byte limit. Thread-safe: each thread keeps its own pools."""

    def __init__(
        self, guard: OutboundGuard, timeout: float, max_bytes: int, max_redirects: int = MAX_REDIRECTS
    ) -> None:
        self.guard = guard
        self.timeout = timeout  # seconds for a whole fetch, redirects included
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self._timeouts = urllib3.Timeout(connect=timeout, read=timeout)  # the deadline is tighter
        self._local = threading.local()
        self._ssl_lock = threading.Lock()
        self._ssl_context: ssl.SSLContext | None = None
        http_conn = type("GuardedHTTPConnection", (_GuardedConnectionMixin, HTTPConnection), {"guard": guard})
        https_conn = type("GuardedHTTPSConnection", (_GuardedConnectionMixin, HTTPSConnection), {"guard": guard})
        self._pool_classes = {
            "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
        }

    # -- public ------------------------------------------------------------------------------------

    def get(self, url: str, headers: Mapping[str, str] | None = None) -> Response:
        """The response to GET `url`, redirects followed, whatever its status (the caller decides what it
        means). FetchError for everything else: refused, unreachable, too slow, too big, bad redirects."""
        with self._deadline():
            return self._get(url, dict(headers or {}))

    def post_json(self, url: str, payload: Any, limit: int = SMALL_BODY) -> tuple[int, bytes]:
        """POST a JSON body, no redirect followed (a redirected POST would carry the body elsewhere)."""
        body = json.dumps(payload).encode()
        with self._deadline():
            resp = self._send("POST", url, {"Content-Type": "application/json"}, body)
            return resp.status, self._read_body(url, resp, limit)

    # -- internals ---------------------------------------------------------------------------------

    def _deadline(self) -> _DeadlineScope:
        return _DeadlineScope(self.timeout)

    def _pools(self) -> urllib3.PoolManager:
        pools = getattr(self._local, "pools", None)
        if pools is None:
            pools = urllib3.PoolManager(num_pools=16, maxsize=1, block=False, ssl_context=self._context())
            pools.pool_classes_by_scheme = self._pool_classes
            self._local.pools = pools
        return pools

    def _context(self) -> ssl.SSLContext:
        with self._ssl_lock:
            if self._ssl_context is None:
                context = ssl.create_default_context()  # system CAs; SSL_CERT_FILE / SSL_CERT_DIR honoured
                context.sslsocket_class = _DeadlineSSLSocket
                self._ssl_context = context
            return self._ssl_context

    def _get(self, url: str, headers: dict[str, str]) -> Response:
        first = _origin_or_refuse("GET", url) if headers else None
        visited = {url}
        for hop in range(self.max_redirects + 1):
            if headers and hop and _origin_or_refuse("GET", url) != first:
                headers = {}  # the origin changed: the caller's headers are dropped for good
            resp = self._send("GET", url, headers)
            location = resp.headers.get("Location") if resp.status in REDIRECTS else None
            if not location:
                return Response(resp.status, self._read_body(url, resp, self.max_bytes), url)
            self._discard(resp)
            target = urljoin(url, location.strip())
            if _origin_or_refuse("GET", url)[0] == "https" and _origin_or_refuse("GET", target)[0] == "http":
                raise Refused(f"GET {redact_url(url)}: refused a redirect from https to http ({redact_url(target)})")
            if target in visited:
                raise FetchError(f"GET {redact_url(url)}: redirect loop (back to {redact_url(target)})")
            if hop == self.max_redirects:
                break
            visited.add(target)
            url = target
        raise FetchError(f"GET {redact_url(url)} failed: more than {self.max_redirects} redirects")

    def _send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None = None) -> Any:
        try:
            target = connection_target(url)
        except UnclearUrl as exc:
            raise Refused(f"{method} {redact_url(url)} refused: {exc}") from None
        except ValueError as exc:
            raise FetchError(f"{method} {redact_url(url)} failed: {_unreadable(exc)}") from None
        if target.scheme not in ("http", "https") or not target.host:
            raise FetchError(f"{method} {redact_url(url)} failed: not an http(s) URL")
        all_headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
        for attempt in range(2):
            try:
                return self._pools().urlopen(
                    method, url, body=body, headers=all_headers, redirect=False, retries=False,
                    preload_content=False, decode_content=False, assert_same_host=False,
                    timeout=self._timeouts,
                )  # fmt: skip
            except FetchError as exc:  # from the guard: say which request
                raise type(exc)(f"{method} {redact_url(url)} {exc}", transient=exc.transient) from None
            except (HTTPError, OSError) as exc:
                # A kept-alive connection the server closed while idle fails once; a fresh one follows.
                if attempt == 0 and _stale(exc) and not _DeadlineScope.passed():
                    continue
                raise self._error(method, url, exc) from None
        raise AssertionError("unreachable")

    def _read_body(self, url: str, resp: Any, limit: int) -> bytes:
        complete = False
        try:
            encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise FetchError(f"GET {redact_url(url)}: served with Content-Encoding {encoding[:40]}, "
                                 "not the identity encoding asked for")  # fmt: skip
            declared = resp.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                raise FetchError(f"{redact_url(url)} is {int(declared)} bytes, over the {limit}-byte limit "
                                 "(IMAGE_MAX_BYTES)")  # fmt: skip
            body = resp.read(limit + 1, decode_content=False)
            if len(body) > limit:
                raise FetchError(f"{redact_url(url)} is over the {limit}-byte limit (IMAGE_MAX_BYTES)")
            # At the end of the body the connection can be used again (a read of nothing says so).
            complete = resp.closed or not resp.read(1, decode_content=False)
            return body
        except FetchError:
            raise
        except (HTTPError, OSError) as exc:
            raise self._error("GET", url, exc) from None
        finally:
            self._release(resp, complete)

    def _discard(self, resp: Any) -> None:
        """A redirect's body: read when small (the connection is kept), else the connection is closed."""
        declared = resp.headers.get("Content-Length", "")
        complete = False
        if declared.isdigit() and int(declared) <= SMALL_BODY:
            try:
                resp.read(int(declared) + 1, decode_content=False)
                complete = True
            except (HTTPError, OSError):
                pass
        self._release(resp, complete)

    @staticmethod
    def _release(resp: Any, complete: bool) -> None:
        if not complete:
            resp.close()  # closes the connection: nothing unread is left on it for the next request
        resp.release_conn()

    def _error(self, method: str, url: str, exc: BaseException) -> FetchError:
        shown = f"{method} {redact_url(url)}"
        if isinstance(exc, LocationParseError):
            return FetchError(f"{shown} failed: not a valid URL")
        cause = _root_cause(exc)
        if isinstance(exc, NewConnectionError) and not isinstance(cause, TimeoutError):  # a ConnectTimeoutError too
            return FetchError(f"{shown} failed: cannot connect ({_os_reason(cause)})", transient=True)
        if isinstance(exc, ConnectTimeoutError | ReadTimeoutError | TimeoutError) or isinstance(cause, TimeoutError):
            return FetchError(f"{shown} timed out after {self.timeout:g} s (DOWNLOAD_TIMEOUT, the whole fetch)",
                              transient=True)  # fmt: skip
        if isinstance(exc, SSLError) or isinstance(cause, ssl.SSLError):
            return FetchError(f"{shown} failed: TLS: {redact(str(cause))[:200]}")
        if isinstance(cause, ConnectionError | http.client.IncompleteRead):
            return FetchError(f"{shown} failed: {_os_reason(cause)} by the server", transient=True)
        if isinstance(cause, OSError) and cause.errno is not None:
            return FetchError(f"{shown} failed: {_os_reason(cause)}", transient=True)
        reason = redact(str(cause))[:200] or type(cause).__name__
        return FetchError(f"{shown} failed: bad HTTP answer ({type(cause).__name__}: {reason})")


def _stale(exc: BaseException) -> bool:
    cause = _root_cause(exc)
    return isinstance(cause, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError)


class UnclearUrl(ValueError):
    """A URL that two parsers could read as two different places: refused, never fetched."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def connection_target(url: str) -> Url:
    """`url` as urllib3 parses it, which is where it connects. UnclearUrl for a URL that any parser could
    read otherwise: a user name or password (`http://a\\@b/` is host `a` to urllib3, `b` to urllib.parse), a
    backslash before the query, a control character, or scheme, host or port that urllib.parse reads
    differently. ValueError for a URL neither can read."""
    if _CONTROL.search(url):
        raise UnclearUrl("a control character in the URL")
    if "\\" in re.split(r"[?#]", url, maxsplit=1)[0]:
        raise UnclearUrl("a backslash before the URL's query")
    try:
        parsed = parse_url(url)
        parts = urlsplit(url)
    except LocationParseError as exc:
        raise ValueError(str(exc)) from None
    try:
        port = parts.port
    except ValueError:
        raise ValueError("bad port") from None
    if parsed.auth is not None or "@" in parts.netloc:
        raise UnclearUrl("a user name or password in the URL")
    if (
        (parsed.scheme or "") != parts.scheme
        or canonical_host(parsed.host or "") != canonical_host(parts.hostname or "")
        or parsed.port != port
    ):
        raise UnclearUrl("a URL that parsers read as different hosts")
    return parsed


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, canonical host, port with the scheme's default filled in) of where `url` connects.
    UnclearUrl (a ValueError) when that is not clear (`connection_target`)."""
    target = connection_target(url)
    scheme = target.scheme or ""
    return scheme, canonical_host(target.host or ""), target.port or (443 if scheme == "https" else 80)


def _origin_or_refuse(method: str, url: str) -> tuple[str, str, int]:
    try:
        return origin(url)
    except UnclearUrl as exc:
        raise Refused(f"{method} {redact_url(url)} refused: {exc}") from None
    except ValueError as exc:
        raise FetchError(f"{method} {redact_url(url)} failed: {_unreadable(exc)}") from None


def _unreadable(exc: ValueError) -> str:
    return "bad port" if str(exc) == "bad port" else "not a valid URL"


class _DeadlineScope:
    """Sets the calling thread's fetch deadline (the socket reads obey it) for the duration of a fetch."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        self.previous = getattr(_deadline, "end", None)
        _deadline.end = time.monotonic() + self.seconds

    def __exit__(self, *exc: object) -> None:
        _deadline.end = self.previous

    @staticmethod
    def passed() -> bool:
        end = getattr(_deadline, "end", None)
        return end is not None and time.monotonic() >= end
