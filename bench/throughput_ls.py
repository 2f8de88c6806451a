"""Throughput as users get it: through a real Label Studio, from the import to the last prediction it shows.

On one machine, one run, side by side:
1. Label Studio alone: how fast it serves `/data/local-files/` (8 client threads), and how fast it ingests
   predictions (`import_predictions`) at several request sizes.
2. The model alone (bench/throughput.py's figure: decoded images in memory, the worker's process layout).
3. End to end: a project with two seed annotations (so a model exists before the import), then N shared
   particles imported through Label Studio's API as a local-files storage would hold them; timed from the
   import request until every task shows a prediction of the version /setup returns (Label Studio's API is
   checked at the end). Once with the workers reading the files directly (LOCAL_FILES_DOCUMENT_ROOT) and
   once through Label Studio over HTTP. During the import, the UI calls (/health, /setup, /predict) are
   timed; at the end, how many predictions Label Studio holds per task. The time splits in three phases:
   Label Studio's import until its webhook's tasks are queued, their embedding until none is queued, and
   what follows the last chunk (Label Studio storing the last write).
4. The ratio: end to end / the slower of the model alone and Label Studio's prediction ingest; and the
   ratio the CPU the run's parts spent allows (`cpu_bound`): Label Studio, the API and the UI calls share
   the cores with the model.

    .venv/bin/python bench/throughput_ls.py [--count 4000] [--reads direct,http] [--workers 1]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis  # noqa: E402
import requests  # noqa: E402
import throughput  # noqa: E402

from common import keys, queues  # noqa: E402
from common.models import embedding_space  # noqa: E402
from common.revisions import behind  # noqa: E402
from common.settings import Settings  # noqa: E402
from common.store import Store  # noqa: E402
from tests.e2e.label_studio import LabelStudioServer  # noqa: E402
from tests.helpers import DATA, LABEL_CONFIG, ApiProcess, BeatProcess, WorkerProcess, wait_until  # noqa: E402

PARTICLES = sorted((DATA / "flowcam" / "particles").glob("*.png"))
CROPS = sorted((DATA / "flowcam" / "crops").glob("*.tif"))  # seeds and the UI's probe: not in the import
UI_CALLS_PER_SECOND = 20.0


def ref(path: Path) -> str:
    return f"/data/local-files/?d={path.relative_to(DATA)}"


def choice(tag: str, label: str) -> dict[str, Any]:
    return {"from_name": tag, "to_name": "image", "type": "choices", "value": {"choices": [label]}}


def pct(values: list[float], q: float) -> float:
    return throughput.pct(values, q) if values else float("nan")


# -- Label Studio alone ------------------------------------------------------------------------------------


def ls_file_rate(ls: LabelStudioServer, project: int, n: int = 500, threads: int = 8) -> float:
    """Files/s Label Studio serves from a local-files storage (its own Django process)."""
    ls.ensure_local_storage(project, {"flowcam"})
    urls = [ls.url + ref(p) for p in PARTICLES[-n:]]
    session = requests.Session()
    session.headers["Authorization"] = f"Token {ls.api_key}"
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=threads))

    def get(url: str) -> int:
        return len(session.get(url, timeout=60).content)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(get, urls))
    assert all(sizes), "Label Studio served an empty file"
    return n / (time.perf_counter() - t0)


def ls_ingest_rates(ls: LabelStudioServer, sizes: list[int], project_size: int) -> dict[int, float]:
    """Predictions/s Label Studio stores through `import_predictions`, per request size: each size in a fresh
    project of `project_size` tasks (what a request costs Label Studio grows with the project's size)."""
    from label_studio_sdk import LabelStudio, PredictionRequest

    sdk = LabelStudio(base_url=ls.url, api_key=ls.api_key, timeout=300)
    rates = {}
    for size in sizes:
        project = ls.create_project(f"ingest {size} per request", LABEL_CONFIG)
        ids: list[int] = []
        for start in range(0, project_size, 2000):
            ids += ls.import_tasks(project, [{"image": f"http://example.invalid/{i}.png"}
                                             for i in range(start, min(project_size, start + 2000))])  # fmt: skip
        todo = ids[: 20 if size == 1 else min(len(ids), max(size, 1000))]
        t0 = time.perf_counter()
        for start in range(0, len(todo), size):
            request = [
                PredictionRequest(task=t, model_version=f"bench-{size}", score=0.6, result=[
                    {**choice("organism_type", "Plankton"), "id": uuid.uuid4().hex[:12], "score": 0.7},
                    {**choice("shape", "Round"), "id": uuid.uuid4().hex[:12], "score": 0.6}])
                for t in todo[start : start + size]
            ]  # fmt: skip
            sdk.projects.import_predictions(id=project, request=request)
        rates[size] = len(todo) / (time.perf_counter() - t0)
    return rates


# -- end to end --------------------------------------------------------------------------------------------


class CpuAccount:
    """CPU seconds (user, system) each part spent between `start` and `stop`: where the time beyond the model
    went. A part is read by a function returning its (user, system) seconds: a process and its children
    (Label Studio, the API, a Celery worker and its pool, beat), Redis, or this script alone (its UI-call
    and polling threads; the services are its children). bench/throughput.py's CpuMeter reports shares of
    the cores instead; this split is what showed the worker's time in the kernel (bench/RESULTS.md)."""

    def __init__(self, parts: dict[str, Callable[[], tuple[float, float]]]) -> None:
        self.parts = parts
        self.before: dict[str, tuple[float, float]] = {}
        self.spent: dict[str, tuple[float, float]] = {}
        self.wall = 0.0

    def start(self) -> None:
        self.wall = time.perf_counter()
        self.before = {name: read() for name, read in self.parts.items()}

    def stop(self) -> None:
        self.wall = time.perf_counter() - self.wall
        for name, read in self.parts.items():
            user, system = read()
            self.spent[name] = (user - self.before[name][0], system - self.before[name][1])

    def summary(self) -> dict[str, Any]:
        cores = os.cpu_count() or 1
        return {
            "wall_s": self.wall,
            "capacity_s": self.wall * cores,
            "parts": {n: {"user_s": round(u, 1), "system_s": round(s, 1)} for n, (u, s) in self.spent.items()},
        }


class QueueWatch(threading.Thread):
    """When the import's tasks were first counted as queued (the webhook reached the API, which queued them)
    and when none was queued any more (the last chunk committed): the phases between which the end-to-end
    time splits. One Redis call every 50 ms, from the import request on (the webhook comes before its reply)."""

    def __init__(self, store: Store, project: int, t0: float) -> None:
        super().__init__(daemon=True, name="queue-watch")
        self.store, self.project, self.t0 = store, project, t0
        self.queued_at: float | None = None
        self.embedded_at: float | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.05):
            queued = self.store.pending_count(self.project)
            now = time.perf_counter() - self.t0
            if queued and self.queued_at is None:
                self.queued_at = now
            elif not queued and self.queued_at is not None:
                self.embedded_at = now
                return


