"""A living project at the size users have: what one annotation costs Label Studio, and what annotators see.

Per project size N, one run through a real Label Studio 1.23 run as compose runs it (its memory-efficient
prediction import flag, SQLite): a fresh Label Studio, the backend (API, one worker of two processes, beat)
reading the files directly, EfficientNet-Lite0 at 224 px. N tasks over the shared particles (a particle backs
several tasks when N is over 4,000: the content cache embeds it once), two seed annotations, and the import
left to settle. Then an annotator labels `--annotations` tasks, one every `--every` seconds, each taken from
Label Studio's labelling stream (`/api/projects/<id>/next/`, as the Label Studio UI asks), with the label
the particle's outline gives (bench/proxy_labels.py).

Printed per annotation: the prediction rows Label Studio stored (its SQLite table's ids, read aside) and its
CPU seconds (its process tree) until every task shows the newest model's answer, and of those, what it paid
until the last annotation; the backend's CPU. While annotating, every `--sample-every` seconds, which
unannotated tasks show no prediction of the version Label Studio shows (one filtered listing of its task API;
its own CPU cost is measured alone first and reported); for each task Label Studio handed out, whether its
suggestion carried the answer of a model fitted on every annotation made 15 s before, and if not, why. At the
end: prediction rows per task, the time to settle after the last annotation (and how many tasks were still
behind 1, 3, 5 and 10 minutes after it), the revisions made for a suggestion's labels and for its score alone
(from the worker's log), and the Data Manager page's and the next-task call's latency before and during the
annotations.

With `--during-import`, the annotator starts as soon as the seed annotations are made, while the import is
still embedded and written (what users do with a sample that has just arrived): then also printed, how many of
the tasks Label Studio handed out came with no suggestion, and what the whole (import and annotations) cost
Label Studio until it settled.

    .venv/bin/python bench/scale.py [--sizes 2000,20000,50000] [--annotations 20] [--every 3] [--during-import]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis  # noqa: E402
import requests  # noqa: E402
import throughput  # noqa: E402
from proxy_labels import proxy_label  # noqa: E402

from common import keys, queues  # noqa: E402
from common.models import embedding_space  # noqa: E402
from common.revisions import labels_digest  # noqa: E402
from common.settings import Settings  # noqa: E402
from common.store import Store  # noqa: E402
from tests.e2e.label_studio import LabelStudioError, LabelStudioServer  # noqa: E402
from tests.helpers import DATA, LABEL_CONFIG, ApiProcess, BeatProcess, WorkerProcess, wait_until  # noqa: E402

PARTICLES = sorted((DATA / "flowcam" / "particles").glob("*.png"))
LABEL_STUDIO_ENV = {"fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short": "true"}
FRESH_AFTER = 15.0  # an annotation older than this must be reflected in what Label Studio hands out


def ref(path: Path) -> str:
    return f"/data/local-files/?d={path.relative_to(DATA)}"


def choice(tag: str, label: str) -> dict[str, Any]:
    return {"from_name": tag, "to_name": "image", "type": "choices", "value": {"choices": [label]}}


def annotation(path: Path) -> list[dict[str, Any]]:
    """What the annotator says of a particle: its outline's shape, and plankton if it is rod-like."""
    shape = proxy_label(path) or "Round"
    return [choice("organism_type", "Plankton" if shape == "Rod-like" else "Debris"), choice("shape", shape)]


class LabelStudioTable:
    """Label Studio's prediction table, read from its SQLite file aside (no request, no CPU of its own)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = next(data_dir.rglob("label_studio.sqlite3"))

    def _one(self, query: str, *args: Any) -> Any:
        with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)) as db:
            return db.execute(query, args).fetchone()

    def last_id(self) -> int:
        return int(self._one("SELECT coalesce(max(id), 0) FROM prediction")[0])

    def rows(self, project: int) -> int:
        return int(self._one("SELECT count(*) FROM prediction WHERE project_id = ?", project)[0])

    def model_version(self, project: int) -> str:
        return str(self._one("SELECT model_version FROM project WHERE id = ?", project)[0] or "")

    def lacking(self, project: int, version: str) -> set[int]:
        """What `lacking` asks Label Studio's task API, read from its tables instead."""
        with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)) as db:
            rows = db.execute(
                "SELECT t.id FROM task t WHERE t.project_id = ? AND t.total_annotations = 0 AND NOT EXISTS "
                "(SELECT 1 FROM prediction p WHERE p.task_id = t.id AND p.model_version = ?)", (project, version)
            )  # fmt: skip
            return {int(row[0]) for row in rows}


