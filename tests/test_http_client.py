"""The download client against real HTTP/1.1 servers on loopback (allowed explicitly: loopback is refused by
default): keep-alive per thread, idle connections the server closed, redirects (bounded, no loops, no https
to http), chunked bodies, byte limits, one deadline per fetch, TLS verification."""

from __future__ import annotations

import pickle
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.redact import redact, redact_url
from tests.servers import Handler, Server, redirect, respond, running, send, tls_context
from worker.http_client import FetchError, HttpClient, OutboundGuard, Refused

BODY = b"particle bytes " * 100
LOOPBACK = OutboundGuard([("127.0.0.1", None)])


def client(timeout: float = 5, max_bytes: int = 10_000, guard: OutboundGuard = LOOPBACK) -> HttpClient:
    return HttpClient(guard, timeout=timeout, max_bytes=max_bytes)


def chunked(handler: Handler) -> None:
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    for part in (BODY[:700], BODY[700:]):
        handler.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
    handler.wfile.write(b"0\r\n\r\n")


def then_close(handler: Handler) -> None:
    send(handler, 200, BODY)  # keep-alive promised, then the connection closed, as with an idle one
    handler.close_connection = True


@pytest.fixture
def server() -> Iterator[Server]:
    with running() as srv:
        srv.routes.update({
            "/file": respond(BODY), "/redirect": redirect("/file"), "/loop": redirect("/loop"),
            "/missing": respond(b"no such image", 404), "/chunked": chunked, "/then-close": then_close,
        })  # fmt: skip
        yield srv


def test_one_connection_serves_many_images(server: Server):
    http = client()
    for _ in range(20):
        assert http.get(f"{server.url}/file").body == BODY
    assert server.connections == 1


def test_each_thread_keeps_its_own_connection(server: Server):
    http = client()
    with ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda _: http.get(f"{server.url}/file").body, range(200)))
    assert bodies == [BODY] * 200
    assert 1 <= server.connections <= 4


def test_a_connection_the_server_closed_is_opened_again(server: Server):
    http = client()
    assert http.get(f"{server.url}/then-close").body == BODY
    time.sleep(0.2)  # the server has closed it; the client does not know yet
    assert http.get(f"{server.url}/file").body == BODY
    assert server.connections == 2


def test_redirects_are_followed_and_bounded(server: Server):
    http = client()
    resp = http.get(f"{server.url}/redirect")
    assert (resp.status, resp.body, resp.url) == (200, BODY, f"{server.url}/file")
    for i in range(7):
        server.routes[f"/chain{i}"] = redirect(f"/chain{i + 1}")
    server.routes["/chain7"] = respond(BODY)
    with pytest.raises(FetchError, match="more than 5 redirects") as exc:
        http.get(f"{server.url}/chain0")
    assert not exc.value.transient
    server.routes["/chain6"] = respond(BODY)  # five redirects are fine
    assert http.get(f"{server.url}/chain1").body == BODY


@pytest.mark.parametrize("start", ["/loop", "/ping"])
def test_redirect_loops_are_refused(server: Server, start: str):
    server.routes.update({"/ping": redirect("/pong"), "/pong": redirect("/ping")})
    with pytest.raises(FetchError, match="redirect loop") as exc:
        client().get(server.url + start)
    assert not exc.value.transient
    assert len(server.hits(start)) == 1  # refused when it comes round, not after the redirect limit


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/a.png", "gopher://127.0.0.1:6379/_INFO"])
def test_redirects_to_other_schemes_are_refused(server: Server, location: str):
    server.routes["/elsewhere"] = redirect(location)
    with pytest.raises(FetchError, match="not an http\\(s\\) URL") as exc:
        client().get(f"{server.url}/elsewhere")
    assert not exc.value.transient


def test_chunked_body_and_error_status_keep_the_connection(server: Server):
    http = client()
    assert http.get(f"{server.url}/chunked").body == BODY
    missing = http.get(f"{server.url}/missing")
    assert (missing.status, missing.body) == (404, b"no such image")
    assert http.get(f"{server.url}/file").body == BODY
    assert server.connections == 1


def test_limits_apply_to_declared_and_chunked_bodies(server: Server):
    http = client(max_bytes=1000)
    with pytest.raises(FetchError, match=r"is 1500 bytes, over the 1000-byte limit"):
        http.get(f"{server.url}/file")
    with pytest.raises(FetchError, match=r"over the 1000-byte limit"):
        http.get(f"{server.url}/chunked")
    assert http.get(f"{server.url}/missing").body == b"no such image"  # still usable


def test_flooding_body_without_length_stops_at_the_limit(server: Server):
    def flood(handler: Handler) -> None:
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        try:
            for _ in range(100_000):  # up to 6.4 GB, unless the client hangs up
                handler.wfile.write(b"x" * 65536)
        except OSError:
            pass
        handler.close_connection = True

    server.routes["/flood"] = flood
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"over the 100000-byte limit") as exc:
        client(max_bytes=100_000).get(f"{server.url}/flood")
    assert time.monotonic() - start < 2 and not exc.value.transient


@pytest.mark.parametrize("kind", ["many headers", "endless header line"])
def test_flooding_headers_are_a_bad_answer(server: Server, kind: str):
    def flood(handler: Handler) -> None:
        handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
        try:
            if kind == "many headers":
                for i in range(5000):
                    handler.wfile.write(f"X-Flood-{i}: {'y' * 50}\r\n".encode())
            else:
                handler.wfile.write(b"X-Flood: " + b"y" * 1_000_000)
        except OSError:
            pass
        handler.close_connection = True

    server.routes["/flood-headers"] = flood
    with pytest.raises(FetchError, match="bad HTTP answer") as exc:
        client().get(f"{server.url}/flood-headers")
    assert not exc.value.transient


