"""What a download costs the worker, per HTTP client: CPU milliseconds per image of the downloading process
(the image server runs in a process of its own, `bench/static_server.py`, keep-alive, on loopback), wall
milliseconds per image, one thread and DOWNLOAD_WORKERS-like four threads, over the real particles.

    .venv/bin/python bench/http_clients.py [--count 2000] [--rounds 3]

Rows: the hand-written `http.client` client the worker used before the outbound guard (read from git at
BEFORE, when git has it), bare `http.client` on a kept-alive connection (a floor), bare urllib3, the
worker's `HttpClient` (urllib3 + address guard + deadline), `ImageFetcher.fetch` over HTTP (what a
download thread calls), and `ImageFetcher.fetch` of a `/data/local-files/` path read from disk
(LOCAL_FILES_DOCUMENT_ROOT). Compare with the model's own CPU per image (README "Throughput").
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import urllib3  # noqa: E402

from common.settings import Settings  # noqa: E402
from tests.helpers import DATA  # noqa: E402
from worker.http_client import HttpClient, OutboundGuard  # noqa: E402
from worker.images import ImageFetcher  # noqa: E402

BEFORE = "62eee77"  # the last commit with the hand-written client


def old_client_class() -> type | None:
    try:
        source = subprocess.run(["git", "show", f"{BEFORE}:worker/http_client.py"], cwd=REPO, capture_output=True,
                                check=True, text=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "old_http_client.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_http_client", path)
    module = sys.modules["old_http_client"] = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.KeepAliveClient


def bare_http_client() -> Callable[[str], bytes]:
    local = threading.local()

    def get(url: str) -> bytes:
        conn = getattr(local, "conn", None)
        if conn is None:
            host, port = url.split("/")[2].split(":")
            conn = local.conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/" + url.split("/", 3)[3])
        return conn.getresponse().read()

    return get


def bare_urllib3() -> Callable[[str], bytes]:
    local = threading.local()

    def get(url: str) -> bytes:
        pools = getattr(local, "pools", None) or setattr(local, "pools", urllib3.PoolManager(maxsize=1)) or local.pools
        resp = pools.urlopen("GET", url, redirect=False, retries=False, preload_content=False, decode_content=False)
        body = resp.read(20_000_001)
        resp.release_conn()
        return body

    return get


def measure(get: Callable[[str], bytes], refs: list[str], threads: int) -> tuple[float, float]:
    """(CPU ms per image of this process, wall ms per image)."""
    for ref in refs[:50]:  # warm: connections open, code paths loaded
        get(ref)
    cpu, wall = time.process_time(), time.perf_counter()
    if threads == 1:
        sizes = [len(get(r)) for r in refs]
    else:
        with ThreadPoolExecutor(threads) as pool:
            sizes = list(pool.map(lambda r: len(get(r)), refs))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert all(sizes), "every image arrived"
    return 1000 * cpu / len(refs), 1000 * wall / len(refs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    root = DATA / "flowcam"
    names = sorted(p.name for p in (root / "particles").glob("*.png"))[: args.count]
    server = subprocess.Popen([sys.executable, str(REPO / "bench" / "static_server.py"), str(root)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        base = server.stdout.readline().strip()  # type: ignore[union-attr]
        urls = [f"{base}/particles/{n}" for n in names]
        settings = dataclasses.replace(Settings(), image_hosts="127.0.0.1", download_timeout=10.0)
        guard = OutboundGuard.from_settings(settings)
        rows: list[tuple[str, Callable[[str], bytes], list[str]]] = []
        old = old_client_class()
        if old is not None:
            client = old(10.0, settings.image_max_bytes)
            rows.append((f"hand-written http.client client (before, {BEFORE})", lambda u: client.get(u).body, urls))
        rows.append(("bare http.client, kept-alive connection (floor)", bare_http_client(), urls))
        rows.append(("bare urllib3 PoolManager", bare_urllib3(), urls))
        guarded = HttpClient(guard, settings.download_timeout, settings.image_max_bytes)
        rows.append(("HttpClient: urllib3 + guard + deadline (now)", lambda u: guarded.get(u).body, urls))
        fetcher = ImageFetcher(settings)
        rows.append(("ImageFetcher.fetch over HTTP (now)", fetcher.fetch, urls))
        direct = ImageFetcher(dataclasses.replace(settings, local_files_document_root=str(root)))
        local_refs = [f"/data/local-files/?d=particles/{n}" for n in names]
        rows.append(("ImageFetcher.fetch, /data/local-files/ read from disk", direct.fetch, local_refs))

        print(f"{len(names)} particles, {args.rounds} rounds (median), server {base} in its own process\n")
        print(
            "| client | CPU ms/img, 1 thread | wall ms/img, 1 thread | CPU ms/img, 4 threads | wall ms/img, 4 threads |"
        )
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, get, refs in rows:
            figures = []
            for threads in (1, 4):
                runs = [measure(get, refs, threads) for _ in range(args.rounds)]
                figures += [statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)]
            print(f"| {name} | " + " | ".join(f"{f:.3f}" for f in figures) + " |", flush=True)
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