class UiCalls(threading.Thread):
    """What Label Studio's UI makes the backend answer while an import runs."""

    def __init__(self, api: str, project: int, task: dict[str, Any], rate: float) -> None:
        super().__init__(daemon=True, name="ui")
        self.api, self.project, self.task, self.rate = api, project, task, rate
        self.latency: dict[str, list[float]] = {"GET /health": [], "POST /setup": [], "POST /predict": []}
        self.errors: Counter[str] = Counter()
        self.stopping = threading.Event()

    def run(self) -> None:
        session = requests.Session()
        body = {"project": f"{self.project}.1", "tasks": [self.task]}
        calls = [("GET /health", lambda: session.get(f"{self.api}/health", timeout=10)),
                 ("POST /setup", lambda: session.post(f"{self.api}/setup", json={"project": f"{self.project}.1"},
                                                      timeout=10)),
                 ("POST /predict", lambda: session.post(f"{self.api}/predict", json=body, timeout=10))]  # fmt: skip
        i, next_at = 0, time.monotonic()
        while not self.stopping.is_set():
            name, call = calls[i % len(calls)]
            i += 1
            t0 = time.perf_counter()
            try:
                if call().status_code != 200:
                    self.errors[name] += 1
                self.latency[name].append(time.perf_counter() - t0)
            except requests.RequestException:
                self.errors[name] += 1
            next_at += 1 / self.rate
            self.stopping.wait(max(0.0, next_at - time.monotonic()))