@pytest.mark.parametrize("where", ["headers", "body"])
def test_one_deadline_for_the_whole_fetch_against_a_slow_drip(server: Server, where: str):
    """Each byte comes well within any per-read timeout; the fetch as a whole still ends at its deadline."""
    stop = threading.Event()

    def drip(handler: Handler) -> None:
        try:
            handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
            if where == "body":
                handler.wfile.write(b"Content-Length: 5000\r\n\r\n")
            for _ in range(200):
                if stop.wait(0.1):
                    break
                handler.wfile.write(b"X-Drip: 1\r\n" if where == "headers" else b"x")
                handler.wfile.flush()
        except OSError:
            pass
        handler.close_connection = True

    server.routes["/drip"] = drip
    start = time.monotonic()
    try:
        with pytest.raises(FetchError, match=r"timed out after 1 s \(DOWNLOAD_TIMEOUT, the whole fetch\)") as exc:
            client(timeout=1).get(f"{server.url}/drip")
    finally:
        stop.set()
    assert 0.9 < time.monotonic() - start < 1.6
    assert exc.value.transient


def test_the_deadline_covers_redirects_and_a_server_that_never_answers():
    with socket.socket() as silent:  # accepts connections (the kernel does) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        with running() as srv:
            srv.routes["/go"] = redirect(f"http://127.0.0.1:{silent.getsockname()[1]}/never")
            start = time.monotonic()
            with pytest.raises(FetchError, match="timed out after 0.5 s") as exc:
                client(timeout=0.5).get(f"{srv.url}/go")
            assert time.monotonic() - start < 1.0 and exc.value.transient


def test_connection_refused_by_an_allowed_host_is_transient():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(FetchError, match=r"failed: cannot connect \(connection refused\)") as exc:
            client().get(f"http://127.0.0.1:{port}/a.png")
    assert exc.value.transient


def test_content_encoding_is_refused(server: Server):
    server.routes["/gz"] = lambda h: send(h, 200, b"\x1f\x8b...", {"Content-Encoding": "gzip"})
    with pytest.raises(FetchError, match="Content-Encoding gzip"):
        client().get(f"{server.url}/gz")
    assert server.requests[-1][2].get("Accept-Encoding") == "identity"


def test_headers_go_only_to_the_first_origin():
    with running() as first, running() as other:
        first.routes["/same"] = redirect("/final")
        first.routes["/final"] = respond(b"ok")
        first.routes["/away"] = redirect(f"{other.url}/back")
        other.routes["/back"] = redirect(f"{first.url}/final")
        http = client()
        assert http.get(f"{first.url}/same", {"Authorization": "Token t"}).body == b"ok"
        assert [h.get("Authorization") for h in first.hits("/same") + first.hits("/final")] == ["Token t"] * 2
        assert http.get(f"{first.url}/away", {"Authorization": "Token t"}).body == b"ok"
        assert "Authorization" not in other.hits("/back")[0]
        assert "Authorization" not in first.hits("/final")[-1]  # back on the first origin: still dropped


def test_https_verifies_the_certificate_and_refuses_a_downgrade(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    context, cert = tls_context(tmp_path)
    with running(tls=context) as secure, running() as plain:
        secure.routes["/file"] = respond(BODY)
        secure.routes["/down"] = redirect(f"{plain.url}/file")
        plain.routes["/file"] = respond(BODY)
        with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED") as exc:
            client().get(f"{secure.url}/file")
        assert not exc.value.transient
        # Trusted through the variable OpenSSL reads, as a user with a private CA would set it.
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        http = client()
        assert [http.get(f"{secure.url}/file").body for _ in range(3)] == [BODY] * 3
        assert secure.connections == 1  # kept alive (the refused handshake never reached a handler)
        with pytest.raises(Refused, match="refused a redirect from https to http"):
            http.get(f"{secure.url}/down")
        assert plain.hits("/file") == []


def test_a_tls_server_that_stalls_the_handshake_hits_the_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        start = time.monotonic()
        with pytest.raises(FetchError, match="timed out after 0.5 s"):
            client(timeout=0.5).get(f"https://127.0.0.1:{silent.getsockname()[1]}/a.png")
        assert time.monotonic() - start < 1.0


def test_post_json_does_not_follow_redirects(server: Server):
    server.routes["/token"] = redirect(f"{server.url}/file", 307)
    status, body = client().post_json(f"{server.url}/token", {"refresh": "secret"})
    assert status == 307 and body == b""
    assert server.hits("/file") == []


def test_errors_pickle_with_their_flag():
    error = pickle.loads(pickle.dumps(FetchError("GET x timed out", transient=True)))
    assert (str(error), error.transient) == ("GET x timed out", True)


@pytest.mark.parametrize(
    ("url", "shown"),
    [("http://user:pw@host:8080/a.png?token=abc&d=x/y.png#frag", "http://***@host:8080/a.png?token=***&d=x/y.png"),
     ("https://s3.example/b/k.png?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA", "https://s3.example/b/k.png?X-Amz-Signature=***&X-Amz-Credential=***"),
     ("/data/local-files/?d=flowcam/a.tif", "/data/local-files/?d=flowcam/a.tif"),
     ("/tasks/3/presign/?fileuri=czM6Ly9h", "/tasks/3/presign/?fileuri=czM6Ly9h")],
)  # fmt: skip
def test_redaction(url: str, shown: str):
    assert redact_url(url) == shown
    text = f"GET {url} failed, key sekrit-key-1 in it"
    redacted = redact(text, ["sekrit-key-1"])
    assert shown in redacted and "sekrit-key-1" not in redacted
