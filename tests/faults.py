"""Faults on purpose, around real parts: a proxy in front of a real Label Studio that can go down or answer
5xx, a relay for its webhooks that drops or repeats them, and a private Redis with an append-only file
that can be killed and restarted. Used by the interleaving test and bench/chaos.py.

These are the only stand-ins of the suite, and each wraps the real service: Label Studio itself cannot be
told to refuse connections for a minute, and its webhooks cannot be told to get lost.
"""

from __future__ import annotations

import http.client
import http.server
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from tests.helpers import REPO, ChildProcess, free_port, wait_until

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
              "proxy-authenticate", "content-length", "host"}  # fmt: skip

# What the webhook relay does with one webhook: "pass", "drop" (lost, as when the backend was down), "twice".
WebhookPolicy = Callable[[str], str]


class FaultProxy:
    """Forwards every request to `upstream`. `down()` closes the port (connection refused), `errors()` makes
    every answer a 503, `up()` heals. With a `webhook_policy`, POSTs to /webhook are dropped or sent twice
    as it decides (Label Studio posts each webhook once and never retries, so a drop is a lost event)."""

    def __init__(self, upstream: str, webhook_policy: WebhookPolicy | None = None, port: int | None = None) -> None:
        self.upstream = urlsplit(upstream)
        self.webhook_policy = webhook_policy
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.failing = False
        self.counts: Counter[str] = Counter()
        self.httpd: http.server.ThreadingHTTPServer | None = None
        self.up()

    def up(self) -> None:
        self.failing = False
        if self.httpd is not None:
            return
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.failing:
                    proxy.counts["503"] += 1
                    return self._answer(503, {"Content-Type": "application/json"}, b'{"detail": "down on purpose"}')
                times = 1
                webhook = self.command == "POST" and self.path.split("?")[0].rstrip("/") == "/webhook"
                if proxy.webhook_policy and webhook:
                    action = proxy.webhook_policy(body.decode(errors="replace"))
                    proxy.counts[f"webhook {action}"] += 1
                    if action == "drop":
                        return self._answer(200, {"Content-Type": "application/json"}, b'{"status": "dropped"}')
                    times = 2 if action == "twice" else 1
                for _ in range(times):
                    status, headers, reply = proxy.forward(self.command, self.path, dict(self.headers), body)
                self._answer(status, headers, reply)

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _any  # noqa: N815

        def quiet(self: Any, request: Any, client_address: Any) -> None:
            """A client gone (closed while we were down): nothing to report."""

        server_class = type("Server", (http.server.ThreadingHTTPServer,), {"request_queue_size": 256,
                                                                            "handle_error": quiet})  # fmt: skip
        self.httpd = server_class(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True, name=f"proxy {self.port}").start()

    def down(self) -> None:
        """Connection refused from now on, until `up()`."""
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def errors(self) -> None:
        self.up()
        self.failing = True

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=120)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
            sent["Host"] = self.upstream.netloc
            conn.request(method, path, body=body or None, headers=sent)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        except OSError as exc:
            return 502, {"Content-Type": "text/plain"}, f"upstream failed: {exc}".encode()
        finally:
            conn.close()

    def close(self) -> None:
        self.down()


def random_webhook_policy(seed: int, drop: float, twice: float) -> WebhookPolicy:
    rng = random.Random(seed)
    lock = threading.Lock()

    def decide(_body: str) -> str:
        with lock:
            x = rng.random()
        return "drop" if x < drop else "twice" if x < drop + twice else "pass"

    return decide


class RedisServer(ChildProcess):
    """A private redis-server with an append-only file (fsync every second, as deployments run it), on its
    own port, so it can be killed and restarted without touching the machine's Redis."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log")],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

        def answers() -> bool:
            try:
                return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
            except redis.RedisError:
                return False

        wait_until(answers, 30, "redis-server to start", interval=0.1)
        return self

    def restart(self, pause: float = 1.0) -> None:
        """Killed (SIGKILL: no last save), then started again on its append-only file."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        time.sleep(pause)
        self.start()
