"""Throughput and responsiveness of the backend on the real FlowCam particles, all measured in one run.

What it measures, on the same images, backbone, input size, batch size and device:

1. model-only   images/s of `worker.embedder.Embedder` over particles already decoded and preprocessed in
                memory (after a warm-up batch): the ceiling for the whole service on this machine.
2. end-to-end   images/s of a real import: the particles served over HTTP on loopback, the gunicorn API and
                one Celery worker as subprocesses, one TASKS_CREATED webhook with all N tasks, timed until
                GET /jobs/<job> says done. The worker runs without LABEL_STUDIO_URL, so predictions are
                stored in Redis only (no write-back to Label Studio is part of the figure). Redis is a fresh
                database: the content-hash cache holds none of the imported images (checked and printed).
3. peer         the way the original backend worked: each task handled synchronously inside its own
                /predict request, one image at a time (download, decode, preprocess, forward on batch 1).
4. UI           p50/p99 latency of GET /health, POST /setup and POST /predict (an already-predicted task)
                called ~20 times a second during the import.
5. interactive  every ~2 s during the import, /predict for ONE new task (an image not in the import): time
                until its embedding is stored, next to the model's own batch-1 forward time.
6. memory       peak RSS of the worker (main + pool) and the API (master + workers) during the import, and
                the worker's RSS at the start vs the end of the import.

To tell where the time goes it also prints the CPU each process group used in each phase (the machine may
be shared: other processes' use and idle time are shown, and a warning when others were busy), the
Celery task runtimes from the worker's log, and what each step costs for one image, one thread.

Run: `.venv/bin/python bench/throughput.py` (or `make bench`); `--help` lists the options.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import redis  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from flask import Flask, jsonify, request  # noqa: E402
from PIL import Image  # noqa: E402
from werkzeug.serving import WSGIRequestHandler, make_server  # noqa: E402

from common import keys  # noqa: E402
from common.models import embedding_space, image_size  # noqa: E402
from common.settings import Settings, available_cores  # noqa: E402
from common.store import Store  # noqa: E402
from tests.helpers import DATA, ApiProcess, WorkerProcess, wait_until  # noqa: E402
from worker.embedder import Embedder, embedder_from_settings  # noqa: E402
from worker.images import ImageFetcher, decode_image, to_model_input  # noqa: E402

PARTICLES = DATA / "flowcam" / "particles"
LABEL_CONFIG_XML = (DATA / "label_config.xml").read_text()
PID = 1
WARM_TASK_ID = 900_000
PROBE_TASK_BASE = 1_000_000
UI_CALLS_PER_SECOND = 20.0
PROBE_EVERY_SECONDS = 2.0
RSS_EVERY_SECONDS = 0.2
JOB_POLL_SECONDS = 0.2
JOB_POLL_SECONDS_CUDA = 0.05  # an import of 30,000 lasts a few seconds on a GPU
NOISY_CORES = 0.25  # other processes using more than this during a phase make its figures suspect


# -- small helpers ----------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (none once it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def group_rss(pid: int) -> int:
    """RSS of a process and all its descendants, in bytes (0 once it is gone)."""
    total = 0
    for proc in process_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += proc.memory_info().rss
    return total


def mib(n: float) -> float:
    return n / 2**20


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_times_of(procs: Iterable[psutil.Process]) -> tuple[float, float]:
    """User and system CPU seconds of these processes together (those gone meanwhile count 0)."""
    user = system = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = proc.cpu_times()
            user, system = user + t.user, system + t.system
    return user, system


def tree_cpu_times(pid: int) -> tuple[float, float]:
    return cpu_times_of(process_tree(pid))


def own_cpu_times() -> tuple[float, float]:
    """This process only (its threads: UI caller, probes, polling, sampling), not its children."""
    return cpu_times_of([psutil.Process()])


def redis_cpu_times() -> tuple[float, float]:
    return cpu_times_of(p for p in psutil.process_iter(["name"]) if p.info["name"] == "redis-server")


def tree_cpu_seconds(pid: int) -> float:
    return sum(tree_cpu_times(pid))


def own_cpu_seconds() -> float:
    return sum(own_cpu_times())


def redis_cpu_seconds() -> float:
    return sum(redis_cpu_times())


class CpuMeter:
    """Who used the machine's cores during a phase: our processes, redis-server, everything else (the CPU
    is shared with other work), idle, and time the hypervisor stole."""

    def __init__(self, groups: dict[str, Callable[[], float]]) -> None:
        self.groups = {**groups, "redis-server": redis_cpu_seconds}
        self.start_at = 0.0
        self.begin: dict[str, float] = {}
        self.system: Any = None

    def __enter__(self) -> CpuMeter:
        self.start_at = time.monotonic()
        self.begin = {name: read() for name, read in self.groups.items()}
        self.system = psutil.cpu_times()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self.start_at
        end = psutil.cpu_times()
        used = {name: read() - self.begin[name] for name, read in self.groups.items()}
        busy = sum(getattr(end, f) - getattr(self.system, f) for f in ("user", "nice", "system", "irq", "softirq"))
        idle = sum(getattr(end, f) - getattr(self.system, f) for f in ("idle", "iowait"))
        steal = end.steal - self.system.steal
        self.result = {name: v / wall for name, v in used.items()}
        self.result["other processes"] = max(0.0, busy - sum(used.values())) / wall
        self.result["idle"] = idle / wall
        self.result["steal"] = steal / wall
        self.wall = wall

    @staticmethod
    def format(result: dict[str, float]) -> str:
        return ", ".join(f"{name} {v:.2f}" for name, v in result.items())


# -- the particles ----------------------------------------------------------------------------------------


@dataclass
class Particles:
    """The imported particles (their file names and bytes) and a source of images NOT in the import."""

    names: list[str]
    blobs: list[bytes]
    spare: list[Path]
    root: Path = PARTICLES  # the folder the names are in
    import_hashes: set[str] = field(default_factory=set)
    probe_sources: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, count: int, tmp: Path) -> Particles:
        files = sorted(PARTICLES.glob("*.png"))
        if count > len(files):
            return cls.turned(files, count, tmp / "particles")
        chosen = files[:count]
        blobs = [f.read_bytes() for f in chosen]
        out = cls([f.name for f in chosen], blobs, files[count:])
        out.import_hashes = {sha256(b) for b in blobs}
        return out

    @classmethod
    def turned(cls, files: list[Path], count: int, folder: Path) -> Particles:
        """More particles than the shared folder holds (a steady-state import on a GPU): each particle, then
        each turned or mirrored (8 ways), written once into `folder`. Every image is new content, so none
        is a content-cache hit; a particle that looks the same turned (a symmetric one) is skipped."""
        folder.mkdir(parents=True, exist_ok=True)
        names: list[str] = []
        blobs: list[bytes] = []
        seen: set[str] = set()
        turns = [None, *Image.Transpose]
        for turn in turns:
            for f in files:
                data = f.read_bytes()
                if turn is not None:
                    with Image.open(io.BytesIO(data)) as img:
                        data = png(img.transpose(turn))
                digest = sha256(data)
                if digest in seen:
                    continue
                seen.add(digest)
                name = f"{f.stem}-{turn.name.lower() if turn is not None else 'as-is'}.png"
                (folder / name).write_bytes(data)
                names.append(name)
                blobs.append(data)
                if len(names) == count:
                    out = cls(names, blobs, [], root=folder)
                    out.import_hashes = seen
                    return out
        raise SystemExit(f"--count {count}: only {len(names)} different images from {len(files)} particles turned")

    def probe_images(self) -> Iterator[bytes]:
        """Unused particles first; then imported particles mirrored left-right, then turned the other ways
        (new bytes, so a content-cache miss: an import of turned particles already holds some of them)."""
        for path in self.spare:
            data = path.read_bytes()
            if sha256(data) not in self.import_hashes:
                self._used("particles not in the import")
                yield data
        given = set(self.import_hashes)
        for turn in Image.Transpose:
            for blob in self.blobs:
                with Image.open(io.BytesIO(blob)) as img:
                    data = png(img.transpose(turn))
                if (digest := sha256(data)) not in given:
                    given.add(digest)
                    self._used("imported particles mirrored or turned (new content, not in the import or its cache)")
                    yield data

    def _used(self, source: str) -> None:
        if source not in self.probe_sources:
            self.probe_sources.append(source)


class ImageServerProcess:
    """bench/static_server.py (HTTP/1.1, keep-alive, as nginx or S3 serve images) in a process of its own,
    so that serving the images competes with the service under test only for the cores, not for this
    process's GIL (UI caller, probes, sampling).
    Serves `particles/` (a link to the shared folder: nothing is copied) and `probe/` (images not in
    the import, written as needed into a temporary folder outside the repository)."""

    def __init__(self, root: Path, particles: Path = PARTICLES) -> None:
        self.root = root
        (root / "probe").mkdir(parents=True, exist_ok=True)
        (root / "particles").symlink_to(particles)
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "static_server.py"), str(root)], stdout=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.close()
            raise RuntimeError("the image server did not start")

    def particle(self, name: str) -> str:
        return f"{self.url}/particles/{name}"

    def put(self, name: str, data: bytes) -> str:
        (self.root / "probe" / name).write_bytes(data)
        return f"{self.url}/probe/{name}"

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)


# -- 1. model only ----------------------------------------------------------------------------------------


def sync(embedder: Embedder) -> None:
    if embedder.cuda:
        torch.cuda.synchronize(embedder.device)


def model_inputs(blobs: list[bytes], settings: Settings, embedder: Embedder) -> list[np.ndarray]:
    """The particles decoded and preprocessed as the worker's download threads leave them (at their own
    size where the model's device resizes)."""
    size, resize = embedder.image_size, not embedder.resize_on_device
    return [to_model_input(decode_image(b, settings.image_max_pixels), size, resize=resize) for b in blobs]