def end_to_end(ls: LabelStudioServer, tmp: Path, args: argparse.Namespace, reads: str, workers: int) -> dict[str, Any]:
    redis.Redis.from_url(args.redis_url).flushdb()
    env = {
        "REDIS_URL": args.redis_url,
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.api_key,
        "LOCAL_FILES_DOCUMENT_ROOT": str(DATA) if reads == "direct" else "",
        "LOG_LEVEL": "INFO",
        "PREDICT_WAIT_SECONDS": "2",
        "WORKER_CONCURRENCY": str(args.concurrency or Settings.from_env().worker_concurrency),
        **({"DELIVER_BATCH_SIZE": str(args.deliver_batch)} if args.deliver_batch else {}),
    }
    run = tmp / f"{reads}-{workers}w"
    run.mkdir()
    api = ApiProcess(env, run / "api.log")
    pool = [WorkerProcess(env, run / f"worker-{i}.log", f"w{i}") for i in range(1, workers + 1)]
    beat = BeatProcess(env, run / "beat.log", "beat")
    with contextlib.ExitStack() as stack:
        for part in (api, *pool, beat):
            stack.callback(part.stop)
        api.start()
        for w in pool:
            w.start()
        beat.start()
        store = Store.from_url(args.redis_url, embedding_space(Settings.from_env()))
        project = ls.create_project(f"throughput {reads} {workers}w", LABEL_CONFIG)
        ls.connect_ml_backend(project, api.url)
        seeds = ls.import_tasks(project, [{"image": ref(p)} for p in CROPS[:2]])
        for task, label in zip(seeds, ("Plankton", "Debris"), strict=True):
            ls.create_annotation(task, [choice("organism_type", label)])

        def learned() -> int:
            return len(store.fitted_labels(project, store.current_version(project)))

        wait_until(lambda: learned() == 2, 120, "a model of the two seed annotations")
        seeded = store.current_version(project)
        chosen = PARTICLES[: args.count]
        # The UI asks for a task whose prediction is known (an unannotated one, predicted before the import).
        probe = ls.import_tasks(project, [{"image": ref(CROPS[2])}])[0]
        wait_until(lambda: store.predictions(project, store.current_version(project), [probe]), 60, "the probe")
        ui = UiCalls(api.url, project, {"id": probe, "data": {"image": ref(CROPS[2])}}, args.ui_rate)
        trees = {"Label Studio": ls.process.pid, "API": api.proc.pid, "beat": beat.proc.pid,
                 **{f"worker {w.name}": w.proc.pid for w in pool}}  # fmt: skip
        cpu = CpuAccount({**{name: functools.partial(throughput.tree_cpu_times, pid) for name, pid in trees.items()},
                          "this script": throughput.own_cpu_times, "Redis": throughput.redis_cpu_times})  # fmt: skip
        ui.start()
        cpu.start()
        t0 = time.perf_counter()
        watch = QueueWatch(store, project, t0)
        watch.start()
        ids = ls.import_tasks(project, [{"image": ref(p)} for p in chosen])
        imported = time.perf_counter() - t0

        def settled() -> bool:
            """Every task shows the current version's answer in Label Studio, and nothing more is to come: no
            refit running or scheduled, nothing queued, nothing in the outbox."""
            busy = store.r.exists(keys.lock(project, "refit"), keys.refit_scheduled(project))
            return (not busy and not store.pending_count(project) and store.delivery.size(project) == 0
                    and store.queue_length(queues.BULK) == 0 and store.embedding_count(project) >= len(ids) + 1
                    and not behind(store, project))  # fmt: skip

        wait_until(settled, 3600, "every task written, and the backend idle", interval=0.2)
        took = time.perf_counter() - t0
        cpu.stop()
        ui.stopping.set()
        watch.stopping.set()
        ui.join()
        version = store.live_version()
        tasks = ls.list_tasks(project, page_size=1000)
        per_task = Counter(len(t["predictions"]) for t in tasks if t["id"] in set(ids))
        current = sum(any(p["model_version"] == version for p in t["predictions"]) for t in tasks)
        return {
            "reads": reads,
            "workers": workers,
            "tasks": len(ids),
            "seconds": took,
            "img_s": len(ids) / took,
            "import_request_s": imported,
            "queued_at_s": watch.queued_at,
            "embedded_at_s": watch.embedded_at,
            "versions": [seeded, version],
            "current_in_label_studio": current,
            "predictions_per_task": dict(sorted(per_task.items())),
            "ui_p99_ms": {k: 1000 * pct(v, 99) for k, v in ui.latency.items()},
            "ui_p50_ms": {k: 1000 * pct(v, 50) for k, v in ui.latency.items()},
            "ui_errors": dict(ui.errors),
            "cpu": cpu.summary(),
        }


