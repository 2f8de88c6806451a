"""What Label Studio pays to store, find, replace and delete predictions, in a project of N tasks.

One real Label Studio 1.23 run as compose runs it (sqlite, the memory-efficient prediction import flag), one
project of N tasks holding one prediction each (as the backend leaves it), then each way Label Studio's API
offers to replace or delete predictions, on K tasks at a time: its process tree's CPU seconds and the
request's wall time. The figures chose how the backend revises a suggestion (common/revisions.py) and
prunes superseded versions; bench/RESULTS.md has them.

    .venv/bin/python bench/ls_prediction_api.py [--tasks 20000] [--batch 300]

`--sweep` measures instead the listings the reconciliation sweep makes (worker/sync.py `_reconcile`, through
worker/label_studio.py, as the worker asks them), in a project with a few annotated, lacking and crowded
tasks: what a sweep costs Label Studio at N tasks, and which part grows with N.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402

from tests.e2e.label_studio import LabelStudioServer  # noqa: E402
from tests.helpers import DATA  # noqa: E402
from worker.label_studio import LabelStudioApi  # noqa: E402

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="organism_type" toName="image">
    <Choice value="Plankton"/><Choice value="Debris"/>
  </Choices>
</View>"""
# compose.yml's Label Studio settings that change what storing predictions costs.
LABEL_STUDIO_ENV = {"fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short": "true"}


def prediction(task: int, label: str, score: float, version: str) -> dict[str, Any]:
    item = {"id": f"r{task}", "from_name": "organism_type", "to_name": "image", "type": "choices",
            "value": {"choices": [label]}}  # fmt: skip
    return {"task": task, "result": [item], "score": score, "model_version": version}