def _model_process(settings: Settings, blobs: list[bytes], passes: int, barrier: Any, results: Any) -> None:
    """One worker process's share of the model-only figure: its embedder, as the worker builds it."""
    embedder = embedder_from_settings(settings)
    pixels = model_inputs(blobs, settings, embedder)
    embedder.embed(pixels[: embedder.batch_size])  # warm-up batch
    sync(embedder)
    barrier.wait()
    for _ in range(passes):
        barrier.wait()
        embedder.embed(pixels)
        sync(embedder)
        barrier.wait()
    results.put(os.getpid())


def model_passes(settings: Settings, blobs: list[bytes], passes: int) -> tuple[list[float], dict[str, float], float]:
    """Wall seconds of each pass over `blobs`, split among WORKER_CONCURRENCY processes that run at once
    with the worker's threads per process, and the cores they used: the model alone, laid out on the
    cores as the worker lays it out."""
    n = max(1, settings.worker_concurrency)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_model_process, args=(settings, blobs[i::n], passes, barrier, results), daemon=True)
        for i in range(n)
    ]
    for proc in procs:
        proc.start()
    handles = [psutil.Process(p.pid) for p in procs]

    def children_cpu() -> float:
        return sum(sum(h.cpu_times()[:2]) for h in handles)

    barrier.wait(timeout=600)  # every process loaded and warmed up
    runs = []
    with CpuMeter({"model processes": children_cpu, "bench": own_cpu_seconds}) as cpu:
        for _ in range(passes):
            barrier.wait()
            t0 = time.perf_counter()
            barrier.wait()
            runs.append(time.perf_counter() - t0)
    for _ in procs:
        results.get(timeout=60)
    for proc in procs:
        proc.join(timeout=30)
    return runs, cpu.result, cpu.wall


