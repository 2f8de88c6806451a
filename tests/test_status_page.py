"""The status page (api/ui.py): its routes through the Flask test client, and the whole page in a real,
headless Chromium (Debian's package, driven by Playwright) on a project of real FlowCam particles that a real
Celery worker embedded, learned from and mapped."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from api.app import create_app
from bench.proxy_labels import proxy_label
from common import queues
from common.models import embedding_space
from common.settings import Settings
from common.store import Store
from tests.browser import launch, sync_playwright
from tests.helpers import DATA, LABEL_CONFIG, ApiProcess, wait_until
from worker.projection import GRID, encode

PID = 21
BIG_PID = 22
N_TASKS = 300
PARTICLES = sorted((DATA / "flowcam" / "particles").glob("*.png"))[:N_TASKS]
# The screenshot in the README (docs/status-page.png) is made by this test: STATUS_PAGE_SCREENSHOT=docs/status-page.png
SCREENSHOT_TO = os.environ.get("STATUS_PAGE_SCREENSHOT", "")
USER, PASSWORD = "ecologist", "plankton"


# -- routes --------------------------------------------------------------------------------------------


@pytest.fixture
def client(clean_redis):
    app = create_app(Settings.from_env())
    store = app.extensions["store"]
    store.set_label_config(PID, LABEL_CONFIG)
    store.remember_tasks(PID, [{"id": t, "data": {"image": f"http://images.example/{t}.png"}} for t in (1, 2, 3)])
    store.record_failures(PID, {2: "GET http://images.example/2.png answered HTTP 404",
                                3: "GET http://images.example/3.png answered HTTP 404"})  # fmt: skip
    return app.test_client()


def test_the_pages_show_the_projects_and_where_one_stands(client):
    index = client.get("/ui/")
    assert index.status_code == 200 and f'href="/ui/projects/{PID}"'.encode() in index.data
    page = client.get(f"/ui/projects/{PID}")
    assert page.status_code == 200 and page.mimetype == "text/html"
    text = page.data.decode()
    assert "Import progress" in text and "GET &lt;url&gt; answered HTTP 404" in text and "2, 3" in text
    # Nothing on the page comes from elsewhere, and nothing inline runs.
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    assert "<script>" not in text and "http://" not in text.replace("http://images.example", "")
    assert client.get("/ui/static/status.js").status_code == 200
    assert client.get("/ui/projects/99").status_code == 404
    assert client.get("/ui/projects/abc").status_code == 400
    status = client.get(f"/projects/{PID}").json
    assert status["failure_reasons"][0]["count"] == 2 and status["tasks"]["failed"] == 2


def test_before_the_first_refit_there_is_no_map_and_one_can_be_asked_for(client, clean_redis):
    reply = client.get(f"/ui/projects/{PID}/map.json")
    assert reply.status_code == 404 and "no map yet" in reply.json["error"]
    assert client.post(f"/ui/projects/{PID}/map", data="{}").status_code == 400  # not JSON: a form cannot
    before = clean_redis.llen(queues.BULK)
    assert client.post(f"/ui/projects/{PID}/map", json={}).status_code == 202
    assert clean_redis.llen(queues.BULK) == before + 1
    message = json.loads(clean_redis.lindex(queues.BULK, 0))
    assert message["headers"]["task"] == queues.REFRESH_MAP
    assert client.post("/ui/projects/99/map", json={}).status_code == 404


def test_the_pages_need_the_same_credentials_as_every_route(clean_redis, monkeypatch):
    monkeypatch.setenv("BASIC_AUTH_USER", USER)
    monkeypatch.setenv("BASIC_AUTH_PASS", PASSWORD)
    client = create_app(Settings.from_env()).test_client()
    for path in ("/ui/", f"/ui/projects/{PID}", f"/ui/projects/{PID}/map.json", "/ui/static/status.js"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, auth=(USER, PASSWORD)).status_code in (200, 404), path


# -- in a real browser -----------------------------------------------------------------------------------


def webhook(api: ApiProcess, body: dict) -> dict:
    reply = requests.post(f"{api.url}/webhook", json=body, auth=(USER, PASSWORD), timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def get(api: ApiProcess, path: str):
    return requests.get(f"{api.url}{path}", auth=(USER, PASSWORD), timeout=30)


def annotate(api: ApiProcess, ann_id: int, task: dict, labels: dict[str, list[str]]) -> None:
    result = [{"from_name": tag, "to_name": "image", "type": "choices", "value": {"choices": chosen}}
              for tag, chosen in labels.items()]  # fmt: skip
    annotation = {"id": ann_id, "task": task["id"], "result": result, "was_cancelled": False}
    webhook(api, {"action": "ANNOTATION_CREATED", "project": {"id": PID}, "task": task, "annotation": annotation})


def versions(api: ApiProcess) -> list[dict]:
    return get(api, f"/versions?project={PID}").json()["projects"][str(PID)]


@pytest.fixture
def project_with_real_data(clean_redis, image_server, start_worker, tmp_path):
    """A real worker embeds 300 real particles, learns three versions from annotations made from the
    particles' measured shape (bench/proxy_labels.py), and stores the map after each refit."""
    only_on_train = {"REFIT_EVERY": "1000", "REFIT_DELAY_SECONDS": "3600"}  # one version per round, below
    start_worker(**only_on_train)
    env = {"BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD, "API_WORKERS": "1", **only_on_train}
    api = ApiProcess(env, tmp_path / "api.log").start()
    try:
        setup = requests.post(f"{api.url}/setup", json={"project": f"{PID}.1", "schema": LABEL_CONFIG},
                              auth=(USER, PASSWORD), timeout=30)  # fmt: skip
        assert setup.status_code == 200, setup.text
        tasks = [{"id": i + 1, "data": {"image": f"{image_server.url}/data/flowcam/particles/{p.name}"}}
                 for i, p in enumerate(PARTICLES)]  # fmt: skip
        (image_server.root / "tmp" / "notes.png").write_bytes(b"field notes, not an image")
        broken = [{"id": 301, "data": {"image": f"{image_server.url}/data/flowcam/particles/missing-1.png"}},
                  {"id": 302, "data": {"image": f"{image_server.url}/data/flowcam/particles/missing-2.png"}},
                  {"id": 303, "data": {"image": f"{image_server.url}/tmp/notes.png"}}]  # fmt: skip
        job = webhook(api, {"action": "TASKS_CREATED", "project": {"id": PID}, "tasks": tasks + broken})["job"]
        wait_until(lambda: get(api, f"/jobs/{job}").json()["state"] == "done", 180, "the import")
        shapes = {t["id"]: proxy_label(p) for t, p in zip(tasks, PARTICLES, strict=True)}
        by_shape = {s: [t for t in tasks if shapes[t["id"]] == s] for s in ("Round", "Rod-like")}
        life_form = {"Round": "Unicellular", "Rod-like": "Filament"}
        done = 0
        for per_class in (4, 10, 20):  # three rounds of annotations, a refit after each: three versions
            for shape, members in by_shape.items():
                for task in members[done:per_class]:
                    annotate(api, 1000 + task["id"], task, {"shape": [shape], "life_form": [life_form[shape]]})
            done = per_class
            before = len(versions(api))
            reply = requests.post(f"{api.url}/train", json={"project": PID}, auth=(USER, PASSWORD), timeout=30)
            assert reply.status_code == 201, reply.text
            # The next round waits for the whole sync, not only its new version: annotations made while the
            # sync's refit still runs are learned at once by a refit of their own (worker/refitting.py), which
            # may see part of the round and make one version more.
            job = reply.json()["job"]
            wait_until(lambda before=before, job=job: get(api, f"/jobs/{job}").json()["state"] == "done"
                       and len(versions(api)) > before, 180, "a refit")  # fmt: skip

        def current_map():
            reply = get(api, f"/ui/projects/{PID}/map.json")
            if reply.status_code != 200:
                return None
            m = reply.json()
            return m if m["version"] == versions(api)[-1]["version"] and len(m["thumbs"]) == N_TASKS else None

        wait_until(current_map, 180, "the worker's map of the last version")
        yield api
    finally:
        api.stop()


@pytest.mark.browser  # runs in `make test` and `make test-fast`; it installs Debian's chromium when absent
def test_the_status_page_draws_versions_and_the_map_in_a_real_browser(project_with_real_data, tmp_path):
    api = project_with_real_data
    known = versions(api)
    assert len(known) == 4  # the initial version and one per round of annotations
    m = get(api, f"/ui/projects/{PID}/map.json").json()
    status = get(api, f"/projects/{PID}").json()
    assert len(m["tasks"]) == status["tasks"]["embedded"] == N_TASKS and status["tasks"]["failed"] == 3
    stored = len(gzip.compress(json.dumps(m).encode()))
    assert stored < 1_000_000, f"the map of {N_TASKS} tasks is {stored} bytes"

    settings = Settings.from_env()
    store = Store.from_url(settings.redis_url, embedding_space(settings))
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                          viewport={"width": 1280, "height": 900})  # fmt: skip
            page = context.new_page()
            page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            page.goto(f"{api.url}/ui/")
            page.click(f"a[href='/ui/projects/{PID}']")
            page.wait_for_selector("canvas#map[data-state='drawn']", timeout=30_000)

            # Import progress, and why tasks failed.
            assert page.locator("#progress .card b").first.inner_text() == str(N_TASKS + 3)
            reasons = page.locator("#failure-reasons tbody tr")
            assert reasons.count() == 2
            assert "HTTP 404" in reasons.nth(0).inner_text() and "301, 302" in reasons.nth(0).inner_text()

            # The versions plot: one point per version on the annotations line, accuracy points per tag.
            assert page.locator("#versions-svg circle.ann").count() == len(known)
            fitted = [v for v in known if v.get("evidence")]
            for tag in ("shape", "life_form"):
                answered = [v for v in fitted if any("accuracy" in k for k in v["evidence"].get(tag, {}))]
                drawn = page.locator(f"#versions-svg circle.acc[data-series^='{tag}:']").count()
                assert drawn >= len(answered) > 0, (tag, drawn, len(answered))
            assert page.locator("#versions-svg path.series").count() >= 3

            # The map: every point drawn, in several colours, the annotated ones ringed.
            canvas = page.locator("canvas#map")
            assert canvas.get_attribute("data-drawn") == str(N_TASKS)
            assert int(canvas.get_attribute("data-annotated")) == sum(m["annotated"]) == 40
            pixels = page.evaluate("""() => {
                const c = document.getElementById('map');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let painted = 0; const colours = new Set();
                for (let i = 0; i < d.length; i += 4) {
                    if (d[i + 3] < 200) continue;
                    painted++;
                    colours.add((d[i] >> 5) + ',' + (d[i + 1] >> 5) + ',' + (d[i + 2] >> 5));
                }
                return {painted, colours: colours.size, width: c.width};
            }""")  # fmt: skip
            assert pixels["painted"] > N_TASKS * 10 and pixels["colours"] >= 3, pixels
            options = page.locator("#map-tag option").all_inner_texts()
            assert {"shape", "life_form"} <= set(options)
            page.select_option("#map-tag", label="life_form")
            legend = page.locator("#map-legend").inner_text()
            assert "Unicellular" in legend and "Filament" in legend and "annotated (ringed)" in legend

            # Hovering an annotated point shows its task, labels and thumbnail.
            i = m["annotated"].index(1)
            canvas.scroll_into_view_if_needed()
            box = canvas.bounding_box()
            scale = (box["width"] - 24) / m["grid"]
            page.mouse.move(box["x"] + 12 + m["x"][i] * scale, box["y"] + 12 + (m["grid"] - m["y"][i]) * scale)
            tip = page.locator("#map-tip")
            tip.wait_for(state="visible", timeout=5000)
            assert "Task" in tip.inner_text() and "(annotated)" in tip.inner_text()
            wait_until(lambda: page.evaluate("() => document.querySelector('#map-tip img')?.naturalWidth || 0") > 0,
                       5, "the thumbnail to show")  # fmt: skip

            shot = tmp_path / "status-page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000
            if SCREENSHOT_TO:
                Path(SCREENSHOT_TO).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, SCREENSHOT_TO)

            # 50,000 tasks: the page draws a stored map of that size at once (made here, as a worker would store it).
            big = synthetic_map(BIG_PID, 50_000)
            store.set_label_config(BIG_PID, LABEL_CONFIG)
            store.set_projection(BIG_PID, encode(big))
            started = time.monotonic()
            page.goto(f"{api.url}/ui/projects/{BIG_PID}")
            page.wait_for_selector("canvas#map[data-state='drawn']", timeout=30_000)
            loaded = time.monotonic() - started
            canvas = page.locator("canvas#map")
            draw_ms = float(canvas.get_attribute("data-draw-ms"))
            assert canvas.get_attribute("data-drawn") == "50000"
            print(f"50,000 points: page loaded and drawn in {loaded:.2f} s, the drawing itself {draw_ms:.0f} ms")
            assert loaded < 10 and draw_ms < 2000
        finally:
            browser.close()
    assert errors == [], errors


def synthetic_map(pid: int, n: int) -> dict:
    """A map of n points in a few blobs, in the format worker/projection.py stores."""
    rng = np.random.default_rng(0)
    centres = rng.uniform(800, 3300, (5, 2))
    blob = rng.integers(0, 5, n)
    xy = np.clip(centres[blob] + rng.normal(0, 260, (n, 2)), 0, GRID).astype(int)
    return {"format": 1, "project": pid, "version": "efficientnet-lite0-48px-v0000-x", "computed": time.time(),
            "method": "pca", "explained": [0.2, 0.1], "total": n, "grid": GRID, "tasks": list(range(1, n + 1)),
            "x": xy[:, 0].tolist(), "y": xy[:, 1].tolist(), "annotated": [int(i % 500 == 0) for i in range(n)],
            "tags": [{"name": "organism_type", "labels": ["Not-plankton", "Plankton", "Debris"],
                      "codes": [int(b % 3) for b in blob]}], "thumb_side": 48, "thumbs": {}}  # fmt: skip
