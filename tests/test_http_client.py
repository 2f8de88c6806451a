"""The download client against a real HTTP/1.1 server on loopback: keep-alive, idle connections the server
closed, redirects, chunked bodies, limits."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from worker.http_client import FetchError, KeepAliveClient

BODY = b"particle bytes " * 100


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as nginx, S3 and gunicorn serve
    disable_nagle_algorithm = True  # as they do: headers and body go in separate writes here
    connections: list[int]

    def setup(self) -> None:
        super().setup()
        self.connections.append(1)

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/file":
            self._send(200, BODY)
        elif self.path == "/redirect":
            self._send(302, b"", {"Location": "/file"})
        elif self.path == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        elif self.path == "/missing":
            self._send(404, b"no such image")
        elif self.path == "/then-close":
            # Keep-alive promised, then the connection closed, as a server does with an idle one.
            self._send(200, BODY)
            self.close_connection = True
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (BODY[:700], BODY[700:]):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, list[int]]]:
    connections: list[int] = []
    handler = type("Handler", (_Handler,), {"connections": connections})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", connections
    httpd.shutdown()
    httpd.server_close()


def test_one_connection_serves_many_images(server):
    url, connections = server
    client = KeepAliveClient(timeout=5, max_bytes=10_000)
    for _ in range(20):
        assert client.get(f"{url}/file").body == BODY
    assert len(connections) == 1


def test_each_thread_keeps_its_own_connection(server):
    url, connections = server
    client = KeepAliveClient(timeout=5, max_bytes=10_000)
    with ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda _: client.get(f"{url}/file").body, range(200)))
    assert bodies == [BODY] * 200
    assert 1 <= len(connections) <= 4


def test_a_connection_the_server_closed_is_opened_again(server):
    url, connections = server
    client = KeepAliveClient(timeout=5, max_bytes=10_000)
    assert client.get(f"{url}/then-close").body == BODY
    time.sleep(0.2)  # the server has closed it; the client does not know yet
    assert client.get(f"{url}/file").body == BODY
    assert len(connections) == 2


def test_redirects_are_followed_and_bounded(server):
    url, _ = server
    client = KeepAliveClient(timeout=5, max_bytes=10_000)
    assert client.get(f"{url}/redirect").body == BODY
    with pytest.raises(FetchError, match="more than 3 redirects"):
        client.get(f"{url}/loop")


def test_chunked_body_and_error_status_keep_the_connection(server):
    url, connections = server
    client = KeepAliveClient(timeout=5, max_bytes=10_000)
    assert client.get(f"{url}/chunked").body == BODY
    missing = client.get(f"{url}/missing")
    assert (missing.status, missing.body) == (404, b"no such image")
    assert client.get(f"{url}/file").body == BODY
    assert len(connections) == 1


def test_limits_apply_to_declared_and_chunked_bodies(server):
    url, _ = server
    client = KeepAliveClient(timeout=5, max_bytes=1000)
    with pytest.raises(FetchError, match=r"is 1500 bytes, over the 1000-byte limit"):
        client.get(f"{url}/file")
    with pytest.raises(FetchError, match=r"over the 1000-byte limit"):
        client.get(f"{url}/chunked")
    # The client is still usable after an error.
    assert client.get(f"{url}/missing").body == b"no such image"