def measure_model(settings: Settings, particles: Particles, server: ImageServerProcess, passes: int) -> dict[str, Any]:
    size = image_size(settings)
    embedder = embedder_from_settings(settings)
    t0 = time.perf_counter()
    pixels = model_inputs(particles.blobs, settings, embedder)
    prep_s = time.perf_counter() - t0
    runs, cpu_cores, cpu_wall = model_passes(settings, particles.blobs, passes)
    model_s = statistics.median(runs)
    one = embedder_from_settings(settings, batch_size=1)
    for x in pixels[:5]:
        one.embed([x])
    sync(one)
    single = []
    for x in pixels[5:65]:
        t = time.perf_counter()
        one.embed([x])
        sync(one)
        single.append(time.perf_counter() - t)
    return {
        "images": len(pixels),
        "image_size": size,
        "batch_size": embedder.batch_size,
        "device": str(embedder.device),
        "device_name": torch.cuda.get_device_name(embedder.device) if embedder.cuda else cpu_name(),
        "torch_threads": settings.threads_per_process(),
        "processes": max(1, settings.worker_concurrency),
        "passes": len(runs),
        "seconds": model_s,
        "images_per_s": len(pixels) / model_s,
        "images_per_s_min": len(pixels) / max(runs),
        "images_per_s_max": len(pixels) / min(runs),
        "cpu_cores": cpu_cores,
        "cpu_ms_per_image": 1000 * cpu_cores["model processes"] * cpu_wall / (passes * len(pixels)),
        "preprocess_seconds": prep_s,
        "preprocess_images_per_s_one_thread": len(pixels) / prep_s,
        "batch1_ms_p50": 1000 * statistics.median(single),
        "batch1_ms_p99": 1000 * pct(single, 99),
        "stages_ms_per_image": stage_costs(settings, particles, server, embedder, pixels),
    }


def stage_costs(
    settings: Settings, particles: Particles, server: ImageServerProcess, embedder: Embedder, pixels: list[np.ndarray]
) -> dict[str, float]:
    """What one image costs in each step the worker takes, one thread, wall ms per image (on a loaded
    machine these are upper bounds). The download's wall time includes the image server's work."""
    n = min(len(particles.names), 500)
    fetcher = ImageFetcher(settings)
    store = Store.from_url(settings.redis_url, embedding_space(settings))
    t0 = time.perf_counter()
    blobs = [fetcher.fetch(server.particle(name)) for name in particles.names[:n]]
    download = time.perf_counter() - t0
    t0 = time.perf_counter()
    batch = embedder.batch_size
    for i in range(0, n, batch):
        store.cached_embeddings([sha256(blob) for blob in blobs[i : i + batch]])
    lookup = time.perf_counter() - t0
    t0 = time.perf_counter()
    model_inputs(blobs, settings, embedder)
    prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    embedder.embed(pixels[:n])
    sync(embedder)
    forward = time.perf_counter() - t0
    return {
        "download (ImageFetcher + loopback server)": 1000 * download / n,
        f"sha256 + Redis cache lookup (one per {batch})": 1000 * lookup / n,
        "decode + preprocess" + (" (resized on the device)" if embedder.resize_on_device else ""): 1000 * prep / n,
        f"forward (batch {batch}, {settings.threads_per_process()} thread(s))": 1000 * forward / n,
    }


# -- 2. the service under test ------------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """RSS of process trees every 0.2 s, PSS every 2 s. Trees are listed again once a second only (listing
    children scans every process of the machine), and PSS is read rarely (parsing smaps of a process with
    torch loaded costs milliseconds): otherwise the sampler would be a load of its own."""

    def __init__(self, groups: dict[str, int]) -> None:
        super().__init__(daemon=True, name="rss")
        self.groups = groups
        self.samples: dict[str, list[int]] = {name: [] for name in groups}
        self.pss: dict[str, list[int]] = {name: [] for name in groups}
        self.stop_event = threading.Event()

    @staticmethod
    def tree(pid: int) -> list[psutil.Process]:
        try:
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def run(self) -> None:
        trees: dict[str, list[psutil.Process]] = {}
        listed = 0.0
        n = 0
        while not self.stop_event.is_set():
            if time.monotonic() - listed > 1.0:
                trees = {name: self.tree(pid) for name, pid in self.groups.items()}
                listed = time.monotonic()
            for name, procs in trees.items():
                rss = pss = 0
                for proc in procs:
                    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                        rss += proc.memory_info().rss
                        if n % 10 == 0:
                            pss += proc.memory_full_info().pss
                self.samples[name].append(rss)
                if n % 10 == 0:
                    self.pss[name].append(pss)
            n += 1
            self.stop_event.wait(RSS_EVERY_SECONDS)

    def peak(self, name: str) -> int:
        return max(self.samples[name], default=0)

    def peak_pss(self, name: str) -> int:
        return max(self.pss[name], default=0)


class UiCaller(threading.Thread):
    """What Label Studio's UI triggers while an import runs: /health, /setup, /predict of a predicted task."""

    def __init__(self, api: str, warm_task: dict[str, Any]) -> None:
        super().__init__(daemon=True, name="ui")
        self.api = api
        self.warm_task = warm_task
        self.latency: dict[str, list[float]] = {"GET /health": [], "POST /setup": [], "POST /predict": []}
        self.errors: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        session = requests.Session()
        calls: list[tuple[str, Callable[[], requests.Response]]] = [
            ("GET /health", lambda: session.get(f"{self.api}/health", timeout=10)),
            ("POST /setup", lambda: session.post(
                f"{self.api}/setup", json={"project": f"{PID}.1700000000", "schema": LABEL_CONFIG_XML}, timeout=10)),
            ("POST /predict", lambda: session.post(
                f"{self.api}/predict", json={"project": f"{PID}.1700000000", "tasks": [self.warm_task]}, timeout=10)),
        ]  # fmt: skip
        i = 0
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            name, call = calls[i % len(calls)]
            i += 1
            t0 = time.perf_counter()
            try:
                resp = call()
                elapsed = time.perf_counter() - t0
                if resp.status_code != 200:
                    self.errors.append(f"{name}: HTTP {resp.status_code}")
                self.latency[name].append(elapsed)
            except requests.RequestException as exc:
                self.errors.append(f"{name}: {exc}")
            next_at += 1 / UI_CALLS_PER_SECOND
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))


class InteractiveProber(threading.Thread):
    """Every ~2 s, an annotator opens a task nobody has embedded yet: /predict for that one task."""

    def __init__(self, api: str, store: Store, server: ImageServerProcess, images: Iterator[bytes]) -> None:
        super().__init__(daemon=True, name="probe")
        self.api = api
        self.store = store
        self.server = server
        self.images = images
        self.until_stored: list[float] = []
        self.reply: list[float] = []
        self.errors: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        session = requests.Session()
        k = 0
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            tid = PROBE_TASK_BASE + k
            task = {"id": tid, "data": {"image": self.server.put(f"{k}.png", next(self.images))}}
            k += 1
            t0 = time.perf_counter()
            try:
                resp = session.post(f"{self.api}/predict", json={"project": PID, "tasks": [task]}, timeout=60)
                self.reply.append(time.perf_counter() - t0)
                if resp.status_code != 200:
                    self.errors.append(f"task {tid}: HTTP {resp.status_code}")
                    continue
                deadline = time.monotonic() + 300
                while not self.store.embeddings(PID, [tid]):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"task {tid}: no embedding after 300 s")
                    time.sleep(0.01)
                self.until_stored.append(time.perf_counter() - t0)
            except (requests.RequestException, TimeoutError) as exc:
                self.errors.append(str(exc))
            next_at += PROBE_EVERY_SECONDS
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))


TASK_DONE = re.compile(r"Task plankton\.predict_tasks\[[^\]]+\] succeeded in ([0-9.]+)s")
PIPELINE_LINE = re.compile(r"project \d+: (\d+) tasks, (\d+) embedded, (\d+) from cache, (\d+) failed")


def worker_log_stats(text: str) -> dict[str, Any]:
    """Celery's own per-task runtimes and the pipeline's per-task counts, from the worker's log."""
    runtimes = [float(m) for m in TASK_DONE.findall(text)]
    lines = [tuple(map(int, m)) for m in PIPELINE_LINE.findall(text)]
    bulk = [r for r, line in zip(runtimes, lines, strict=False) if line[0] > 1]
    return {
        "predict_tasks": len(runtimes),
        "task_seconds_sum": sum(runtimes),
        "bulk_tasks": len(bulk),
        "bulk_first_seconds": bulk[0] if bulk else float("nan"),
        "bulk_seconds_p50": statistics.median(bulk) if bulk else float("nan"),
        "bulk_seconds_max": max(bulk, default=float("nan")),
        "embedded": sum(x[1] for x in lines),
        "from_cache": sum(x[2] for x in lines),
        "failed": sum(x[3] for x in lines),
    }


def image_url(args: argparse.Namespace, particles: Particles, server: ImageServerProcess, name: str) -> str:
    """`--reads direct`: a Label Studio local-files path, which the worker reads from disk under
    LOCAL_FILES_DOCUMENT_ROOT as it does beside a real Label Studio; `http`: a URL of the image server."""
    if args.reads == "direct":
        return "/data/local-files/?" + urlencode({"d": f"{particles.root.name}/{name}"})
    return server.particle(name)