class Meter:
    """Label Studio's CPU seconds and the wall time of one step."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rows: list[tuple[str, int, float, float]] = []

    def measure(self, name: str, count: int, step: Callable[[], Any]) -> Any:
        cpu, wall = throughput.tree_cpu_seconds(self.pid), time.perf_counter()
        result = step()
        wall = time.perf_counter() - wall
        time.sleep(0.3)  # Label Studio's work after the reply (counters, signals) is counted too
        self.rows.append((name, count, throughput.tree_cpu_seconds(self.pid) - cpu, wall))
        print(f"  {name}: {count} in {wall:.2f} s, Label Studio {self.rows[-1][2]:.2f} CPU s", flush=True)
        return result

    def report(self, n: int, k: int) -> None:
        print(f"\n## Label Studio's cost of prediction calls, {n} tasks, {k} at a time\n")
        print("| call | rows or tasks | wall s | Label Studio CPU s | CPU ms per row |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, count, cpu, wall in self.rows:
            print(f"| {name} | {count} | {wall:.2f} | {cpu:.2f} | {1000 * cpu / max(1, count):.2f} |")


def spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def spinning(cores: int) -> Iterator[None]:
    """`cores` processes that keep a core each busy, while the block runs."""
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(cores)]
    for s in spinners:
        s.start()
    try:
        yield
    finally:
        for s in spinners:
            s.terminate()
            s.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=300, help="tasks per replace or delete measured")
    parser.add_argument("--delete-sizes", default="", help="only the Data Manager's delete, on these many tasks "
                        "(comma-separated): what of its cost is per request, what per row")  # fmt: skip
    parser.add_argument("--list-sizes", default="", help="only the listing of selected tasks with their "
                        "predictions, on these many tasks (comma-separated): cost per request, per task")  # fmt: skip
    parser.add_argument("--revise-sizes", default="", help="only a revision as the deliverer makes it (list the "
                        "tasks with their predictions, delete them, import new ones), in requests of these many tasks "
                        "(comma-separated), three of each")  # fmt: skip
    parser.add_argument("--busy-cores", type=int, default=0, help="with --revise-sizes: each revision measured "
                        "again while this many other processes spin (as the worker and a sampler take cores from "
                        "Label Studio in a run): what sharing the machine adds to its CPU seconds")  # fmt: skip
    parser.add_argument("--sweep", default="", metavar="ANNOTATED,LACKING,CROWDED",
                        help="only the sweep's listings, three of each, with this many tasks annotated, lacking the "
                        "live version and holding two predictions (for example 50,20,10)")  # fmt: skip
    parser.add_argument("--ls-env", action="append", default=[], metavar="NAME=VALUE",
                        help="Label Studio's environment beside compose.yml's (repeatable)")  # fmt: skip
    args = parser.parse_args()
    n, k = args.tasks, args.batch
    ls_env = LABEL_STUDIO_ENV | dict(item.split("=", 1) for item in args.ls_env)
    with (
        tempfile.TemporaryDirectory() as tmp,
        LabelStudioServer(DATA, log_path=Path(tmp) / "ls.log", extra_env=ls_env) as ls,
    ):
        assert ls.process is not None
        meter = Meter(ls.process.pid)
        pid = ls.create_project("api costs", CONFIG)
        ids: list[int] = []
        for start in range(0, n, 5000):
            ids += ls.import_tasks(
                pid, [{"image": f"https://example.org/p{i}.png"} for i in range(start, min(n, start + 5000))]
            )
        print(f"project {pid}: {len(ids)} tasks", flush=True)

        def import_rows(tasks: list[int], version: str, label: str = "Plankton") -> Any:
            return ls.post(f"/api/projects/{pid}/import/predictions",
                           [prediction(t, label, 0.7, version) for t in tasks])  # fmt: skip

        for start in range(0, n, 5000):
            part = ids[start : start + 5000]
            name = f"import {len(part)} predictions (one request)"
            meter.measure(name, len(part), lambda p=part: import_rows(p, "gen-a"))
        batches = [ids[i * k : (i + 1) * k] for i in range(8)]

        def listing(tasks: list[int], include: str) -> list[dict[str, Any]]:
            query = json.dumps({"selectedItems": {"all": False, "included": tasks}})
            params = {"project": pid, "page_size": len(tasks), "fields": "all", "include": include, "query": query}
            reply = ls.get("/api/tasks", params=params)
            return reply["tasks"] if isinstance(reply, dict) else reply

        def row_ids(tasks: list[int]) -> list[int]:
            return [p["id"] for task in listing(tasks, "id,predictions") for p in task.get("predictions", [])]

        def each(method: str, paths: list[str], **kwargs: Any) -> None:
            for path in paths:
                ls.request(method, path, expect=(200, 204), **kwargs)

        def dm_delete(tasks: list[int]) -> Any:
            selected = {"selectedItems": {"all": False, "included": tasks}}
            return ls.post("/api/dm/actions", selected, params={"id": "delete_tasks_predictions", "project": pid})

        def revise(tasks: list[int]) -> Any:
            listing(tasks, "id,predictions")
            dm_delete(tasks)
            return import_rows(tasks, "gen-a", "Debris")

        versions = f"/api/projects/{pid}/model-versions/"
        measure = meter.measure
        if args.sweep:
            annotated, lacking, crowded = (int(x) for x in args.sweep.split(","))
            answer = [{"from_name": "organism_type", "to_name": "image", "type": "choices",
                       "value": {"choices": ["Debris"]}}]  # fmt: skip
            spread = ids[:: max(1, n // (annotated + lacking + crowded))]
            for task in spread[:annotated]:
                ls.create_annotation(task, answer)
            dm_delete(spread[annotated : annotated + lacking])
            import_rows(spread[annotated + lacking : annotated + lacking + crowded], "gen-a")
            time.sleep(2)
            sweep(meter, LabelStudioApi(ls.url, ls.api_key), pid, ids, (annotated, lacking, crowded))
            ids = []
        if args.list_sizes:
            start = 0
            for size in [int(x) for x in args.list_sizes.split(",")]:
                for _ in range(3):
                    chosen, start = ids[start : start + size], (start + size) % max(1, n - size)
                    measure(f"list {size} selected tasks with their predictions", size,
                            lambda c=chosen: listing(c, "id,predictions"))  # fmt: skip
            for _ in range(3):
                measure(
                    "GET /api/projects/<id>/model-versions/", 1, lambda: ls.get(f"/api/projects/{pid}/model-versions/")
                )
            ids = []
        if args.delete_sizes:
            start = 0
            for size in [int(x) for x in args.delete_sizes.split(",")]:
                for _ in range(2):
                    chosen, start = ids[start : start + size], start + size
                    name = f"Data Manager delete_tasks_predictions on {size} tasks"
                    measure(name, size, lambda c=chosen: dm_delete(c))
                    measure(f"import {size} predictions after that delete", size,
                            lambda c=chosen: import_rows(c, "gen-a", "Debris"))  # fmt: skip
            ids = []
        if args.revise_sizes:
            start = 0
            for size in [int(x) for x in args.revise_sizes.split(",")]:
                for busy in sorted({0, args.busy_cores}):
                    with spinning(busy):
                        for _ in range(3):
                            chosen, start = ids[start : start + size], start + size
                            measure(f"revise {size} tasks: list, delete, import" + (f", {busy} cores busy" if busy
                                    else ""), size, lambda c=chosen: revise(c))  # fmt: skip
            ids = []
        if not ids:
            return meter.report(n, k)
        measure(f"list {k} selected tasks: ids, versions", k,
                lambda: listing(batches[0], "id,predictions_model_versions,total_predictions"))  # fmt: skip
        measure(f"list {k} selected tasks with their predictions", k, lambda: listing(batches[0], "id,predictions"))
        measure(f"GET /api/predictions?task= for each of {k} tasks", k,
                lambda: each("GET", [f"/api/predictions?task={t}" for t in batches[0]]))  # fmt: skip
        measure(f"import {k} predictions (one request)", k, lambda: import_rows(batches[1], "gen-a", "Debris"))
        patched = [f"/api/predictions/{r}" for r in row_ids(batches[0])]
        measure(f"PATCH /api/predictions/<id> for each of {k} rows", k,
                lambda: each("PATCH", patched, json={"score": 0.2}))  # fmt: skip
        deleted = [f"/api/predictions/{r}" for r in row_ids(batches[2])]
        measure(f"DELETE /api/predictions/<id> for each of {k} rows", k, lambda: each("DELETE", deleted))
        measure(f"Data Manager delete_tasks_predictions on {k} tasks (one request)", k, lambda: dm_delete(batches[3]))
        measure(f"import {k} predictions after that delete", k, lambda: import_rows(batches[3], "gen-a", "Debris"))
        measure("GET /api/projects/<id>/model-versions/", 1, lambda: ls.get(versions))
        import_rows(batches[4], "gen-c")
        measure(f"DELETE /api/projects/<id>/model-versions/ (a version of {k} rows)", k,
                lambda: ls.request("DELETE", versions, json={"model_version": "gen-c"}))  # fmt: skip
        for start in range(0, n, 5000):
            import_rows(ids[start : start + 5000], "gen-b")
        measure(f"PATCH the project's model_version (to a version of {n} rows)", 1,
                lambda: ls.update_project(pid, model_version="gen-b"))  # fmt: skip
        ls.update_project(pid, sampling="Uncertainty sampling")
        measure("GET /api/projects/<id>/next/ (uncertainty sampling)", 1, lambda: ls.get(f"/api/projects/{pid}/next/"))
    meter.report(n, k)


def sweep(meter: Meter, api: LabelStudioApi, pid: int, ids: list[int], expected: tuple[int, int, int]) -> None:
    """Each listing of `_reconcile`, three times, as the worker asks it; once each, the two that list every
    task: its ids (when the task count disagrees with the backend's) and every task as new (after an import
    whose webhooks were lost)."""
    annotated, lacking, crowded = expected
    calls: list[tuple[str, int, Callable[[], Any]]] = [
        ("sweep: the project's task count", 1, lambda: api.task_count(pid)),
        ("sweep: tasks after the last one known", 0, lambda: list(api.tasks_after(pid, max(ids)))),
        ("sweep: annotated tasks with their annotations", annotated, lambda: list(api.annotated_tasks(pid))),
        ("sweep: unannotated tasks lacking the live version", lacking, lambda: api.tasks_lacking(pid, "gen-a")),
        ("sweep: tasks holding more than one prediction", crowded, lambda: api.crowded_tasks(pid)),
    ]
    for name, count, call in calls:
        for _ in range(3):
            found = meter.measure(name, count, call)
            size = found if isinstance(found, int) else len(found)
            assert name.endswith("count") or size == count, f"{name}: {size} found, {count} expected"
    every = meter.measure("sweep, only when the count disagrees: every task id", len(ids), lambda: api.task_ids(pid))
    assert every == set(ids), f"{len(every)} ids listed of {len(ids)}"
    # What a sweep lists after an import none of whose webhooks arrived (or one over MAX_TASKS_PER_REQUEST).
    every = meter.measure("sweep: every task as new, with data and annotations", len(ids),
                          lambda: list(api.tasks_after(pid, min(ids) - 1)))  # fmt: skip
    assert len(every) == len(ids), f"{len(every)} tasks listed of {len(ids)}"


if __name__ == "__main__":
    main()
