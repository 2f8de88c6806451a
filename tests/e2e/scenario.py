"""A whole deployment around a real Label Studio, the events people make in any order, the faults that
happen, and the check of the invariant (README "Every task, exactly once"). Shared by the interleaving
test (tests/e2e/test_invariant.py) and bench/chaos.py.

The stack: a real Label Studio; a private Redis with an append-only file; the gunicorn API; Celery
workers (separate processes, as separate hosts would be) and beat. Two fault proxies stand between them:
the workers reach Label Studio through one that can refuse connections, and Label Studio's webhooks reach
the API through one that drops or repeats them.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

from common.annotations import annotation_labels
from common.label_config import parse_label_config
from common.models import embedding_space
from common.settings import Settings
from common.store import Store, ours, truth
from tests.conftest import worker_env
from tests.e2e.label_studio import LabelStudioServer
from tests.faults import FaultProxy, RedisServer, random_webhook_policy
from tests.helpers import DATA, LABEL_CONFIG, ApiProcess, BeatProcess, WorkerProcess, wait_until

PARTICLES = sorted((DATA / "flowcam" / "particles").glob("*.png"))
TAGS = parse_label_config(LABEL_CONFIG)
UNREADABLE = "/data/local-files/?d=flowcam/particles/missing-on-purpose.png"


def image_ref(path: Path) -> str:
    return f"/data/local-files/?d={path.relative_to(DATA)}"


@dataclass
class Stack:
    ls: LabelStudioServer
    redis: RedisServer
    api: ApiProcess
    workers: list[WorkerProcess]
    beat: BeatProcess
    ls_proxy: FaultProxy
    relay: FaultProxy
    project: int
    ml_backend: int
    store: Store
    tmp: Path
    log: list[str] = field(default_factory=list)

    def setup_version(self) -> str:
        reply = requests.post(f"{self.api.url}/setup", json={"project": f"{self.project}.0"}, timeout=10)
        return reply.json()["model_version"]

    def new_project(self, title: str) -> int:
        """A Label Studio project from the real config, connected to the backend through the webhook relay."""
        self.project = self.ls.create_project(title, LABEL_CONFIG)
        self.ml_backend = self.ls.connect_ml_backend(self.project, self.relay.url, title=title)
        self.log.clear()
        return self.project

    def stop(self) -> None:
        for part in (self.beat, *self.workers, self.api):
            with contextlib.suppress(Exception):
                part.stop()
        self.relay.close()
        self.ls_proxy.close()
        self.redis.stop()

    def logs(self, lines: int = 40) -> str:
        parts = [f"--- {w.name} ---\n{w.log_tail(lines)}" for w in (*self.workers, self.beat)]
        return "\n".join(parts + [f"--- api ---\n{self.api.log_path.read_text(errors='replace')[-3000:]}"])


@contextlib.contextmanager
def deployment(
    ls: LabelStudioServer, tmp: Path, seed: int, *, drop: float = 0.0, twice: float = 0.0, workers: int = 2,
    **env: str,
) -> Iterator[Stack]:  # fmt: skip
    """The stack, started; stopped on exit. `env` overrides the backend's settings."""
    redis_server = RedisServer(tmp / "redis").start()
    ls_proxy = FaultProxy(ls.url)
    defaults = {
        "REDIS_URL": redis_server.url,
        "LABEL_STUDIO_URL": ls_proxy.url,
        "LABEL_STUDIO_API_KEY": ls.api_key,
        "CHUNK_SIZE": "16",
        "REFIT_EVERY": "4",
        "REFIT_DELAY_SECONDS": "3",
        "SYNC_INTERVAL_SECONDS": "10",
        "BROKER_VISIBILITY_TIMEOUT": "30",
        "PREDICT_WAIT_SECONDS": "2",
        "KMEANS_CLUSTERS": "4",
        "WORKER_CONCURRENCY": "1",
    }
    settings = worker_env(tmp, **{**defaults, **env})
    api = ApiProcess(settings, tmp / "api.log").start()
    relay = FaultProxy(api.url, webhook_policy=random_webhook_policy(seed, drop, twice))
    pool = [WorkerProcess(settings, tmp / f"worker-w{i}.log", f"w{i}") for i in range(1, workers + 1)]
    beat = BeatProcess(settings, tmp / "beat.log", "beat")
    store = Store.from_url(redis_server.url, embedding_space(Settings.from_env()))
    stack = Stack(ls, redis_server, api, pool, beat, ls_proxy, relay, 0, 0, store, tmp)
    try:
        start_all(pool)
        beat.start()
        yield stack
    finally:
        stack.stop()