def crossing(timeline: list[tuple[float, int, int]], settled: float) -> float:
    """When the job's settled count (done + failed) reached `settled`, between the two polls around it."""
    before = (0.0, 0)
    for t, done, failed in timeline:
        if done + failed >= settled:
            t0, n0 = before
            return t0 + (t - t0) * (settled - n0) / max(1, done + failed - n0)
        before = (t, done + failed)
    return float("nan")


def measure_service(
    args: argparse.Namespace,
    env: dict[str, str],
    settings: Settings,
    particles: Particles,
    tmp: Path,
    server: ImageServerProcess,
    stack: contextlib.ExitStack,
) -> dict[str, Any]:
    redis.Redis.from_url(settings.redis_url).flushdb()
    store = Store.from_url(settings.redis_url, embedding_space(settings))
    gunicorn = ApiProcess(env, tmp / "api.log")
    api = gunicorn.url
    log(f"starting the API (gunicorn -w 2 -k gthread --threads 8) at {api} and one Celery worker; logs in {tmp}")
    stack.callback(gunicorn.stop)
    worker = WorkerProcess(env, tmp / "worker.log", "bench")
    stack.callback(worker.stop)
    gunicorn.start()
    worker.start(timeout=300)
    assert gunicorn.proc is not None and worker.proc is not None
    http = requests.Session()

    resp = http.post(f"{api}/setup", json={"project": f"{PID}.1700000000", "schema": LABEL_CONFIG_XML}, timeout=10)
    resp.raise_for_status()
    probes = particles.probe_images()
    warm_task = {"id": WARM_TASK_ID, "data": {"image": server.put("warm.png", next(probes))}}
    http.post(f"{api}/predict", json={"project": PID, "tasks": [warm_task]}, timeout=60).raise_for_status()
    version = store.current_version(PID)
    wait_until(lambda: store.predictions(PID, version, [WARM_TASK_ID]), 120, "the warm-up task's prediction")

    pipe = store.r.pipeline()
    for digest in particles.import_hashes:
        pipe.exists(keys.content_embedding(store.space, digest))
    cached_before = sum(pipe.execute())
    tasks = [{"id": i + 1, "data": {"image": image_url(args, particles, server, name)}}
             for i, name in enumerate(particles.names)]  # fmt: skip
    log_offset = len((tmp / "worker.log").read_bytes())

    sampler = RssSampler({"worker": worker.proc.pid, "api": gunicorn.proc.pid})
    ui = UiCaller(api, warm_task)
    prober = InteractiveProber(api, store, server, probes)
    threads: list[Any] = [sampler, ui, prober]
    for t in threads:
        stack.callback(t.stop_event.set)
    sampler.start()
    time.sleep(3 * RSS_EVERY_SECONDS)
    worker_rss_start = group_rss(worker.proc.pid)
    ui.start()
    time.sleep(1.0)  # let the UI caller settle on its keep-alive connection

    log(f"TASKS_CREATED webhook with {len(tasks)} tasks")
    body = {"action": "TASKS_CREATED", "project": {"id": PID}, "tasks": tasks}
    worker_pid, api_pid = worker.proc.pid, gunicorn.proc.pid
    cpu = CpuMeter(
        {
            "worker": lambda: tree_cpu_seconds(worker_pid),
            "api": lambda: tree_cpu_seconds(api_pid),
            "image server": lambda: tree_cpu_seconds(server.proc.pid),
            "bench (UI, probes, polling)": own_cpu_seconds,
        }
    ).__enter__()
    t0 = time.perf_counter()
    resp = http.post(f"{api}/webhook", json=body, timeout=60)
    webhook_s = time.perf_counter() - t0
    resp.raise_for_status()
    job_id = resp.json()["job"]
    prober.start()
    timeline: list[tuple[float, int, int]] = []
    status: dict[str, Any] = {}
    while True:
        status = http.get(f"{api}/jobs/{job_id}", timeout=10).json()
        now = time.perf_counter() - t0
        timeline.append((now, status["done"], status["failed"]))
        if status["done"] + status["failed"] >= len(tasks):
            break
        if now > args.timeout:
            raise TimeoutError(f"import not done after {args.timeout} s: {status}")
        if worker.proc.poll() is not None:
            raise RuntimeError(f"the worker died:\n{worker.log_tail()}")
        time.sleep(JOB_POLL_SECONDS_CUDA if settings.device.startswith("cuda") else JOB_POLL_SECONDS)
    e2e_s = time.perf_counter() - t0
    cpu.__exit__()
    worker_rss_end = group_rss(worker.proc.pid)
    per_process = {
        f"{proc.pid} {' '.join(proc.cmdline()[1:4])[:60]}": mib(proc.memory_full_info().rss)
        for pid in (worker_pid, api_pid)
        for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    }
    for t in (ui, prober):
        t.stop_event.set()
    prober.join(timeout=120)
    ui.join(timeout=10)
    sampler.stop_event.set()
    sampler.join(timeout=5)
    log(f"import done in {e2e_s:.1f} s: {status['done']} done, {status['failed']} failed")

    first = next((t for t, d, f in timeline if d + f > 0), float("nan"))
    t10, t90 = crossing(timeline, 0.1 * len(tasks)), crossing(timeline, 0.9 * len(tasks))
    wlog = worker_log_stats((tmp / "worker.log").read_bytes()[log_offset:].decode(errors="replace"))
    return {
        "images": len(tasks),
        "seconds": e2e_s,
        "images_per_s": len(tasks) / e2e_s,
        "done": status["done"],
        "failed": status["failed"],
        "webhook_reply_ms": 1000 * webhook_s,
        "first_task_done_s": first,
        "steady_images_per_s": 0.8 * len(tasks) / (t90 - t10) if t90 > t10 else float("nan"),
        "steady_window_s": [t10, t90],
        "content_cache_hits_before": cached_before,
        "write_back": False,
        "chunk_size": settings.chunk_size,
        "download_workers": settings.download_workers,
        "worker_concurrency": settings.worker_concurrency,
        "worker_log": wlog,
        "cpu_cores": cpu.result,
        "worker_cpu_ms_per_image": 1000 * cpu.result["worker"] * cpu.wall / len(tasks),
        "ui": {
            name: {"calls": len(v), "p50_ms": 1000 * pct(v, 50), "p99_ms": 1000 * pct(v, 99), "max_ms": 1000 * max(v)}
            for name, v in ui.latency.items()
            if v
        },
        "ui_errors": ui.errors[:10],
        "interactive": {
            "probes": len(prober.until_stored),
            "source": "; then ".join(particles.probe_sources),
            "until_stored_p50_s": pct(prober.until_stored, 50),
            "until_stored_p99_s": pct(prober.until_stored, 99),
            "until_stored_max_s": max(prober.until_stored, default=float("nan")),
            "predict_reply_p50_s": pct(prober.reply, 50),
        },
        "interactive_errors": prober.errors[:10],
        "memory_mib": {
            "worker_peak": mib(sampler.peak("worker")),
            "api_peak": mib(sampler.peak("api")),
            "worker_start": mib(worker_rss_start),
            "worker_end": mib(worker_rss_end),
            "worker_pss_peak": mib(sampler.peak_pss("worker")),
            "api_pss_peak": mib(sampler.peak_pss("api")),
            "samples": len(sampler.samples["worker"]),
            "rss_per_process_end": per_process,
        },
    }


