"""Real HTTP servers on loopback for the image-fetching tests: HTTP/1.1 with keep-alive, routes added per
test, every request and connection recorded; TLS with a self-signed certificate; a hosts-file resolver."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import http.server
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common.settings import Settings
from worker.http_client import Address, system_resolver

Route = Callable[["Handler"], None]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as nginx, S3 and gunicorn serve
    disable_nagle_algorithm = True
    server: Server.HTTPD

    def setup(self) -> None:
        super().setup()
        self.server.owner.connections += 1

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        owner = self.server.owner
        owner.requests.append((self.command, self.path, dict(self.headers)))
        route = owner.routes.get(self.path) or owner.routes.get(self.path.split("?")[0])
        if route is None:
            send(self, 404, b"not found")
        else:
            route(self)

    def log_message(self, *args: Any) -> None:
        pass


def send(handler: Handler, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
         content_length: bool = True) -> None:  # fmt: skip
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    if content_length:
        handler.send_header("Content-Length", str(len(body)))
    else:
        handler.send_header("Connection", "close")
        handler.close_connection = True
    handler.end_headers()
    with contextlib.suppress(OSError):  # the client may have given up (deadline, size limit)
        handler.wfile.write(body)


def respond(body: bytes, status: int = 200, content_type: str = "image/png", **kwargs: Any) -> Route:
    return lambda h: send(h, status, body, {"Content-Type": content_type}, **kwargs)


def redirect(location: str, status: int = 302) -> Route:
    return lambda h: send(h, status, b"", {"Location": location})


class Server:
    """A threaded HTTP/1.1 server on `host` (127.0.0.1 or ::1), optionally over TLS."""

    class HTTPD(http.server.ThreadingHTTPServer):
        daemon_threads = True
        owner: Server

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # clients that hang up (limits, deadlines, refused certificates) are what these tests do

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.connections = 0
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        httpd_class = type("HTTPD", (Server.HTTPD,), {"address_family": family})
        self.httpd = httpd_class((host, 0), Handler)
        self.httpd.owner = self
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if tls else 'http'}://{shown}:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def hits(self, path: str) -> list[dict[str, str]]:
        """The headers of each request for `path` (query ignored)."""
        return [h for _, p, h in self.requests if p.split("?")[0] == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def running(*args: Any, **kwargs: Any) -> Iterator[Server]:
    server = Server(*args, **kwargs)
    try:
        yield server
    finally:
        server.close()


def settings(**changes: Any) -> Settings:
    return dataclasses.replace(Settings(), **changes)


def hosts(mapping: dict[str, str]) -> Callable[[str, int], list[Address]]:
    """A resolver for the guard that answers like an /etc/hosts file for `mapping`, and asks the system
    for every other name."""

    def resolve(host: str, port: int) -> list[Address]:
        if host in mapping:
            ip = ipaddress.ip_address(mapping[host])
            return [(socket.AF_INET6, (str(ip), port, 0, 0)) if ip.version == 6 else (socket.AF_INET, (str(ip), port))]
        return system_resolver(host, port)

    return resolve


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, its own CA (trust it through SSL_CERT_FILE)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def tls_context(folder: Path) -> tuple[ssl.SSLContext, Path]:
    cert, key = self_signed_certificate(folder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert
