"""The status page's embedding map (worker/projection.py) against the real Redis: what it stores, its bounds,
thumbnails through the worker's guarded fetcher, and its speed for 50,000 tasks; the page's JSON from the
API (api/ui.py, api/projects.py)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import time

import numpy as np
import pytest

from api.app import create_app
from api.projects import failure_reasons, reason_kind
from api.ui import version_points
from common import keys, queues
from common.settings import Settings
from tests.helpers import DATA, LABEL_CONFIG
from worker import projection
from worker.pipeline import to_bytes
from worker.projection import refresh_projection, sample, stable_order, to_grid
from worker.refitting import refit_project
from worker.runtime import Runtime

PID = 12
N_PER = 20
PARTICLES = sorted((DATA / "flowcam" / "particles").glob("*.png"))


def stored_map(rt: Runtime, pid: int = PID) -> dict:
    return json.loads(gzip.decompress(rt.store.projection(pid)))


@pytest.fixture
def rt(clean_redis, image_server) -> Runtime:
    """Three blobs of features (as test_learning.py), each task's image one of the real particles."""
    settings = dataclasses.replace(Settings.from_env(), kmeans_clusters=3, image_hosts="127.0.0.1")
    runtime = Runtime(settings)
    runtime.store.set_label_config(PID, LABEL_CONFIG)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 1280))
    ids = range(1, 3 * N_PER + 1)
    features = {t: centres[(t - 1) // N_PER] + rng.normal(0, 0.3, 1280) for t in ids}
    refs = {t: f"{image_server.url}/data/flowcam/particles/{PARTICLES[t].name}" for t in ids}
    runtime.store.remember_tasks(PID, [{"id": t, "data": {"image": refs[t]}} for t in ids])
    runtime.store.save_embeddings(PID, {t: to_bytes(f) for t, f in features.items()}, refs)
    return runtime


def annotate(rt: Runtime, names: list[str]) -> None:
    for tid in range(1, 3 * N_PER + 1, 4):
        blob = (tid - 1) // N_PER
        rt.store.save_annotation(PID, 100 + tid, tid, {"organism_type": [names[blob]], "shape": ["Round"]})


def test_the_map_holds_every_task_coloured_by_its_suggestion_or_its_annotation(rt, clean_redis):
    annotate(rt, ["Plankton", "Debris", "Not-plankton"])
    fitted = refit_project(rt, PID, force=False, reason="annotations")
    assert fitted["status"] == "fitted"
    # The refit asked a worker for a new map (the bulk queue holds the message).
    sent = [json.loads(m) for m in clean_redis.lrange(queues.BULK, 0, -1)]
    assert [m["headers"]["task"] for m in sent].count(queues.REFRESH_MAP) == 1
    outcome = refresh_projection(rt, PID)
    assert outcome["status"] == "stored" and outcome["points"] == 3 * N_PER
    m = stored_map(rt)
    assert m["version"] == rt.store.current_version(PID) and m["method"] == "pca" and m["total"] == 3 * N_PER
    n = len(m["tasks"])
    assert n == 3 * N_PER and len(m["x"]) == len(m["y"]) == len(m["annotated"]) == n
    assert all(0 <= v <= m["grid"] for v in m["x"] + m["y"])
    annotated = {t for t, a in zip(m["tasks"], m["annotated"], strict=True) if a}
    assert annotated == rt.store.annotated_tasks(PID)
    organism = next(t for t in m["tags"] if t["name"] == "organism_type")
    assert organism["labels"][:3] == ["Not-plankton", "Plankton", "Debris"]  # the config's order
    by_task = dict(zip(m["tasks"], organism["codes"], strict=True))
    # Annotated tasks show their annotation; the others the current version's suggestion.
    assert organism["labels"][by_task[1]] == "Plankton" and organism["labels"][by_task[N_PER + 1]] == "Debris"
    version = rt.store.current_version(PID)
    for tid in (2, N_PER + 2, 2 * N_PER + 2):
        pred = rt.store.predictions(PID, version, [tid])[tid]
        choice = next(i["value"]["choices"][0] for i in pred["result"] if i["from_name"] == "organism_type")
        assert organism["labels"][by_task[tid]] == choice
    # The three blobs stay apart on the map.
    xy = np.array([m["x"], m["y"]]).T
    centres = [xy[i * N_PER : (i + 1) * N_PER].mean(axis=0) for i in range(3)]
    spread = max(np.linalg.norm(xy[i * N_PER : (i + 1) * N_PER] - centres[i], axis=1).mean() for i in range(3))
    assert min(np.linalg.norm(centres[a] - centres[b]) for a, b in ((0, 1), (0, 2), (1, 2))) > 3 * spread


def test_thumbnails_are_small_images_of_the_tasks_and_a_refresh_reuses_them(rt, monkeypatch):
    annotate(rt, ["Plankton", "Debris", "Not-plankton"])
    refit_project(rt, PID, force=False, reason="annotations")
    refresh_projection(rt, PID)
    thumbs = stored_map(rt)["thumbs"]
    assert len(thumbs) == 3 * N_PER
    from PIL import Image

    for uri in list(thumbs.values())[:5]:
        head, _, data = uri.partition(",")
        assert head == f"data:image/{projection.THUMB_TYPE};base64"
        import base64
        import io

        img = Image.open(io.BytesIO(base64.b64decode(data)))
        assert max(img.size) <= projection.THUMB_SIDE
    fetched = []
    real = rt.fetcher.fetch
    monkeypatch.setattr(rt.fetcher, "fetch", lambda ref: fetched.append(ref) or real(ref))
    refresh_projection(rt, PID)
    assert fetched == [] and stored_map(rt)["thumbs"] == thumbs


def test_an_image_that_fails_has_no_thumbnail_and_the_map_is_stored_anyway(rt):
    rt.store.save_embeddings(PID, {999: to_bytes(np.zeros(1280))}, {999: "http://10.0.0.1/private.png"})
    assert refresh_projection(rt, PID)["status"] == "stored"
    m = stored_map(rt)
    assert 999 in m["tasks"] and "999" not in m["thumbs"] and len(m["thumbs"]) == 3 * N_PER


def test_before_any_embedding_there_is_no_map(clean_redis):
    runtime = Runtime(Settings.from_env())
    runtime.store.set_label_config(PID, LABEL_CONFIG)
    assert refresh_projection(runtime, PID)["status"] == "no embeddings"
    assert runtime.store.projection(PID) is None


def test_samples_keep_annotated_tasks_and_stay_put_as_the_project_grows():
    ids = list(range(1, 20_001))
    first = sample(ids, {5, 7}, 1000)
    assert len(first) == 1000 and {5, 7} <= set(first)
    grown = sample(list(range(1, 22_001)), {5, 7}, 1000)
    assert len(set(first) & set(grown)) > 850  # a prefix of one stable order: most of the sample stays
    assert stable_order([3, 1, 2]) == stable_order([2, 3, 1])


def test_thumbnails_stay_within_their_byte_budget_annotated_tasks_first():
    thumbs = {t: "x" * 100 for t in range(1, 11)}
    kept = projection.within_budget(thumbs, [9, 10, *range(1, 9)], 450)
    assert list(kept) == [9, 10, 1, 2]


def test_one_outlier_does_not_squeeze_the_map():
    xy = np.random.default_rng(1).normal(0, 1, (2000, 2)).astype(np.float32)
    xy[0] = [1e6, 1e6]
    grid = to_grid(xy)
    assert grid.min() >= 0 and grid.max() <= projection.GRID
    assert np.ptp(grid[1:, 0]) > 0.8 * projection.GRID


def test_fifty_thousand_tasks_are_projected_in_seconds_and_stay_small_in_redis(clean_redis, monkeypatch):
    """50,000 tasks of 1,280 features: the refresh (PCA fitted on 10,000, applied to all; no thumbnails here)
    takes seconds and the stored map stays within a few MB; the API serves it without computing anything."""
    n = 50_000
    settings = Settings.from_env()
    runtime = Runtime(settings)
    runtime.store.set_label_config(PID, LABEL_CONFIG)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (5, 1280)).astype(np.float16)
    pipe = clean_redis.pipeline(transaction=False)
    for start in range(0, n, 5000):
        block = centres[rng.integers(0, 5, 5000)] + rng.normal(0, 0.3, (5000, 1280)).astype(np.float16)
        pipe.hset(keys.embeddings(PID, runtime.store.space),
                  mapping={str(start + i + 1): to_bytes(row) for i, row in enumerate(block)})  # fmt: skip
        pipe.execute()
    for tid in range(1, 200):
        runtime.store.save_annotation(PID, tid, tid, {"organism_type": ["Plankton" if tid % 2 else "Debris"]})
    monkeypatch.setattr(projection, "make_thumbnails", lambda *a, **k: {})
    started = time.monotonic()
    outcome = refresh_projection(runtime, PID)
    took = time.monotonic() - started
    assert outcome["points"] == n and sum(stored_map(runtime)["annotated"]) == 199
    assert took < 60, f"refresh took {took:.1f} s"
    assert outcome["bytes"] < 2 * 1024 * 1024  # points only; thumbnails add at most MAX_THUMBS x ~2 KB
    print(f"50,000 tasks: refresh {took:.1f} s, {outcome['bytes'] / 1e6:.2f} MB stored")

    client = create_app(settings).test_client()
    started = time.monotonic()
    reply = client.get(f"/ui/projects/{PID}/map.json", headers={"Accept-Encoding": "gzip"})
    served = time.monotonic() - started
    assert reply.status_code == 200 and reply.headers["Content-Encoding"] == "gzip"
    assert len(reply.data) == outcome["bytes"] and served < 1.0
    again = {"If-None-Match": reply.headers["ETag"], "Accept-Encoding": "gzip"}
    assert client.get(f"/ui/projects/{PID}/map.json", headers=again).status_code == 304
    plain = client.get(f"/ui/projects/{PID}/map.json")
    assert "Content-Encoding" not in plain.headers and len(plain.json["tasks"]) == n
    started = time.monotonic()
    page = client.get(f"/ui/projects/{PID}")
    rendered = time.monotonic() - started
    assert page.status_code == 200 and b"50,000" in page.data
    assert rendered < 3.0, f"the page took {rendered:.2f} s"
    print(f"map.json served in {served * 1000:.0f} ms, the page rendered in {rendered * 1000:.0f} ms")


# -- the API's side: versions read defensively, failures grouped -----------------------------------------


def test_versions_are_plotted_from_whatever_evidence_they_carry():
    entries = [
        {"version": "efficientnet-lite0-48px-v0000-abc", "created": 1.0, "reason": "initial"},
        {
            "version": "efficientnet-lite0-48px-v0001-abc",
            "created": 2.0,
            "reason": "annotations",
            "tasks": 60,
            "annotated": 15,
            "evidence": {
                "organism_type": {
                    "annotated": 15,
                    "cv_accuracy": 0.8,
                    "cv_tasks": 15,
                    "evidence": "learner",
                    "per_label_cv_accuracy": {"Plankton": 0.9},
                    "ridge_strength": 4.0,
                },
                "shape": {
                    "labels": {"Round": 4, "Rod-like": 3},
                    "macro_f1": 0.71,
                    "coverage": 0.5,
                    "balanced_accuracy": 1.5,
                },
                "broken": "not a mapping",
            },
        },  # fmt: skip
        {
            "version": "efficientnet-lite0-48px-v0002-abc",
            "created": 3.0,
            "annotated": "many",
            "collections": {"s3://a": {"evidence": {"shape": {"cv_accuracy": 0.6, "cv_tasks": 8}}}},
        },  # fmt: skip
        "not even a mapping",
    ]
    points = version_points(entries)
    assert [p["number"] for p in points] == [0, 1, 2]
    assert [p["annotated"] for p in points] == [0, 15, 0]
    organism = points[1]["tags"]["organism_type"]
    assert organism == {"accuracy": {"cv_accuracy": 0.8}, "annotated": 15, "answered_by": "learner"}
    shape = points[1]["tags"]["shape"]
    assert shape["accuracy"] == {"macro_f1": 0.71} and shape["annotated"] == 7  # 1.5 is no accuracy
    assert "broken" not in points[1]["tags"]
    assert points[2]["tags"]["shape · s3://a"] == {"accuracy": {"cv_accuracy": 0.6}, "annotated": 8}


def test_failures_are_grouped_by_kind_with_examples():
    failures = {
        t: {"reason": f"GET http://images.example/{t}.png answered HTTP 404", "transient": False, "at": t}
        for t in range(1, 8)
    }
    failures[20] = {"reason": "cannot decode image: PNG image is 1200x1000, over the 1000000-pixel limit",
                    "transient": False, "at": 0}  # fmt: skip
    failures[21] = {"reason": "GET http://images.example/x.png timed out after 10 s", "transient": True, "at": 0}
    reasons = failure_reasons(failures)
    assert reasons[0]["count"] == 7 and reasons[0]["tasks"] == [1, 2, 3, 4, 5]
    assert reasons[0]["reason"] == "GET <url> answered HTTP 404" and reasons[0]["example"].endswith("HTTP 404")
    assert {r["transient"] for r in reasons[1:]} == {0, 1} and len(reasons) == 3
    assert reason_kind("task 1234 has no 'image' in its data") == "task N has no '…' in its data"
