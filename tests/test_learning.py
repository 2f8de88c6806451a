"""Refits against the real Redis: versions, what each learned, interruption, models shared by every worker
host, config changes, and the ordering that leaves no task behind a new version."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from common.settings import Settings
from common.store import Shown
from tests.helpers import LABEL_CONFIG
from worker import ingest, refitting
from worker.delivery import more_on_its_way
from worker.pipeline import EmbedOutcome, from_bytes, to_bytes
from worker.predicting import fill_gaps, gaps, outgrown, predict_from_features
from worker.refitting import needs_refit, refit_project
from worker.runtime import ModelMissing, Runtime

PID = 8
N_PER = 15


@pytest.fixture
def rt(clean_redis) -> Runtime:
    settings = dataclasses.replace(Settings.from_env(), kmeans_clusters=3)
    runtime = Runtime(settings)
    runtime.store.set_label_config(PID, LABEL_CONFIG)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 1280))
    features = {1 + i: centres[i // N_PER] + rng.normal(0, 0.3, 1280) for i in range(3 * N_PER)}
    runtime.store.save_embeddings(PID, {t: to_bytes(f) for t, f in features.items()}, {})
    return runtime


def blob_of(tid: int) -> int:
    return (tid - 1) // N_PER


def annotate(rt: Runtime, names: list[str], every: int = 4) -> None:
    for tid in range(1, 3 * N_PER + 1, every):
        rt.store.save_annotation(PID, 100 + tid, tid, {"organism_type": [names[blob_of(tid)]], "shape": ["Round"]})


def current_predictions(rt: Runtime) -> dict[int, dict]:
    version = rt.store.current_version(PID)
    blobs = rt.store.embeddings(PID)
    feats = dict(zip(blobs, from_bytes(list(blobs.values())), strict=True))
    return predict_from_features(rt, PID, version, feats)


def test_every_annotation_change_gets_a_new_version_and_a_retrain_without_one_keeps_it(rt):
    v0 = rt.store.current_version(PID)
    assert not needs_refit(rt, PID)
    annotate(rt, ["Plankton", "Debris", "Not-plankton"])
    assert needs_refit(rt, PID)
    first = refit_project(rt, PID, force=False, reason="annotations")
    assert first["status"] == "fitted" and first["version"] != v0
    assert rt.store.current_version(PID) == first["version"] and not needs_refit(rt, PID)
    same = refit_project(rt, PID, force=True, reason="training")
    assert same["status"] == "unchanged" and rt.store.current_version(PID) == first["version"]
    annotate(rt, ["Debris", "Plankton", "Not-plankton"])
    flipped = refit_project(rt, PID, force=False, reason="annotations")
    assert flipped["status"] == "fitted" and flipped["version"] not in (v0, first["version"])
    preds = current_predictions(rt)
    assert all(p["model_version"] == flipped["version"] for p in preds.values())
    chosen = {tid: p["result"][0]["value"]["choices"] for tid, p in preds.items()}
    assert chosen[1] == ["Debris"] and chosen[N_PER + 1] == ["Plankton"]
    assert [v["version"] for v in rt.store.versions(PID)] == [v0, first["version"], flipped["version"]]
    # One more annotation that changes no answer still makes a version: it must be fitted on every annotation.
    rt.store.save_annotation(PID, 999, 2, {"organism_type": ["Debris"]})
    assert needs_refit(rt, PID)
    assert refit_project(rt, PID, force=False, reason="annotations")["status"] == "fitted"
    # The fill after publishing predicted every unannotated task with the newest version.
    assert not gaps(rt, PID, rt.store.current_version(PID))


def test_a_model_an_import_outgrows_writes_only_revisions_until_a_refit_has_seen_the_import(rt):
    """A first model fitted while most of an import is still queued for embedding would write its answer to
    every task, and the model that sees the import would revise most of them (780 revisions mid-import at
    20,000 tasks, bench/RESULTS.md). Its answers for tasks Label Studio shows nothing of ours for are left
    gaps instead; a task already shown is still revised (the annotator's frontier); once the import no longer
    outgrows it, the gaps are predicted."""
    queued = list(range(1000, 1100))  # 100 tasks queued, 45 embedded: the project outgrows a model of 45
    rt.store.mark_pending(PID, queued, stale_after=3600)
    rt.store.set_shown(PID, {2: Shown("efficientnet-lite0-224px-v0000-test", 0.5, "d")})
    annotate(rt, ["Plankton", "Debris", "Not-plankton"])
    version = refit_project(rt, PID, force=False, reason="annotations")["version"]
    unannotated = set(range(1, 3 * N_PER + 1)) - rt.store.annotated_tasks(PID)
    assert outgrown(rt, PID, version)
    assert rt.store.predicted_tasks(PID, version) == {2}, "only the task Label Studio shows is revised"
    assert set(gaps(rt, PID, version)) == unannotated - {2}
    assert fill_gaps(rt, PID) == 0, "held while the import outgrows the model"
    rt.store.unmark_pending(PID, queued)  # the import's tasks settled (here: none embedded)
    assert not outgrown(rt, PID, version)
    assert fill_gaps(rt, PID) == len(unannotated) - 1 and not gaps(rt, PID, version)


def test_a_sweep_keeps_an_annotation_whose_webhook_came_while_it_read_label_studio(rt):
    """The sweep reads Label Studio's tasks, then makes the stored annotations those it read. An annotation
    made meanwhile may be missing from what it read; its webhook's record stays, and the refit learns it
    (replacing it lost the annotation until the next sweep: an annotation made during an import's sync
    was never learned in the end-to-end test of annotating during an import)."""
    store = rt.store
    store.save_annotation(PID, 101, 1, {"organism_type": ["Plankton"]})
    started = time.time()
    store.save_annotation(PID, 106, 6, {"organism_type": ["Debris"]})  # its webhook, while the sweep reads
    listed = {1: {101: {"organism_type": ["Plankton"]}}}  # what the sweep read: without annotation 106
    assert store.replace_annotations(PID, listed, since=started) == []
    assert store.annotations(PID) == {**listed, 6: {106: {"organism_type": ["Debris"]}}}
    assert refit_project(rt, PID, force=False, reason="annotations")["status"] == "fitted"
    assert set(store.fitted_labels(PID, store.current_version(PID))) == {1, 6}
    # A sweep that began after the webhook makes the task what Label Studio holds (106 deleted there since).
    assert store.replace_annotations(PID, listed, since=time.time()) == [6]
    assert set(store.annotations(PID)) == {1}


def test_nothing_to_do_without_changes_unless_forced(rt):
    assert refit_project(rt, PID, force=False, reason="annotations")["status"] == "nothing new"
    assert refit_project(rt, PID, force=True, reason="training")["status"] == "nothing to learn from"


def test_a_refit_interrupted_half_way_leaves_the_old_version_in_use(rt, monkeypatch):
    annotate(rt, ["Plankton", "Debris", "Not-plankton"])
    good = refit_project(rt, PID, force=False, reason="annotations")["version"]
    before = current_predictions(rt)
    annotate(rt, ["Debris", "Plankton", "Not-plankton"])

    def crash_while_serialising(model):
        raise OSError("out of memory")

    monkeypatch.setattr(refitting, "model_to_bytes", crash_while_serialising)
    with pytest.raises(OSError):
        refit_project(rt, PID, force=False, reason="annotations")
    monkeypatch.undo()
    assert rt.store.current_version(PID) == good
    assert needs_refit(rt, PID)  # what the periodic check finds: the refit is not forgotten
    fresh = Runtime(rt.settings)
    after = {t: p["result"][0]["value"] for t, p in predict_from_features(
        fresh, PID, good, {t: v for t, v in zip(*_features(rt), strict=True)}).items()}  # fmt: skip
    assert after == {t: p["result"][0]["value"] for t, p in before.items()}
    retry = refit_project(rt, PID, force=False, reason="annotations")
    assert retry["status"] == "fitted" and rt.store.current_version(PID) == retry["version"]


def test_features_stored_while_a_refit_runs_get_the_new_version(rt, monkeypatch):
    """A chunk that stores its features after the refit read its snapshot, and reads the version before the
    refit publishes, predicts with the old version: the refit's fill, made after publishing, covers it."""
    annotate(rt, ["Plankton", "Debris", "Not-plankton"])
    real_fit = refitting.fit_model
    late = {1000 + i: np.ones(1280) * (i + 1) for i in range(5)}

    def fit_while_a_chunk_commits(*args, **kwargs):
        model = real_fit(*args, **kwargs)
        rt.store.save_embeddings(PID, {t: to_bytes(v) for t, v in late.items()}, {})
        return model

    monkeypatch.setattr(refitting, "fit_model", fit_while_a_chunk_commits)
    version = refit_project(rt, PID, force=False, reason="annotations")["version"]
    assert set(late) <= set(rt.store.predictions(PID, version, late))
    assert not gaps(rt, PID, version)


def test_a_new_version_is_current_only_once_its_predictions_are_stored(rt, monkeypatch):
    """/predict reads the current version: asked as a refit publishes, it must find the task's answer, not
    queue interactive work (which makes a bulk chunk of the import give way)."""
    annotate(rt, ["Plankton", "Debris", "Not-plankton"])
    real_publish = rt.store.publish_version
    at_publication: dict[str, set[int]] = {}

    def publish(pid, version, *args, **kwargs):
        at_publication[version] = rt.store.predicted_tasks(pid, version)
        return real_publish(pid, version, *args, **kwargs)

    monkeypatch.setattr(rt.store, "publish_version", publish)
    fitted = refit_project(rt, PID, force=False, reason="annotations")
    unannotated = set(range(1, 3 * N_PER + 1)) - rt.store.annotated_tasks(PID)
    assert at_publication[fitted["version"]] == unannotated
    assert fitted["predicted"] == len(unannotated) and not gaps(rt, PID, fitted["version"])
    # ...and they are what the published model answers on any worker host (the model as stored, not as fitted).
    ids, matrix = _features(rt)
    served = predict_from_features(Runtime(rt.settings), PID, fitted["version"], dict(zip(ids, matrix, strict=True)))
    stored = rt.store.predictions(PID, fitted["version"], unannotated)
    assert {t: _answer(served[t]) for t in unannotated} == {t: _answer(p) for t, p in stored.items()}


def _answer(prediction: dict) -> tuple:
    """A prediction without its result ids (random per item)."""
    items = sorted((i["from_name"], tuple(i["value"]["choices"]), i.get("score")) for i in prediction["result"])
    return tuple(items), prediction["score"], prediction["model_version"]


def test_a_task_embedded_twice_keeps_its_first_features_and_is_predicted_from_them(rt):
    """Two chunks holding the same task (a lost message, a Redis restart) embed it in batches of other sizes,
    which differ in the last bits: what Label Studio holds must stay what the stored features give."""
    annotate(rt, ["Plankton", "Debris", "Not-plankton"])
    version = refit_project(rt, PID, force=False, reason="annotations")["version"]
    task = 2  # unannotated, in the first blob
    first = rt.store.embeddings(PID, [task])[task]
    elsewhere = rt.store.embeddings(PID, [2 * N_PER + 2])[2 * N_PER + 2]  # a task of the third blob
    rt.store.drop_predictions(PID, version)
    ingest._Chunk(rt, PID, None, 0.0, False).commit(EmbedOutcome(features={task: from_bytes([elsewhere])[0]}))
    assert rt.store.embeddings(PID, [task])[task] == first
    (staged,) = rt.store.predictions(PID, version, [task]).values()
    (expected,) = predict_from_features(rt, PID, version, {task: from_bytes([first])[0]}).values()
    assert _answer(staged) == _answer(expected)


def _features(rt: Runtime) -> tuple[list[int], np.ndarray]:
    blobs = rt.store.embeddings(PID)
    ids = sorted(blobs)  # not Redis's hash order, which changes with each redis-server's hash seed
    return ids, from_bytes([blobs[t] for t in ids])


def test_every_worker_host_predicts_with_the_published_model_and_never_another(rt, clean_redis):
    """Models live in Redis: a second worker (another host, nothing on its disk) predicts exactly what the
    one that fitted does; a version whose model is gone fails loudly instead of predicting with nothing."""
    annotate(rt, ["Plankton", "Debris", "Not-plankton"])
    version = refit_project(rt, PID, force=False, reason="annotations")["version"]
    before = current_predictions(rt)
    other_host = Runtime(dataclasses.replace(rt.settings))
    after = current_predictions(other_host)
    strip = lambda preds: {t: [(i["from_name"], i["value"], i["score"]) for i in p["result"]] for t, p in preds.items()}  # noqa: E731
    assert strip(after) == strip(before)
    clean_redis.delete(f"plk:p:{PID}:model:{version}")
    with pytest.raises(ModelMissing):
        Runtime(rt.settings).project_model(PID, version)


def test_a_changed_config_never_predicts_removed_tags_and_new_tags_start_learning(rt):
    annotate(rt, ["Plankton", "Debris", "Not-plankton"])
    old_version = refit_project(rt, PID, force=False, reason="annotations")["version"]
    assert all(
        {"organism_type", "shape"} <= {i["from_name"] for i in p["result"]} for p in current_predictions(rt).values()
    )
    new_config = LABEL_CONFIG.replace('<Choices name="shape"', '<Choices name="outline"').replace(
        '<Choice value="Round"/>', '<Choice value="Round"/><Choice value="Oval"/>'
    )
    rt.store.set_label_config(PID, new_config)
    # Even the old model, asked now, answers only for tags the config still has.
    _, feats = _features(rt)
    old = predict_from_features(rt, PID, old_version, dict(zip(range(len(feats)), feats, strict=True)))
    assert all({i["from_name"] for i in p["result"]} == {"organism_type"} for p in old.values())
    for tid in range(1, 3 * N_PER + 1, 4):
        rt.store.save_annotation(PID, 300 + tid, tid, {"organism_type": ["Plankton"], "outline": ["Oval"]})
    refit = refit_project(rt, PID, force=False, reason="label config")
    assert refit["status"] == "fitted"
    for p in current_predictions(rt).values():
        tags = {i["from_name"] for i in p["result"]}
        assert "shape" not in tags and "outline" in tags


def test_per_bucket_scope_fits_one_model_per_image_collection(rt):
    """The same-looking particles are 'Plankton' in one bucket and 'Debris' in the other: only per-bucket
    models can honour both. The project's setting chooses."""
    ids, feats = _features(rt)
    refs = {t: f"s3://{'north' if t % 2 else 'south'}/img-{t}.png" for t in ids}
    rt.store.save_embeddings(PID, {t: to_bytes(f) for t, f in zip(ids, feats, strict=True)}, refs)
    for tid in ids[::3]:
        label = "Plankton" if tid % 2 else "Debris"
        rt.store.save_annotation(PID, 500 + tid, tid, {"organism_type": [label]})
    rt.store.set_model_scope(PID, "bucket")
    fitted = refit_project(rt, PID, force=True, reason="annotations")
    assert set(fitted["collections"]) == {"s3://north", "s3://south"}
    restarted = Runtime(rt.settings)
    preds = predict_from_features(restarted, PID, fitted["version"], dict(zip(ids, feats, strict=True)))
    for tid, pred in preds.items():
        (item,) = [i for i in pred["result"] if i["from_name"] == "organism_type"]
        assert item["value"]["choices"] == ["Plankton" if tid % 2 else "Debris"], (tid, item)
    rt.store.set_model_scope(PID, "project")
    shared = refit_project(rt, PID, force=True, reason="training")
    assert shared["status"] == "fitted" and "collections" not in shared


@pytest.mark.parametrize("run", ["first", "again"])
def test_a_deliverer_sees_a_chunk_coming_until_its_predictions_are_staged(rt, run):
    """The deliverer holds a partial write while more is on its way (worker/delivery.py `more_on_its_way`).
    A chunk's tasks are unqueued with their features, before their predictions are staged; had nothing else
    said the chunk was still coming, a deliverer looking in between would write without them, and they would
    cost Label Studio a request of their own (about 2 s in a project of 4,000 tasks, bench/RESULTS.md). Once
    they are staged, the deliverer the chunk calls must see nothing more coming, or it would wait. `again`:
    a message run again after a crash, whose tasks' features were stored by its first run (`known`)."""
    annotate(rt, ["Plankton", "Debris", "Not-plankton"])
    version = refit_project(rt, PID, force=False, reason="annotations")["version"]
    writing = Runtime(
        dataclasses.replace(rt.settings, label_studio_url="http://127.0.0.1:9", label_studio_api_key="k-12")
    )
    rng = np.random.default_rng(1)
    new = {200 + i: rng.normal(0, 1, 1280).astype(np.float32) for i in range(5)}
    writing.store.mark_pending(PID, list(new), stale_after=60)
    seen: dict[str, bool] = {}
    stage, deliver = writing.store.delivery.stage, writing.dispatcher.deliver

    def observed_stage(*args, **kwargs):
        seen["while staging"] = more_on_its_way(writing, PID, time.time(), 30.0)
        return stage(*args, **kwargs)

    def observed_deliver(*args, **kwargs):
        seen["when the deliverer is called"] = more_on_its_way(writing, PID, time.time(), 30.0)
        return deliver(*args, **kwargs)

    writing.store.delivery.stage, writing.dispatcher.deliver = observed_stage, observed_deliver
    chunk = ingest._Chunk(writing, PID, None, 0.0, False)
    if run == "first":
        chunk.commit(EmbedOutcome(features=new, refs={t: f"x{t}" for t in new}))
    else:
        writing.store.save_embeddings(PID, {t: to_bytes(f) for t, f in new.items()}, {})
        writing.store.mark_pending(PID, list(new), stale_after=0)
        chunk.commit(EmbedOutcome(), known=new)
    assert seen == {"while staging": True, "when the deliverer is called": False}
    assert writing.store.pending_count(PID) == 0 and writing.store.staging_chunks(PID, time.time()) == 0
    assert sorted(t for t, v in writing.store.delivery.due(PID, time.time() + 1, 100) if v == version) == sorted(new)


def test_a_chunk_whose_prediction_fails_leaves_no_mark_behind(rt, monkeypatch):
    writing = Runtime(
        dataclasses.replace(rt.settings, label_studio_url="http://127.0.0.1:9", label_studio_api_key="k-12")
    )
    new = {300: np.ones(1280, np.float32)}

    def broken(*args, **kwargs):
        raise RuntimeError("the model store is away")

    monkeypatch.setattr(ingest, "predict_current", broken)
    with pytest.raises(RuntimeError):
        ingest._Chunk(writing, PID, None, 0.0, False).commit(EmbedOutcome(features=new, refs={300: "x"}))
    assert writing.store.staging_chunks(PID, time.time()) == 0 and writing.store.embeddings(PID, [300])