def start_all(workers: list[WorkerProcess]) -> None:
    """Start several workers at once (each loads its model for seconds)."""
    threads = [threading.Thread(target=w.start) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in workers:
        if w.proc is None or w.proc.poll() is not None:
            raise AssertionError(f"worker {w.name} did not start:\n{w.log_tail()}")


# -- the events ------------------------------------------------------------------------------------------


def random_labels(rng: random.Random) -> list[dict[str, Any]]:
    result = []
    for tag in TAGS.choices:
        if tag.name in ("organism_type", "shape") or rng.random() < 0.3:
            labels = [rng.choice(tag.labels)] if not tag.multiple else rng.sample(tag.labels, rng.randint(1, 2))
            result.append({"from_name": tag.name, "to_name": tag.to_name, "type": "choices",
                           "value": {"choices": labels}})  # fmt: skip
    return result


class Scenario:
    """Seeded random events and faults against a stack. Every call returns at once or after the one Label
    Studio request it makes; faults that last end on timers."""

    def __init__(self, stack: Stack, seed: int, *, faults: bool = True) -> None:
        self.s = stack
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults
        self.particles = self.rng.sample(PARTICLES, len(PARTICLES))
        self.tasks: list[int] = []
        self.annotations: dict[int, int] = {}  # annotation id -> task
        self.extra_labels = 0
        self.timers: list[threading.Thread] = []
        self.done: Counter[str] = Counter()

    def note(self, what: str) -> None:
        self.done[what.split(" ")[0]] += 1
        self.s.log.append(f"{time.strftime('%H:%M:%S')} {what}")

    def import_tasks(self, n: int, unreadable: bool = False, annotated: int = 0) -> list[int]:
        batch: list[dict[str, Any]] = [{"image": image_ref(self.particles.pop())} for _ in range(n)]
        if unreadable:
            batch.append({"image": UNREADABLE})
        for item in batch[:annotated]:
            item_ = dict(item)
            item.clear()
            item.update({"data": item_, "annotations": [{"result": random_labels(self.rng)}]})
        ids = self.s.ls.import_tasks(self.s.project, batch)
        self.tasks += ids
        self.note(f"import {len(ids)} tasks ({annotated} with annotations{', one unreadable' if unreadable else ''})")
        return ids

    def annotate(self, cancelled: bool = False) -> None:
        task = self.rng.choice(self.tasks)
        aid = self.s.ls.create_annotation(task, random_labels(self.rng), was_cancelled=cancelled)
        if not cancelled:
            self.annotations[aid] = task
        self.note(f"{'skip' if cancelled else 'annotate'} task {task}")

    def update(self) -> None:
        aid = self.rng.choice(sorted(self.annotations))
        self.s.ls.request("PATCH", f"/api/annotations/{aid}", json={"result": random_labels(self.rng)})
        self.note(f"update annotation {aid}")

    def delete_annotation(self) -> None:
        aid = self.rng.choice(sorted(self.annotations))
        self.s.ls.request("DELETE", f"/api/annotations/{aid}", expect=(200, 204))
        del self.annotations[aid]
        self.note(f"delete annotation {aid}")

    def delete_task_annotations(self) -> None:
        """The Data Manager's bulk action on a few tasks: ANNOTATIONS_DELETED with several."""
        tasks = self.rng.sample(self.tasks, min(3, len(self.tasks)))
        self.s.ls.post("/api/dm/actions", {"selectedItems": {"all": False, "included": tasks}},
                       params={"id": "delete_tasks_annotations", "project": self.s.project})  # fmt: skip
        self.annotations = {a: t for a, t in self.annotations.items() if t not in tasks}
        self.note(f"bulk-delete annotations of tasks {tasks}")

    def delete_tasks(self) -> None:
        tasks = self.rng.sample(self.tasks, min(2, len(self.tasks)))
        self.s.ls.post("/api/dm/actions", {"selectedItems": {"all": False, "included": tasks}},
                       params={"id": "delete_tasks", "project": self.s.project})  # fmt: skip
        self.tasks = [t for t in self.tasks if t not in tasks]
        self.annotations = {a: t for a, t in self.annotations.items() if t not in tasks}
        self.note(f"delete-tasks {tasks}")

    def train(self) -> None:
        self.s.ls.start_training(self.s.ml_backend)
        self.note("train: Start training")

    def change_config(self) -> None:
        self.extra_labels += 1
        xml = LABEL_CONFIG.replace('<Choice value="Rod-like"/>', "<Choice value=\"Rod-like\"/>" + "".join(
            f'<Choice value="Shape {i}"/>' for i in range(1, self.extra_labels + 1)))  # fmt: skip
        self.s.ls.update_project(self.s.project, label_config=xml)
        self.note(f"config: {self.extra_labels} more shape labels")

    def retrieve(self) -> None:
        tasks = self.rng.sample(self.tasks, min(len(self.tasks), self.rng.randint(2, 20)))
        self.s.ls.retrieve_predictions(self.s.project, tasks)
        self.note(f"retrieve predictions for {len(tasks)} tasks")

    def open_task(self) -> None:
        task = self.rng.choice(self.tasks)
        self.s.ls.get_task(task)
        self.note(f"open task {task}")

    # -- faults ------------------------------------------------------------------------------------------

    def later(self, seconds: float, fn: Any, *args: Any) -> None:
        def run() -> None:
            time.sleep(seconds)
            fn(*args)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.timers.append(thread)

    def kill_worker(self, down_for: float) -> None:
        worker = self.rng.choice(self.s.workers)
        if worker.proc is None or worker.proc.poll() is not None:
            return
        worker.kill()
        self.later(down_for, worker.start)
        self.note(f"kill worker {worker.name} (SIGKILL) for {down_for:.0f} s")

    def label_studio_down(self, seconds: float) -> None:
        """The workers cannot reach Label Studio: refused connections, or 503s."""
        if self.rng.random() < 0.5:
            self.s.ls_proxy.down()
            how = "refusing connections"
        else:
            self.s.ls_proxy.errors()
            how = "answering 503"
        self.later(seconds, self.s.ls_proxy.up)
        self.note(f"outage: Label Studio {how} to the workers for {seconds:.0f} s")

    def restart_redis(self) -> None:
        self.s.redis.restart(pause=self.rng.uniform(0.5, 2))
        self.note("redis killed and restarted on its append-only file")

    # -- a schedule --------------------------------------------------------------------------------------

    def run(self, events: int, outage: float = 8.0, kill_for: float = 5.0) -> None:
        """`events` random events, 0-1 s apart; faults among them when enabled."""
        self.import_tasks(self.rng.randint(8, 20), unreadable=True)
        weights = {
            self.import_tasks_random: 3, self.annotate: 6, self.update: 2, self.delete_annotation: 1,
            self.delete_task_annotations: 0.5, self.delete_tasks: 0.5, self.train: 1, self.change_config: 0.5,
            self.retrieve: 1, self.open_task: 1, self.skip: 0.5,
        }  # fmt: skip
        if self.faults:
            weights.update({lambda: self.kill_worker(kill_for): 0.6, lambda: self.label_studio_down(outage): 0.5,
                            self.restart_redis: 0.3})  # fmt: skip
        actions, odds = list(weights), list(weights.values())
        for _ in range(events):
            time.sleep(self.rng.uniform(0, 1.0))
            action = self.rng.choices(actions, odds)[0]
            needs_annotation = action in (self.update, self.delete_annotation)
            if (needs_annotation and not self.annotations) or not self.tasks:
                action = self.annotate if self.tasks else self.import_tasks_random
            action()
        for timer in self.timers:
            timer.join()
        self.heal()

    def import_tasks_random(self) -> None:
        self.import_tasks(self.rng.randint(1, 25), unreadable=self.rng.random() < 0.1,
                          annotated=self.rng.choice([0, 0, 0, 1, 2]))  # fmt: skip

    def skip(self) -> None:
        self.annotate(cancelled=True)

    def heal(self) -> None:
        """The events stopped: Label Studio reachable, every worker running."""
        self.s.ls_proxy.up()
        for worker in self.s.workers:
            if worker.proc is None or worker.proc.poll() is not None:
                worker.start()


# -- the invariant ---------------------------------------------------------------------------------------


@dataclass
class Check:
    version: str  # the live version: the name Label Studio shows (/setup), whichever model's answer it carries
    tasks: int
    lacking: list[int]  # unannotated, readable, without exactly one prediction of `version`
    duplicates: list[tuple[int, str]]  # (task, version) with more than one prediction, or of our older versions
    unlearned: list[int]  # annotated tasks whose labels the current version did not learn
    unexplained: list[int]  # unreadable tasks without a reason
    wrong_model: list[int]  # predictions of `version` that its model would not make
    queued: int = 0  # tasks the backend still counts as queued for embedding (none once all has settled)

    @property
    def ok(self) -> bool:
        return not (self.lacking or self.duplicates or self.unlearned or self.unexplained or self.wrong_model
                    or self.queued)  # fmt: skip

    def summary(self) -> str:
        return (
            f"version {self.version}, {self.tasks} tasks: {len(self.lacking)} lacking a current prediction "
            f"{self.lacking[:10]}, {len(self.duplicates)} duplicates {self.duplicates[:5]}, "
            f"{len(self.unlearned)} annotations not learned {self.unlearned[:10]}, "
            f"{len(self.unexplained)} failures unexplained, "
            f"{len(self.wrong_model)} predictions not from the version's model {self.wrong_model[:10]}, "
            f"{self.queued} still queued"
        )


def check_invariant(stack: Stack) -> Check:
    """The four points, read from Label Studio (its API, as the UI reads it) and the backend's API."""
    version = stack.setup_version()
    model = stack.store.current_version(stack.project)
    config = parse_label_config(stack.ls.get_project(stack.project)["label_config"])
    tasks = stack.ls.list_tasks(stack.project, page_size=500)
    status = requests.get(f"{stack.api.url}/projects/{stack.project}", timeout=10).json()
    failures = {f["task"]: f for f in status.get("failures", [])}
    lacking, duplicates, unexplained, annotated = [], [], [], {}
    current: dict[int, dict[str, Any]] = {}
    for task in tasks:
        live = {a["id"]: annotation_labels(a, config) for a in task["annotations"] if not a.get("was_cancelled")}
        readable = task["data"].get("image") != UNREADABLE
        counts = Counter(p["model_version"] for p in task["predictions"])
        duplicates += [(task["id"], v) for v, n in counts.items() if n > 1]
        if not live:
            duplicates += [(task["id"], v) for v in counts if ours(v) and v != version]
        if not readable:
            job = failures.get(task["id"], {}).get("job")
            reason = failures.get(task["id"], {}).get("reason", "")
            listed = job and any(e["task"] == task["id"] for e in _job(stack, job).get("errors", []))
            if not (reason and listed):
                unexplained.append(task["id"])
        elif live:
            labels = truth({aid: v for aid, v in live.items() if v is not None})
            if labels:
                annotated[task["id"]] = labels
        elif counts[version] != 1:
            lacking.append(task["id"])
        else:
            current[task["id"]] = next(p for p in task["predictions"] if p["model_version"] == version)
    fitted = stack.store.fitted_labels(stack.project, model)
    unlearned = sorted(t for t in set(annotated) | set(fitted) if annotated.get(t) != fitted.get(t))
    return Check(version, len(tasks), sorted(lacking), duplicates, unlearned, sorted(unexplained),
                 _not_from_model(stack, model, current, config), status["tasks"]["queued"])  # fmt: skip


def _job(stack: Stack, job_id: str) -> dict[str, Any]:
    return requests.get(f"{stack.api.url}/jobs/{job_id}", timeout=10).json()


def _not_from_model(stack: Stack, version: str, predictions: dict[int, dict[str, Any]], config: Any) -> list[int]:
    """Recompute each prediction with the model of `version` (the current one), as stored in Redis, from the
    task's features: the labels must be that model's (the score may lag by common/revisions.py's margin)."""
    from common.collections import collection_of
    from worker.pipeline import from_bytes
    from worker.project_model import model_from_bytes
    from worker.results import build_prediction

    if not predictions:
        return []
    blob = stack.store.model_blob(stack.project, version)
    if blob is None:
        return sorted(predictions)
    model = model_from_bytes(blob)
    features = stack.store.embeddings(stack.project, predictions)
    ids = [t for t in predictions if t in features]
    refs = stack.store.task_images(stack.project, ids)
    matrix = from_bytes([features[t] for t in ids]) if ids else np.zeros((0, 1))
    answers = model.predict(matrix, None, (), [collection_of(refs.get(t, "")) for t in ids])
    wrong = [t for t in predictions if t not in features]
    for tid, choices in zip(ids, answers, strict=True):
        expected = build_prediction(choices, config, version)["result"]
        if _choices(predictions[tid]["result"]) != _choices(expected):
            wrong.append(tid)
    return sorted(wrong)


def _choices(result: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {item["from_name"]: sorted(item["value"]["choices"]) for item in result}


def converge(stack: Stack, timeout: float) -> tuple[Check, float]:
    """Wait (the periodic sweep included) until the invariant holds; returns the last check and the time."""
    started, last = time.monotonic(), None

    def holds() -> bool:
        nonlocal last
        try:
            last = check_invariant(stack)
        except (requests.RequestException, KeyError, ValueError) as exc:  # the API or Label Studio busy
            stack.log.append(f"check failed: {exc}")
            return False
        return last.ok

    with contextlib.suppress(AssertionError):
        wait_until(holds, timeout, "the invariant", interval=3)
    return last, time.monotonic() - started