def shown_version(ls: LabelStudioServer, project: int, api_url: str) -> str:
    """The version Label Studio shows: the project's model version, or while that names the ML backend, the
    version the backend's /setup returns (which Label Studio asks for each task opened)."""
    shown = ls.get_project(project).get("model_version") or ""
    if shown in {b["title"] for b in ls.get("/api/ml", params={"project": project})}:
        return requests.post(f"{api_url}/setup", json={"project": project}, timeout=10).json()["model_version"]
    return shown


def lacking(ls: LabelStudioServer, project: int, version: str) -> set[int]:
    """Unannotated tasks holding no prediction of `version` (one filtered listing of Label Studio's task API)."""
    query = {"filters": {"conjunction": "and", "items": [
        {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
        {"filter": "filter:tasks:predictions_model_versions", "operator": "not_contains", "type": "List",
         "value": version}]}}  # fmt: skip
    ids, page = set(), 1
    while True:
        reply = ls.session.get(ls.url + "/api/tasks", params={"project": project, "page": page, "page_size": 1000,
                               "fields": "all", "include": "id", "query": json.dumps(query)}, timeout=120)  # fmt: skip
        if reply.status_code == 404:
            break
        batch = reply.json()["tasks"]
        ids |= {t["id"] for t in batch}
        if len(batch) < 1000:
            break
        page += 1
    return ids


class BlankWatch(threading.Thread):
    """Every `every` seconds, the unannotated tasks Label Studio shows nothing for (the longest run of samples
    a task stayed so, in seconds), and `/predict` for one unannotated task, as Label Studio asks it for a task
    opened while the project names the backend: its latency, and whether it answered empty.

    While the annotator works, the blank tasks are asked of Label Studio's task API, as the UI would (its CPU
    is measured alone first and taken off); once `settling` is set, they are read from its tables, so that
    what Label Studio pays to converge is measured without a sampler's listings in it (at 20,000 tasks one
    costs it about a third of a second of CPU, every 2 s)."""

    def __init__(
        self,
        ls: LabelStudioServer,
        table: LabelStudioTable,
        project: int,
        api_url: str,
        every: float,
        tasks: dict,
        during_import: bool = False,
    ) -> None:
        super().__init__(daemon=True)
        self.ls, self.table, self.project, self.api_url = ls, table, project, api_url
        self.every, self.tasks = every, tasks
        self.annotated: set[int] = set()
        self.stopping = threading.Event()
        self.settling = threading.Event()
        self.titles = {b["title"] for b in ls.get("/api/ml", params={"project": project})}
        self.since: dict[int, float] = {}
        self.longest = 0.0
        self.samples = 0  # through the API
        self.blank_samples = 0
        self.settle_samples = 0  # from the tables
        self.settle_blank_samples = 0
        self.predict_s: list[float] = []
        self.predict_empty = 0
        self.during_import = during_import

    def predict_one(self) -> None:
        task = random.choice([t for t in self.tasks if t not in self.annotated])
        body = {"project": f"{self.project}.0", "tasks": [{"id": task, "data": self.tasks[task]}]}
        started = time.perf_counter()
        reply = requests.post(f"{self.api_url}/predict", json=body, timeout=120).json()
        self.predict_s.append(time.perf_counter() - started)
        self.predict_empty += not reply["results"][0]

    def run(self) -> None:
        while not self.stopping.wait(self.every):
            self.predict_one()
            now = time.time()
            if self.settling.is_set():
                blank = self.table.lacking(self.project, self._shown_version())
                self.settle_samples += 1
                self.settle_blank_samples += bool(blank)
            elif self.during_import:
                continue  # most tasks are not embedded yet: a listing would be the import, and load Label Studio
            else:
                blank = lacking(self.ls, self.project, shown_version(self.ls, self.project, self.api_url))
                self.samples += 1
                self.blank_samples += bool(blank)
            for task in list(self.since):
                if task not in blank:
                    self.longest = max(self.longest, now - self.since.pop(task))
            for task in blank:
                self.since.setdefault(task, now)
            for since in self.since.values():
                self.longest = max(self.longest, now - since)

    def _shown_version(self) -> str:
        """`shown_version`, without a request to Label Studio."""
        shown = self.table.model_version(self.project)
        if shown in self.titles:
            reply = requests.post(f"{self.api_url}/setup", json={"project": self.project}, timeout=10)
            return str(reply.json()["model_version"])
        return shown


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


# Seconds after the last annotation at which the run counts the tasks whose suggestion in Label Studio is not yet
# the current model's (other labels, or a score off by more than common/revisions.py's margin).
SETTLE_CHECKPOINTS = (60, 180, 300, 600)
REVISED = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+: .*\(\d+ revised: (\d+) for their labels, (\d+) for their score\)"
)


