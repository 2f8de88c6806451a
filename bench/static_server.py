"""A lean static file server for the benchmarks: HTTP/1.1 with keep-alive, GET and HEAD only, one asyncio
loop. It stands in for what serves images in production (nginx, S3 or MinIO, Label Studio behind a
proxy), which keep connections open. Python's `http.server` closes the connection after every response
and spends about 1 ms of CPU per image on the machine it shares with the worker: a cost of the test
rig, not of the service, so the throughput figures would measure the rig.

    python bench/static_server.py ROOT      # prints its URL, then serves ROOT until killed
"""

from __future__ import annotations

import asyncio
import mimetypes
import sys
from pathlib import Path
from urllib.parse import unquote

MAX_HEADER_BYTES = 64 * 1024


class StaticFiles(asyncio.Protocol):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            self.respond(head)
        if len(self.buffer) > MAX_HEADER_BYTES and self.transport:
            self.transport.close()

    def respond(self, head: bytes) -> None:
        assert self.transport is not None
        request_line, _, headers = head.partition(b"\r\n")
        parts = request_line.split(b" ")
        close = b"connection: close" in headers.lower() or (len(parts) == 3 and parts[2] == b"HTTP/1.0")
        status, body, kind = self.lookup(parts)
        self.transport.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n".encode()
            + (b"" if parts[0] == b"HEAD" else body)
        )
        if close:
            self.transport.close()

    def lookup(self, parts: list[bytes]) -> tuple[str, bytes, str]:
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"", "text/plain"
        relative = unquote(parts[1].decode("latin-1").split("?", 1)[0]).lstrip("/")
        path = self.root / relative  # not resolved: the root's links (to the shared images) are followed
        if ".." in Path(relative).parts or not path.is_file():
            return "404 Not Found", b"not found\n", "text/plain"
        return "200 OK", path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"


async def serve(root: Path) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StaticFiles(root), "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(f"http://127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1]).resolve()))
