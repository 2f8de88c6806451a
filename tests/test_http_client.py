"""The download client against a real HTTP/1.1 server on loopback: keep-alive, idle connections the server
closed, redirects, chunked bodies, limits."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
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


def serve(tls: ssl.SSLContext | None = None) -> tuple[http.server.ThreadingHTTPServer, str, list[int]]:
    connections: list[int] = []
    handler = type("Handler", (_Handler,), {"connections": connections})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"{'https' if tls else 'http'}://127.0.0.1:{httpd.server_address[1]}", connections


@pytest.fixture
def server() -> Iterator[tuple[str, list[int]]]:
    httpd, url, connections = serve()
    yield url, connections
    httpd.shutdown()
    httpd.server_close()


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


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


def test_https_verifies_the_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cert, key = self_signed_certificate(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    httpd, url, connections = serve(tls)
    try:
        with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED"):
            KeepAliveClient(timeout=5, max_bytes=10_000).get(f"{url}/file")
        # Trusted through the variable OpenSSL reads, as a user with a private CA would set it.
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        client = KeepAliveClient(timeout=5, max_bytes=10_000)
        assert [client.get(f"{url}/file").body for _ in range(3)] == [BODY] * 3
        assert len(connections) == 1  # kept alive (the refused handshake never reached a handler)
    finally:
        httpd.shutdown()
        httpd.server_close()