SWEEP = re.compile(r": sync \((.+?)\): .*'listed': (\d+),.*? 'listing_seconds': ([\d.]+)")
FITTED = re.compile(r": fitted \S+-(v\d+)-\S+ \((.+?)\) on (\d+) tasks")
KEPT = re.compile(r": refit \((.+?)\) changes ([\d.]+%) of the answers")


def import_work(worker_log: Path) -> dict[str, Any]:
    """From the worker's log so far (the import): each sweep's listed tasks and listing seconds, the versions
    published (why, on how many tasks) and the refits that kept theirs, and how many suggestions were revised."""
    text = worker_log.read_text(errors="replace")
    sweeps = [(m.group(1), int(m.group(2)), float(m.group(3))) for m in SWEEP.finditer(text)]
    return {
        "sweeps_listed": [s[1] for s in sweeps],
        "sweeps_listing_s": [round(s[2], 1) for s in sweeps],
        "versions": [f"{m.group(1)} ({m.group(2)}, {m.group(3)} tasks)" for m in FITTED.finditer(text)]
        + [f"kept ({m.group(1)}: {m.group(2)} changed)" for m in KEPT.finditer(text)],
        "revised": sum(sum(part) for part in revision_reasons(worker_log, time.time()).values()),
    }


def revision_reasons(worker_log: Path, annotations_ended: float) -> dict[str, list[int]]:
    """From the worker's log: how many suggestions were revised for their labels, and how many for their score
    alone, while the annotator worked and after."""
    reasons = {"while annotating": [0, 0], "after": [0, 0]}
    for line in worker_log.read_text(errors="replace").splitlines():
        if m := REVISED.match(line):
            at = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
            part = reasons["while annotating" if at <= annotations_ended else "after"]
            part[0] += int(m.group(2))
            part[1] += int(m.group(3))
    return reasons