# -- 3. the peer baseline: one synchronous /predict per task -------------------------------------------------


def baseline_app(embedder: Embedder, settings: Settings) -> Flask:
    app = Flask("peer-baseline")

    @app.post("/predict")
    def predict() -> Any:
        results = []
        for task in request.get_json()["tasks"]:
            resp = requests.get(task["data"]["image"], timeout=settings.download_timeout)
            resp.raise_for_status()
            pixels = to_model_input(decode_image(resp.content, settings.image_max_pixels), embedder.image_size)
            features = embedder.embed([pixels])
            results.append({"result": [], "score": 0.0, "dims": int(features.shape[1])})
        return jsonify(results=results)

    return app


class QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


def measure_baseline(
    settings: Settings, particles: Particles, count: int, server: ImageServerProcess, stack: contextlib.ExitStack
) -> dict[str, Any]:
    # The original backend: eager PyTorch, one image per call.
    embedder = embedder_from_settings(dataclasses.replace(settings, torchscript=False), batch_size=1)
    httpd = make_server("127.0.0.1", 0, baseline_app(embedder, settings), threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    stack.callback(httpd.shutdown)
    url = f"http://127.0.0.1:{httpd.server_port}/predict"
    names = particles.names[:count]
    session = requests.Session()

    def post(i: int, name: str) -> None:
        body = {"project": PID, "tasks": [{"id": i, "data": {"image": server.particle(name)}}]}
        session.post(url, json=body, timeout=60).raise_for_status()

    post(0, names[0])  # warm-up request
    with CpuMeter(
        {"image server": lambda: tree_cpu_seconds(server.proc.pid), "bench (peer server + client)": own_cpu_seconds}
    ) as cpu:
        t0 = time.perf_counter()
        for i, name in enumerate(names, 1):
            post(i, name)
        seconds = time.perf_counter() - t0
    return {"images": len(names), "seconds": seconds, "images_per_s": len(names) / seconds, "cpu_cores": cpu.result}


# -- report -------------------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    m, e, b = results["model_only"], results["end_to_end"], results["baseline"]
    rows: list[tuple[str, str, str]] = []

    def row(name: str, value: str, note: str = "") -> None:
        rows.append((name, value, note))

    ratio = e["images_per_s"] / m["images_per_s"]
    row(
        "1. model-only (in memory)",
        f"{m['images_per_s']:.1f} img/s",
        f"median of {m['passes']} pass(es) over {m['images']} images ({m['images_per_s_min']:.0f}-"
        f"{m['images_per_s_max']:.0f}), batch {m['batch_size']}, after a warm-up batch",
    )
    row(
        "   decode+preprocess alone, 1 thread",
        f"{m['preprocess_images_per_s_one_thread']:.1f} img/s",
        "decode_image + to_model_input (not in the model-only figure)",
    )
    row("   model, one image (batch 1)", f"{m['batch1_ms_p50']:.1f} ms", f"p99 {m['batch1_ms_p99']:.1f} ms")
    row(
        "2. end-to-end import",
        f"{e['images_per_s']:.1f} img/s",
        f"{e['images']} tasks in {e['seconds']:.1f} s, {e['done']} done, {e['failed']} failed",
    )
    row("   end-to-end / model-only", f"{ratio:.2f}", "target >= 0.85")
    row(
        "   content cache before import",
        f"{e['content_cache_hits_before']} of {e['images']} cached",
        f"fresh Redis db; worker log: {e['worker_log']['from_cache']} from cache",
    )
    row("   webhook reply", f"{e['webhook_reply_ms']:.0f} ms", "Label Studio waits 1 s")
    row("   first task done after", f"{e['first_task_done_s']:.2f} s", "")
    t10, t90 = e["steady_window_s"]
    row(
        "   steady state: 10% to 90% done",
        f"{e['steady_images_per_s']:.1f} img/s",
        f"{t10:.2f} s to {t90:.2f} s; {e['steady_images_per_s'] / m['images_per_s']:.2f} of model-only",
    )
    w = e["worker_log"]
    row(
        "   worker busy in predict tasks",
        f"{w['task_seconds_sum']:.1f} s",
        f"{w['predict_tasks']} Celery tasks; {w['bulk_tasks']} chunks (CHUNK_SIZE {e['chunk_size']}): first "
        f"{w['bulk_first_seconds']:.2f} s, p50 {w['bulk_seconds_p50']:.2f} s, max {w['bulk_seconds_max']:.2f} s",
    )
    if b["images"]:
        row(
            "3. peer: sync /predict, 1 image each",
            f"{b['images_per_s']:.1f} img/s",
            f"{b['images']} images in {b['seconds']:.1f} s",
        )
        row("   speed-up over the peer", f"{e['images_per_s'] / b['images_per_s']:.1f}x", "end-to-end / peer")
    else:
        row("3. peer: sync /predict, 1 image each", "skipped", "--skip-baseline")
    for name, s in e["ui"].items():
        row(
            f"4. UI {name}",
            f"p50 {s['p50_ms']:.1f} / p99 {s['p99_ms']:.1f} ms",
            f"{s['calls']} calls during import, max {s['max_ms']:.0f} ms; target p99 < 50 ms",
        )
    i = e["interactive"]
    row(
        "5. interactive: one new task stored",
        f"p50 {i['until_stored_p50_s']:.2f} / p99 {i['until_stored_p99_s']:.2f} s",
        f"{i['probes']} probes during import, max {i['until_stored_max_s']:.2f} s; model batch 1: "
        f"{m['batch1_ms_p50']:.1f} ms",
    )
    mem = e["memory_mib"]
    row(
        "6. peak RSS worker (main + pool)",
        f"{mem['worker_peak']:.0f} MiB",
        f"PSS {mem['worker_pss_peak']:.0f} MiB (shared pages once, every 2 s); {mem['samples']} samples every 0.2 s",
    )
    row("   peak RSS API (master + workers)", f"{mem['api_peak']:.0f} MiB", f"PSS {mem['api_pss_peak']:.0f} MiB")
    row("   worker RSS start -> end of import", f"{mem['worker_start']:.0f} -> {mem['worker_end']:.0f} MiB", "")
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{'measure':<{w0}}  {'value':<{w1}}  note", "-" * (w0 + w1 + 60)]
    lines += [f"{a:<{w0}}  {v:<{w1}}  {n}".rstrip() for a, v, n in rows]
    cores = results["config"]["cpu_cores"]
    lines += ["", f"CPU used, in cores of {cores} (the machine is shared: 'other processes' is not this benchmark):"]
    lines += [f"  model-only: {CpuMeter.format(m['cpu_cores'])}", f"  end-to-end: {CpuMeter.format(e['cpu_cores'])}"]
    if "cpu_cores" in b:
        lines.append(f"  peer:       {CpuMeter.format(b['cpu_cores'])}")
    lines.append(
        f"  CPU per image: model-only {m['cpu_ms_per_image']:.2f} ms; worker during the import "
        f"{e['worker_cpu_ms_per_image']:.2f} ms"
    )
    if not m["device"].startswith("cuda"):
        # What the import could reach with every core busy, at the worker's measured CPU per image, after
        # what the rig (image server, API, this script, Redis) took: the cost of the Python work per image
        # sets the ratio's ceiling; the packing (how close the import came to it) is the pipeline's doing.
        rig = sum(v for k, v in e["cpu_cores"].items() if k not in ("worker", "idle", "steal"))
        ceiling = 1000 * (cores - rig) / e["worker_cpu_ms_per_image"]
        lines.append(
            f"  ceiling at that CPU per image, with {cores - rig:.2f} cores left by the rig: {ceiling:.0f} img/s, "
            f"a ratio of {ceiling / m['images_per_s']:.2f}; the import reached {e['images_per_s'] / ceiling:.0%} of it"
        )
    lines += ["", "One image, step by step (one thread, wall ms; the worker does all of these on the same cores):"]
    lines += [f"  {name:<40} {ms:7.2f} ms" for name, ms in m["stages_ms_per_image"].items()]
    return "\n".join(lines)


def header(results: dict[str, Any]) -> str:
    c, m, e = results["config"], results["model_only"], results["end_to_end"]
    phases = {"model-only": m, "end-to-end": e, "peer": results["baseline"]}
    busy = {name: r["cpu_cores"]["other processes"] for name, r in phases.items() if "cpu_cores" in r}
    noisy = {name: v for name, v in busy.items() if v > NOISY_CORES}
    warning = (
        [f"WARNING: other processes used {', '.join(f'{v:.2f} cores during {n}' for n, v in noisy.items())}: "
         "the figures are not comparable with each other, nor with a quiet machine; rerun when it is quiet"]
        if noisy else []
    )  # fmt: skip
    return "\n".join(warning + [
        f"backbone {c['backbone']} at {m['image_size']} px, batch {m['batch_size']}, device {m['device']} "
        f"({m['device_name']}), {c['cpu_cores']} CPU cores; {m['processes']} worker process(es) x {m['torch_threads']} "
        "torch thread(s), in the model-only figure as in the worker",
        f"one Celery worker, concurrency {e['worker_concurrency']}; chunk size {e['chunk_size']}, download workers "
        f"{e['download_workers']}; "
        + ("images read from disk as Label Studio local files (LOCAL_FILES_DOCUMENT_ROOT)"
           if c.get("reads") == "direct" else
           "images served over HTTP on loopback by bench/static_server.py (keep-alive) in a process of its own"),
        "no LABEL_STUDIO_URL: predictions stored in Redis only, no write-back to Label Studio (not in the figures)",
        f"interactive probes: {e['interactive']['source']}",
        f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--count",
        type=int,
        default=4000,
        help="particles imported (default 4000; more are the particles turned and mirrored)",
    )
    parser.add_argument(
        "--reads",
        choices=("http", "direct"),
        default="http",
        help="the worker downloads each image over HTTP (default) or reads it as a local file",
    )
    parser.add_argument("--baseline-count", type=int, default=400, help="particles for the peer baseline")
    parser.add_argument("--backbone", default=os.environ.get("BACKBONE", "efficientnet-lite0"))
    parser.add_argument("--image-size", type=int, default=int(os.environ.get("IMAGE_SIZE") or 0), help="0: default")
    parser.add_argument("--batch-size", type=int, default=int(os.environ.get("BATCH_SIZE") or 0), help="0: default")
    parser.add_argument("--device", default=os.environ.get("DEVICE", "auto"))
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
                        help="a database of its own: it is FLUSHed")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the import")
    parser.add_argument("--model-passes", type=int, default=3, help="model-only passes over the N images (median)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    tmp = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    env = {
        "REDIS_URL": args.redis_url,
        "BACKBONE": args.backbone,
        "IMAGE_HOSTS": "127.0.0.1",  # the image server of this benchmark listens on loopback
        "IMAGE_SIZE": str(args.image_size or ""),
        "BATCH_SIZE": str(args.batch_size or ""),
        "DEVICE": args.device,
        "LOG_LEVEL": "INFO",
        "LABEL_STUDIO_URL": "",
        "LABEL_STUDIO_API_KEY": "",
    }
    for name in (
        "CHUNK_SIZE",
        "DOWNLOAD_WORKERS",
        "MAX_TASKS_PER_REQUEST",
        "PREDICT_WAIT_SECONDS",
        "WEIGHTS",
        "TORCH_HOME",
    ):
        if os.environ.get(name):
            env[name] = os.environ[name]
    os.environ.update(env)
    settings = Settings.from_env()
    env["WORKER_CONCURRENCY"] = os.environ["WORKER_CONCURRENCY"] = str(settings.worker_concurrency)
    redis.Redis.from_url(settings.redis_url).flushdb()

    particles = Particles.load(args.count, tmp)
    if args.reads == "direct":
        env["LOCAL_FILES_DOCUMENT_ROOT"] = os.environ["LOCAL_FILES_DOCUMENT_ROOT"] = str(particles.root.parent)
    results: dict[str, Any] = {
        "config": {
            "backbone": settings.backbone,
            "cpu_cores": available_cores(),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "count": args.count,
            "reads": args.reads,
        }
    }
    try:
        with contextlib.ExitStack() as stack:
            server = ImageServerProcess(tmp / "www", particles.root)
            stack.callback(server.close)
            log(f"1/3 model-only over {args.count} particles decoded and preprocessed in memory")
            results["model_only"] = measure_model(settings, particles, server, args.model_passes)
            log(f"    {results['model_only']['images_per_s']:.1f} img/s")
            with contextlib.ExitStack() as service:
                log("2/3 end-to-end import (with UI calls, interactive probes and RSS sampling)")
                results["end_to_end"] = measure_service(args, env, settings, particles, tmp, server, service)
            if args.skip_baseline:
                results["baseline"] = {"images": 0, "seconds": float("nan"), "images_per_s": float("nan")}
            else:
                log(f"3/3 peer baseline: {args.baseline_count} synchronous /predict requests, one image each")
                results["baseline"] = measure_baseline(settings, particles, args.baseline_count, server, stack)
    except KeyboardInterrupt:
        log("interrupted: subprocesses stopped")
        return 130
    print()
    print(header(results))
    print()
    print(table(results))
    e = results["end_to_end"]
    for what in ("ui_errors", "interactive_errors"):
        if e[what]:
            print(f"{what}: {e[what]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
        log(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    code = main()
    # Skip the interpreter's finalization: once, at exit after a full run, the process aborted there
    # ("terminate called without an active exception": a daemon thread inside C++ code when Python
    # stops its daemon threads), which failed `make bench` after its figures were out. Everything it
    # printed is flushed and every process it started has been stopped by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