def cpu_bound(run: dict[str, Any], model_img_s: float, cores: int) -> dict[str, float]:
    """What the CPU the run's parts spent allows: no run can be shorter than all their CPU seconds spread over
    every core. `model_s` is what the model alone needs for the run's images (all cores busy at the
    model-alone rate); the rest is everything not a worker (Label Studio importing, serving and storing, the
    API answering the UI, this script's UI calls, Redis). Even a worker spending no CPU beyond the model's
    cannot beat `model_rest_img_s`: the ratio the machine allows before any of our overhead."""
    parts = run["cpu"]["parts"]
    spent = {name: p["user_s"] + p["system_s"] for name, p in parts.items()}
    workers = sum(s for name, s in spent.items() if name.startswith("worker "))
    others = sum(spent.values()) - workers
    model = cores * run["tasks"] / model_img_s
    return {
        "model_s": model,
        "workers_s": workers,
        "others_s": others,
        "model_ms": 1000 * model / run["tasks"],
        "worker_ms": 1000 * workers / run["tasks"],
        "model_rest_img_s": cores * run["tasks"] / (model + others),
        "workers_rest_img_s": cores * run["tasks"] / (workers + others),
    }


def model_only(count: int) -> float:
    settings = Settings.from_env()
    blobs = [p.read_bytes() for p in PARTICLES[: min(count, 2000)]]
    runs, _, _ = throughput.model_passes(settings, blobs, passes=2)
    return len(blobs) / statistics.median(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--reads", default="direct,http", help="direct, http, or both")
    parser.add_argument("--workers", default="1", help="Celery workers (separate processes): e.g. 1,2")
    parser.add_argument("--concurrency", type=int, default=0, help="WORKER_CONCURRENCY (default: the setting's)")
    parser.add_argument("--deliver-batch", type=int, default=0, help="DELIVER_BATCH_SIZE (default: the setting's)")
    parser.add_argument(
        "--ingest-sizes",
        default="1,100,500,1000,2000,5000",
        help="predictions per request (at most --count: a request never holds more than the project)",
    )
    parser.add_argument(
        "--label-studio-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for Label Studio (repeatable), e.g. one of its feature flags",
    )
    parser.add_argument(
        "--ui-rate",
        type=float,
        default=UI_CALLS_PER_SECOND,
        help="UI calls a second during the import, /health, /setup and /predict in turn (their client runs on "
        "the same cores as everything else)",
    )
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.count > len(PARTICLES):
        raise SystemExit(f"--count {args.count}: at most {len(PARTICLES)} shared particles")
    os.environ["REDIS_URL"] = args.redis_url
    tmp = Path(tempfile.mkdtemp(prefix="bench-ls-"))
    results: dict[str, Any] = {"count": args.count, "cores": os.cpu_count()}
    print(f"logs in {tmp}", flush=True)
    ls_env = dict(item.split("=", 1) for item in args.label_studio_env)
    results["label_studio_env"] = ls_env
    with LabelStudioServer(DATA, log_path=tmp / "label-studio.log", extra_env=ls_env) as ls:
        scratch = ls.create_project("file serving", LABEL_CONFIG)
        results["ls_files_s"] = ls_file_rate(ls, scratch)
        sizes = sorted({min(int(s), args.count) for s in args.ingest_sizes.split(",")})
        results["ls_ingest_s"] = ls_ingest_rates(ls, sizes, project_size=args.count)
        results["model_only_s"] = model_only(args.count)
        results["runs"] = []
        for reads in args.reads.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                print(f"end to end: {reads} reads, {workers} worker(s)...", flush=True)
                results["runs"].append(end_to_end(ls, tmp, args, reads, workers))
    batch = int(args.deliver_batch or Settings.from_env().deliver_batch_size)
    ingest = results["ls_ingest_s"].get(min(batch, args.count)) or max(results["ls_ingest_s"].values())
    ceiling = min(results["model_only_s"], ingest)
    print(f"\n{args.count} particles through Label Studio 1.23 on {os.cpu_count()} cores, one run")
    print(f"Label Studio's environment adds {ls_env}\n" if ls_env else "")
    print(f"Label Studio serving /data/local-files/ alone (8 threads)   {results['ls_files_s']:8.1f} files/s")
    for size, rate in results["ls_ingest_s"].items():
        print(f"Label Studio storing predictions alone, {size:5d} per request {rate:8.1f} predictions/s "
              f"({1000 / rate:.2f} ms each, in a project of {args.count} tasks)")  # fmt: skip
    print(f"model alone (decoded, in memory, the worker's layout)      {results['model_only_s']:8.1f} img/s")
    print(f"ceiling: the slower of the model and the ingest at {min(batch, args.count):4d}   {ceiling:8.1f} img/s\n")
    print(f"reads   workers  end-to-end img/s  ratio  predictions/task          UI p99 health/setup/predict ms "
          f"({args.ui_rate:g} calls/s)")  # fmt: skip
    for r in results["runs"]:
        p99 = r["ui_p99_ms"]
        print(f"{r['reads']:7s} {r['workers']:7d}  {r['img_s']:16.1f}  {r['img_s'] / ceiling:5.2f}  "
              f"{json.dumps(r['predictions_per_task']):24s}  {p99['GET /health']:.1f} / {p99['POST /setup']:.1f} / "
              f"{p99['POST /predict']:.1f}")  # fmt: skip
        first, last = r["versions"]
        print(f"        import request {r['import_request_s']:.1f} s; versions {first} -> {last}; "
              f"{r['current_in_label_studio']} tasks show the current version; UI errors {r['ui_errors']}")  # fmt: skip
        if r["queued_at_s"] is not None and r["embedded_at_s"] is not None:
            queued, embedded = r["queued_at_s"], r["embedded_at_s"]
            rate = r["tasks"] / (embedded - queued)
            print(f"        phases: Label Studio's import until its webhook's tasks were queued {queued:.1f} s; "
                  f"queued until none was {embedded - queued:.1f} s ({rate:.1f} img/s, "
                  f"{rate / results['model_only_s']:.2f} of the model alone); then {r['seconds'] - embedded:.1f} s "
                  "to the last prediction in Label Studio (its last write)")  # fmt: skip
        cpu = r["cpu"]
        spent = ", ".join(f"{name} {p['user_s'] + p['system_s']:.0f} ({p['system_s']:.0f} system)"
                          for name, p in cpu["parts"].items())  # fmt: skip
        capacity = f"{cpu['capacity_s']:.0f} ({os.cpu_count()} cores x {cpu['wall_s']:.0f} s)"
        print(f"        CPU seconds of {capacity}: {spent}")
        bound = r["cpu_bound"] = cpu_bound(r, results["model_only_s"], os.cpu_count() or 1)
        print(f"        CPU bound: the model alone needs {bound['model_s']:.0f} CPU s for these {r['tasks']} images "
              f"and the rest took {bound['others_s']:.0f}, so at most {bound['model_rest_img_s']:.1f} img/s "
              f"({bound['model_rest_img_s'] / ceiling:.2f}) even if the workers spent only the model's CPU; with "
              f"theirs ({bound['workers_s']:.0f}: {bound['worker_ms']:.1f} ms an image against "
              f"{bound['model_ms']:.1f} alone), {bound['workers_rest_img_s']:.1f} img/s "
              f"({bound['workers_rest_img_s'] / ceiling:.2f}); the import reached "
              f"{r['img_s'] / bound['workers_rest_img_s']:.0%} of that")  # fmt: skip
    results["ceiling_img_s"] = ceiling
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