def run_size(n: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    redis.Redis.from_url(args.redis_url).flushdb()
    out = tmp / f"n{n}"
    out.mkdir()
    env = {
        "REDIS_URL": args.redis_url, "LOCAL_FILES_DOCUMENT_ROOT": str(DATA), "LOG_LEVEL": "INFO",
        "WORKER_CONCURRENCY": "2", "SYNC_INTERVAL_SECONDS": "300",
    }  # fmt: skip
    with LabelStudioServer(DATA, log_path=out / "label-studio.log", extra_env=LABEL_STUDIO_ENV) as ls:
        assert ls.process is not None and ls.data_dir is not None
        env |= {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.api_key}
        api = ApiProcess(env, out / "api.log")
        worker = WorkerProcess(env, out / "worker.log", "w1")
        beat = BeatProcess(env, out / "beat.log", "beat")
        with contextlib.ExitStack() as stack:
            for part in (api, worker, beat):
                stack.callback(part.stop)
                part.start()
            store = Store.from_url(args.redis_url, embedding_space(Settings.from_env()))
            table = LabelStudioTable(ls.data_dir)
            project = ls.create_project(f"scale {n}", LABEL_CONFIG)
            import_cpu, import_row = throughput.tree_cpu_seconds(ls.process.pid), table.last_id()
            ls.connect_ml_backend(project, api.url)
            files = [PARTICLES[i % len(PARTICLES)] for i in range(n)]
            ids: list[int] = []
            started = time.perf_counter()
            for start in range(0, n, 5000):
                ids += ls.import_tasks(project, [{"image": ref(p)} for p in files[start : start + 5000]])
            path_of = dict(zip(ids, files, strict=True))
            for task in ids[:2]:
                ls.create_annotation(task, annotation(path_of[task]))

            def settled() -> bool:
                busy = store.r.exists(keys.lock(project, "refit"), keys.refit_scheduled(project))
                return (not busy and not store.pending_count(project) and store.delivery.size(project) == 0
                        and store.queue_length(queues.BULK) == 0 and store.embedding_count(project) == n
                        and not lacking(ls, project, shown_version(ls, project, api.url)))  # fmt: skip

            def import_cost() -> dict[str, Any]:
                """What Label Studio paid from connecting the backend until now, and what the worker's log says."""
                assert ls.process is not None
                return {"settled_s": time.perf_counter() - started,
                        "label_studio_cpu_s": throughput.tree_cpu_seconds(ls.process.pid) - import_cpu,
                        "rows": table.last_id() - import_row, **import_work(out / "worker.log")}  # fmt: skip

            imported: dict[str, Any] = {}
            if not args.during_import:
                wait_until(settled, 7200, f"the import of {n} settled", interval=5)
                imported = import_cost()
                print(f"  {n} tasks imported and settled in {imported['settled_s']:.0f} s: Label Studio "
                      f"{imported['label_studio_cpu_s']:.0f} s CPU, {imported['rows']:,} rows; sweeps listed "
                      f"{imported['sweeps_listed']} tasks in {imported['sweeps_listing_s']} s; versions "
                      f"{imported['versions']}; revised {imported['revised']:,}", flush=True)  # fmt: skip
                time.sleep(5)
            page = {"project": project, "page": 1, "page_size": 30, "fields": "all"}

            def dm_page() -> None:
                ls.session.get(ls.url + "/api/tasks", params=page, timeout=120)

            before = {"page_s": statistics.median(timed(dm_page) for _ in range(5)),
                      "next_s": statistics.median(timed(lambda: ls.get(f"/api/projects/{project}/next/"))
                                                  for _ in range(5))}  # fmt: skip
            ls_cpu = throughput.tree_cpu_seconds(ls.process.pid)
            samples = 0 if args.during_import else 5  # the watch lists nothing while the import runs
            for _ in range(samples):
                lacking(ls, project, shown_version(ls, project, api.url))
            sample_cpu = (throughput.tree_cpu_seconds(ls.process.pid) - ls_cpu) / max(1, samples)
            watch = BlankWatch(ls, table, project, api.url, args.sample_every,
                               {t: {"image": ref(p)} for t, p in path_of.items()}, args.during_import)  # fmt: skip
            backend_pids = [api.proc.pid, worker.proc.pid, beat.proc.pid]
            ls_cpu = throughput.tree_cpu_seconds(ls.process.pid)
            ours_cpu = sum(throughput.tree_cpu_seconds(p) for p in backend_pids)
            first_row, first_count = table.last_id(), table.rows(project)
            watch.start()
            annotated_at: dict[int, float] = {}
            fresh, handed, page_during, next_during, failed, stale = 0, 0, [], [], Counter(), Counter()
            handed_blank = 0  # tasks Label Studio handed out with no suggestion (it asks /predict for them first)

            def as_annotator(what: str, call: Callable[[], Any]) -> Any:
                """The annotator's call; one Label Studio failed (HTTP 5xx: on SQLite, "database is locked") is
                counted and tried again, as the UI's user would: by LabelStudioServer.request when its log
                shows the lock, here for any other 5xx."""
                for attempt in range(3):
                    locked = len(ls.locked_retries)
                    try:
                        return call()
                    except LabelStudioError as exc:
                        if "-> HTTP 5" not in str(exc) or attempt == 2:
                            raise
                        failed[what] += 1
                        time.sleep(1)
                    finally:
                        failed[what] += len(ls.locked_retries) - locked

            for _ in range(args.annotations):
                step = time.perf_counter()
                took = time.perf_counter()
                task = as_annotator("next task", lambda: ls.get(f"/api/projects/{project}/next/"))
                next_during.append(time.perf_counter() - took)
                handed += 1
                handed_blank += not task.get("predictions")
                why = stale_because(store, project, ls, task, annotated_at)
                fresh += why is None
                stale.update([why] if why else [])
                as_annotator("annotation", lambda t=task: ls.create_annotation(t["id"], annotation(path_of[t["id"]])))
                annotated_at[task["id"]] = time.time()
                watch.annotated.add(task["id"])
                page_during.append(timed(dm_page))
                time.sleep(max(0.0, args.every - (time.perf_counter() - step)))
            last, annotations_ended = time.perf_counter(), time.time()
            watch.settling.set()
            # What Label Studio paid while the annotator worked, apart from the tail after the last annotation
            # (revisions are paced to a share of its time while annotators work, and take more once quiet).
            while_annotating = (throughput.tree_cpu_seconds(ls.process.pid) - ls_cpu - sample_cpu * watch.samples,
                                table.last_id() - first_row)  # fmt: skip

            def all_current() -> bool:
                busy = store.r.exists(keys.lock(project, "refit"), keys.refit_scheduled(project))
                fitted = store.fitted_labels(project, store.current_version(project))
                return (not busy and store.delivery.size(project) == 0 and len(fitted) == args.annotations + 2
                        and store.embedding_count(project) == n and not store.pending_count(project)
                        and not behind_in_label_studio(store, project))  # fmt: skip

            print(
                f"  {n} tasks: annotations done; while annotating, per annotation: Label Studio "
                f"{while_annotating[0] / args.annotations:.2f} s CPU, {while_annotating[1] / args.annotations:.0f} "
                f"rows; blank samples {watch.blank_samples}/{watch.samples}; /predict empty "
                f"{watch.predict_empty}/{len(watch.predict_s)}; handed out with no suggestion {handed_blank}/{handed}; "
                f"next task reflects {fresh}/{handed}" + (f" (the others: {dict(stale)})" if stale else ""),
                flush=True,
            )
            settle_s: float | None = None
            report_at = 0.0
            behind_after: dict[int, int] = {}  # how far the Data Manager's scores are from the model, as it settles
            while time.perf_counter() - last < args.settle_limit:
                if all_current():
                    settle_s = time.perf_counter() - last
                    break
                since = time.perf_counter() - last
                for checkpoint in (c for c in SETTLE_CHECKPOINTS if since >= c and c not in behind_after):
                    behind_after[checkpoint] = behind_in_label_studio(store, project)
                if since >= report_at:
                    print(f"  {since:.0f} s after the last annotation: "
                          f"{table.last_id() - first_row} rows written, Label Studio "
                          f"{throughput.tree_cpu_seconds(ls.process.pid) - ls_cpu:.0f} s CPU", flush=True)  # fmt: skip
                    report_at += 300
                time.sleep(1)
            left = 0 if settle_s is not None else behind_in_label_studio(store, project)
            behind_after |= {c: 0 for c in SETTLE_CHECKPOINTS if settle_s is not None and c >= settle_s}
            watch.stopping.set()
            watch.join()
            ls_cpu = throughput.tree_cpu_seconds(ls.process.pid) - ls_cpu - sample_cpu * watch.samples
            ours_cpu = sum(throughput.tree_cpu_seconds(p) for p in backend_pids) - ours_cpu
            rows = table.last_id() - first_row
            deleted = rows - (table.rows(project) - first_count)
            if args.during_import:
                imported = import_cost()
                print(f"  {n} tasks, annotated while imported: the whole settled in {imported['settled_s']:.0f} s: "
                      f"Label Studio {imported['label_studio_cpu_s']:.0f} s CPU, {imported['rows']:,} rows; versions "
                      f"{imported['versions']}; revised {imported['revised']:,}", flush=True)  # fmt: skip
            sweep = (measure_sweep(ls, api.url, store, project) if settle_s is not None
                     else {"label_studio_cpu_s": float("nan"), "listing_s": float("nan")})  # fmt: skip
            return {
                "tasks": n,
                "import": imported,
                "rows_per_annotation": rows / args.annotations,
                "deleted_per_annotation": deleted / args.annotations,
                "label_studio_cpu_per_annotation_s": ls_cpu / args.annotations,
                "label_studio_cpu_while_annotating_s": while_annotating[0] / args.annotations,
                "rows_while_annotating": while_annotating[1] / args.annotations,
                "backend_cpu_per_annotation_s": ours_cpu / args.annotations,
                "longest_blank_s": watch.longest,
                "samples_with_a_blank_task": f"{watch.blank_samples}/{watch.samples}",
                "settle_samples_with_a_blank_task": f"{watch.settle_blank_samples}/{watch.settle_samples}",
                "sample_cpu_s": sample_cpu,
                "next_task_reflected": f"{fresh}/{handed}",
                "handed_out_blank": f"{handed_blank}/{handed}",
                "during_import": args.during_import,
                "next_task_stale_because": dict(stale),
                "annotator_calls_failed": dict(failed),
                "label_studio_locked_retries": len(ls.locked_retries),
                "predict_p99_s": sorted(watch.predict_s)[int(0.99 * (len(watch.predict_s) - 1))],
                "predict_max_s": max(watch.predict_s),
                "predict_empty": f"{watch.predict_empty}/{len(watch.predict_s)}",
                "rows_per_task_after": table.rows(project) / n,
                "settle_s": settle_s,
                "behind_at_settle_limit": left,
                "page_before_s": before["page_s"],
                "page_during_s": statistics.median(page_during),
                "next_before_s": before["next_s"],
                "next_during_s": statistics.median(next_during),
                "project_model_version": ls.get_project(project).get("model_version"),
                "sweep_label_studio_cpu_s": sweep["label_studio_cpu_s"],
                "sweep_listing_s": sweep["listing_s"],
                "revised_for_labels_score": revision_reasons(out / "worker.log", annotations_ended),
                "behind_after_s": behind_after,
            }


def measure_sweep(ls: LabelStudioServer, api_url: str, store: Store, project: int) -> dict[str, float]:
    """One reconciliation of the settled project (`POST /sync`, what beat runs every SYNC_INTERVAL_SECONDS):
    Label Studio's CPU for it, and how long the backend's listings took."""
    assert ls.process is not None
    before = (store.last_sync(project) or {}).get("started", 0)
    cpu = throughput.tree_cpu_seconds(ls.process.pid)
    requests.post(f"{api_url}/sync", json={"project": project}, timeout=30).raise_for_status()
    wait_until(lambda: (store.last_sync(project) or {}).get("started", 0) > before, 1800, "the sweep", interval=1)
    return {"label_studio_cpu_s": throughput.tree_cpu_seconds(ls.process.pid) - cpu,
            "listing_s": float((store.last_sync(project) or {}).get("listing_seconds", 0))}  # fmt: skip


def behind_in_label_studio(store: Store, project: int) -> int:
    """How many unannotated tasks' suggestions in Label Studio are not the current model's: read from Redis
    when the backend records what Label Studio shows (`keys.shown`), else from its deliveries of the current
    version (the code before revisions wrote every task anew at each version)."""
    if hasattr(keys, "shown") and store.r.exists(keys.shown(project)):
        from common.revisions import behind

        return len(behind(store, project))
    version = store.current_version(project)
    todo = store.featured_tasks(project) - store.annotated_tasks(project)
    written = {int(t) for t, c in store.r.hgetall(keys.delivery(project, version)).items()
               if c.startswith((b"written", b"api", b"refused"))}  # fmt: skip
    answered = store.predictions(project, version, todo)
    return sum(t not in written and bool(answered.get(t, {}).get("result")) for t in todo)


def stale_because(
    store: Store, project: int, ls: LabelStudioServer, task: dict[str, Any], annotated_at: dict
) -> str | None:
    """None when the task Label Studio handed out shows the answer of a model fitted on every annotation made
    FRESH_AFTER seconds before: the version whose answer the backend wrote there (`Store.shown`, checked
    against the labels Label Studio holds), or one that answers the same as the current version. Else why
    not: no such model yet ("not learnt"), or Label Studio shows an older model's other answer ("not
    written")."""
    due = {t for t, at in annotated_at.items() if at < time.time() - FRESH_AFTER}
    shown = ls.get_project(project).get("model_version") or ""
    version = store.current_version(project)
    held = [p for p in task.get("predictions") or ls.task_predictions(task["id"])
            if p.get("model_version") in (shown, version, getattr(store, "live_version", lambda: "")())]  # fmt: skip
    written = store.shown(project, [task["id"]]).get(task["id"])
    if (written and due <= set(store.fitted_labels(project, written.version))
            and any(labels_digest(p) == written.digest for p in held)):  # fmt: skip
        return None
    if not due <= set(store.fitted_labels(project, version)):
        return "not learnt"
    answer = store.predictions(project, version, [task["id"]]).get(task["id"])
    if not answer or not answer.get("result"):
        return "no answer"
    return None if any(labels_digest(p) == labels_digest(answer) for p in held) else "not written"


def settle_cell(r: dict[str, Any]) -> str:
    if r["settle_s"] is not None:
        return f"{r['settle_s']:.0f}"
    return f"not within the limit ({r['behind_at_settle_limit']:,} tasks behind)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2000,20000,50000")
    parser.add_argument("--annotations", type=int, default=20)
    parser.add_argument("--every", type=float, default=3.0)
    parser.add_argument("--sample-every", type=float, default=2.0)
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15"))
    parser.add_argument("--settle-limit", type=float, default=3600.0,
                        help="seconds to wait for every task to show the newest model after the last annotation; "
                        "past it the run reports how many tasks were still behind")  # fmt: skip
    parser.add_argument(
        "--during-import",
        action="store_true",
        help="annotate from the seed annotations on, while the import is embedded and written",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    random.seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    print(f"logs in {tmp}", flush=True)
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        print(f"{n} tasks...", flush=True)
        results.append(run_size(n, args, tmp))
        print(json.dumps(results[-1]), flush=True)
    print(
        f"\n{args.annotations} annotations, one every {args.every:g} s, Label Studio 1.23 on {os.cpu_count()} cores\n"
    )
    print("| tasks | rows written (deleted) per annotation | Label Studio CPU s per annotation | "
          "of which while annotating: CPU s (rows) | "
          "backend CPU s per annotation | longest blank s | next task reflects annotations >15 s (handed out blank) | "
          "annotator calls failed (HTTP 5xx) | rows per task after | settled after s | "
          "DM page before / during ms | next task before / during ms | /predict max s (empty) | "
          "a sweep: Label Studio CPU s (listing s) |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['tasks']:,} | {r['rows_per_annotation']:.0f} ({r.get('deleted_per_annotation', 0):.0f}) | "
            f"{r['label_studio_cpu_per_annotation_s']:.2f} | "
            f"{r.get('label_studio_cpu_while_annotating_s', 0):.2f} ({r.get('rows_while_annotating', 0):.0f}) | "
            f"{r['backend_cpu_per_annotation_s']:.2f} | {r['longest_blank_s']:.0f} "
            f"({r['samples_with_a_blank_task']} samples; settling {r.get('settle_samples_with_a_blank_task', '-')}) | "
            f"{r['next_task_reflected']} ({r.get('handed_out_blank', '-')}) | "
            f"{sum(r.get('annotator_calls_failed', {}).values())} | "
            f"{r['rows_per_task_after']:.2f} | {settle_cell(r)} | {1000 * r['page_before_s']:.0f} / "
            f"{1000 * r['page_during_s']:.0f} | {1000 * r['next_before_s']:.0f} / {1000 * r['next_during_s']:.0f} | "
            f"{r['predict_max_s']:.2f} ({r['predict_empty']}) | {r['sweep_label_studio_cpu_s']:.1f} "
            f"({r['sweep_listing_s']:.1f}) |"
        )
    print(
        f"\n(a blank-task sample costs Label Studio {1000 * results[-1]['sample_cpu_s']:.0f} ms of CPU at "
        f"{results[-1]['tasks']:,} tasks, left out of its CPU per annotation above; once the annotations end the "
        f"samples read its tables instead)"
    )
    for r in results:
        during, after = r["revised_for_labels_score"]["while annotating"], r["revised_for_labels_score"]["after"]
        print(f"{r['tasks']:,} tasks: suggestions revised for their labels / for their score alone: "
              f"{during[0]:,} / {during[1]:,} while annotating, {after[0]:,} / {after[1]:,} after")  # fmt: skip
        counts = r["behind_after_s"]
        behind = " / ".join(f"{counts[c]:,}" if c in counts else "-" for c in SETTLE_CHECKPOINTS)
        if r.get("during_import"):
            i = r["import"]
            print(f"{r['tasks']:,} tasks annotated while imported: the whole settled in {i['settled_s']:.0f} s after "
                  f"the import began, Label Studio {i['label_studio_cpu_s']:.0f} s CPU, {i['rows']:,} rows, "
                  f"{i['revised']:,} revised; versions {i['versions']}")  # fmt: skip
        print(f"{r['tasks']:,} tasks: suggestions not yet the model's {' / '.join(map(str, SETTLE_CHECKPOINTS))} s "
              f"after the last annotation: {behind}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
