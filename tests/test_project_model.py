"""The project model: a learner per tag, the clusters that answer for tags without one, the backbone's
head, persistence, and predictions from it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.label_config import parse_label_config
from tests.helpers import LABEL_CONFIG
from worker import learning
from worker.backbones import CEFAS_CLASSES
from worker.learning import GRAPH_KS, neighbours, platt_apply
from worker.project_model import (
    META,
    CollectionModels,
    ProjectModel,
    TaskChoices,
    auto_clusters,
    cluster_choices_for_tag,
    fit_model,
    fit_project_model,
    head_choice,
    model_from_bytes,
    model_to_bytes,
)
from worker.results import build_prediction
from worker.tag_models import Neighbours

CONFIG = parse_label_config(LABEL_CONFIG)
DIM, PER_BLOB = 16, 20
HEAD_MAP = {"organism_type": {"copepod": "Plankton", "non-copepod": "Plankton", "detritus": "Debris"}}


def blobs(seed: int = 0) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Three well-separated Gaussian blobs (different directions)."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((3, DIM))
    centres[0, 0] = centres[1, 5] = centres[2, 10] = 10.0
    blob = np.repeat(np.arange(3), PER_BLOB)
    features = (centres[blob] + rng.normal(0, 0.5, (3 * PER_BLOB, DIM))).astype(np.float32)
    task_ids = [1000 + i for i in range(len(blob))]
    return features, task_ids, blob


def members(blob_index: int) -> list[int]:
    return [1000 + blob_index * PER_BLOB + i for i in range(PER_BLOB)]


def annotations() -> dict[int, dict[str, list[str]]]:
    """organism_type and shape have labels to tell apart (learners); life_form one label (clusters)."""
    b0, b1, b2 = members(0), members(1), members(2)
    return {
        b0[0]: {"organism_type": ["Plankton"], "shape": ["Round"], "life_form": ["Colony"]},
        b0[1]: {"organism_type": ["Plankton"], "shape": ["Round"]},
        b0[2]: {"organism_type": ["Plankton"], "shape": ["Round"], "life_form": ["Colony"]},
        b1[0]: {"organism_type": ["Debris"], "shape": ["Rod-like", "Spiky"], "life_form": ["Colony"]},
        b1[1]: {"organism_type": ["Debris"], "shape": ["Spiky", "Rod-like"]},
        b1[2]: {"organism_type": ["Debris"], "shape": ["Rod-like", "Spiky"]},
        b2[0]: {"organism_type": ["Not-plankton"], "shape": ["Spiky"]},
        b2[1]: {"organism_type": ["Not-plankton"], "shape": ["Spiky"]},
        b2[2]: {"shape": ["Spiky"]},
    }


@pytest.fixture(scope="module")
def fitted() -> tuple[ProjectModel, np.ndarray, np.ndarray]:
    features, task_ids, blob = blobs()
    model = fit_project_model("test-v0001", features, task_ids, annotations(), CONFIG, clusters=3, head_map=HEAD_MAP)
    return model, features, blob


def test_each_tag_takes_the_evidence_it_has(fitted):
    model, features, blob = fitted
    assert model.primary == {"organism_type": "learner", "shape": "learner", "life_form": "clusters"}
    assert set(model.learners) == {"organism_type", "shape"} and set(model.cluster_choices) == {"life_form"}
    assert "morphology" not in model.primary  # nobody annotated it
    evidence = model.stats["evidence"]
    assert {k: model.stats[k] for k in ("tasks", "annotated", "clusters")} == {
        "tasks": 60,
        "annotated": 9,
        "clusters": 3,
    }
    assert evidence["organism_type"]["annotated"] == 8 and evidence["shape"]["annotated"] == 9
    assert evidence["life_form"]["annotated"] == 3
    for tag in ("organism_type", "shape", "life_form"):
        assert 0.0 <= evidence[tag]["cv_accuracy"] <= 1.0
        assert 0.0 < evidence[tag]["coverage"] <= 1.0
    assert model.config_fingerprint == CONFIG.fingerprint and model.version == "test-v0001"


def test_learners_answer_every_task_with_what_its_blob_was_annotated(fitted):
    model, features, blob = fitted
    predictions = model.predict(features, None, ())
    expected_type = ["Plankton", "Debris", "Not-plankton"]
    expected_shape = [{"Round"}, {"Rod-like", "Spiky"}, {"Spiky"}]
    for p, b in zip(predictions, blob, strict=True):
        assert p["organism_type"][0] == [expected_type[b]]
        assert set(p["shape"][0]) == expected_shape[b]
        assert 0.0 < p["organism_type"][1] <= 1.0 and 0.0 < p["shape"][1] <= 1.0


def test_clusters_answer_a_tag_with_one_label_only_where_it_was_annotated(fitted):
    model, features, blob = fitted
    predictions = model.predict(features, None, ())
    for p, b in zip(predictions, blob, strict=True):
        if b == 2:
            assert "life_form" not in p, "no annotated member in this cluster: no evidence, no choice"
        else:  # 2 of 2 annotated members in blob 0, 1 of 1 in blob 1: Laplace-smoothed purity
            assert p["life_form"] == (["Colony"], 0.75 if b == 0 else round(2 / 3, 4))


def test_head_answers_only_where_nothing_else_does(fitted):
    model, features, blob = fitted
    probs = np.tile([0.1, 0.7, 0.2], (len(features), 1))  # mostly detritus
    predictions = model.predict(features, probs, CEFAS_CLASSES)
    assert all(p["organism_type"][0] != ["Debris"] for p, b in zip(predictions, blob, strict=True) if b == 0)
    assert all("life_form" not in p for p, b in zip(predictions, blob, strict=True) if b == 2)  # no mapping
    nothing_learned = fit_project_model("v", features, list(range(len(features))), {}, CONFIG, head_map=HEAD_MAP)
    assert all(
        p == {"organism_type": (["Debris"], 0.7)} for p in nothing_learned.predict(features, probs, CEFAS_CLASSES)
    )


def test_head_map_validated_against_config():
    features, task_ids, _ = blobs(1)
    bad = {
        "organism_type": {"copepod": "Plankton"},
        "no_such_tag": {"copepod": "Plankton"},
        "shape": {"copepod": "Triangle"},  # not a label of the tag
    }
    model = fit_project_model("v", features, task_ids, {}, CONFIG, clusters=3, head_map=bad)
    assert model.head_map == {"organism_type": {"copepod": "Plankton"}}
    assert model.cluster_choices == {} and model.learners == {}


def test_model_without_anything_learned_uses_the_head():
    """What the runtime builds for version 0: no space, no centroids, the head's mapping only."""
    model = ProjectModel("v0", np.zeros((0, 1), np.float32), {}, "", head_map=HEAD_MAP)
    out = model.predict(np.ones((2, 8), np.float32), np.array([[0.1, 0.6, 0.3], [0.6, 0.1, 0.3]]), CEFAS_CLASSES)
    assert out == [{"organism_type": (["Debris"], 0.6)}, {"organism_type": (["Plankton"], 0.9)}]
    assert model.predict(np.ones((1, 8), np.float32), None, CEFAS_CLASSES) == [{}]


def test_head_choice_sums_mapped_probabilities():
    probs = np.array([0.3, 0.45, 0.25])
    assert head_choice(probs, CEFAS_CLASSES, HEAD_MAP["organism_type"]) == (["Plankton"], 0.55)
    # Unmapped classes do not count.
    assert head_choice(probs, CEFAS_CLASSES, {"copepod": "Plankton", "non-copepod": "Plankton"}) == (["Plankton"], 0.55)
    assert head_choice(probs, CEFAS_CLASSES, {"copepod": "A", "non-copepod": "B"}) == (["A"], 0.3)


def test_cluster_choices_for_tag_score_with_one_success_and_one_failure_added():
    assert cluster_choices_for_tag([], multiple=False) is None
    assert cluster_choices_for_tag([["A"]], multiple=False) == (["A"], round(2 / 3, 4))
    assert cluster_choices_for_tag([["A"], ["B"], ["B"]], multiple=False) == (["B"], 0.6)
    assert cluster_choices_for_tag([["A", "B"], ["A"], ["A", "A"]], multiple=True) == (["A"], 0.8)
    assert cluster_choices_for_tag([["A"], ["B"]], multiple=True) is None  # nothing over half


@pytest.mark.parametrize(("n", "k"), [(1, 1), (2, 2), (3, 2), (100, 7), (10_000, 64)])
def test_auto_clusters(n: int, k: int):
    assert auto_clusters(n) == k


def test_fewer_tasks_than_clusters():
    features, task_ids, _ = blobs(2)
    model = fit_project_model(
        "v", features[:2], task_ids[:2], {task_ids[0]: {"life_form": ["Colony"]}}, CONFIG, clusters=10
    )
    assert len(model.centroids) == 2


def test_a_project_without_tasks():
    model = fit_project_model("v", np.zeros((0, 8), np.float32), [], {}, CONFIG, head_map=HEAD_MAP)
    assert model.predict(np.zeros((0, 8), np.float32), None, ()) == []
    assert model.stats["tasks"] == 0


def test_labels_no_longer_in_config_are_ignored():
    features, task_ids, _ = blobs(3)
    b0, b1 = members(0), members(1)
    labels = {
        b0[0]: {"organism_type": ["Removed-label"]},  # the only annotated member of its cluster
        b1[0]: {"organism_type": ["Removed-label"]},
        b1[1]: {"organism_type": ["Plankton"]},
    }
    model = fit_project_model("v", features, task_ids, labels, CONFIG, clusters=3)
    # One label left under the current config: the clusters answer, and only blob 1's has evidence.
    assert model.primary == {"organism_type": "clusters"}
    assert sorted(model.cluster_choices["organism_type"], key=str) == [(["Plankton"], round(2 / 3, 4)), None, None]
    assert model.stats["evidence"]["organism_type"]["annotated"] == 1


# -- clusters, for Label Studio's uncertainty sampling ------------------------------------------------


def test_every_task_names_its_cluster_by_its_oldest_member(fitted):
    model, features, blob = fitted
    clusters = [a.cluster for a in model.predict(features, None, ())]
    for b in range(3):  # three blobs, three clusters, each named by its smallest task id
        assert {clusters[i] for i in np.flatnonzero(blob == b)} == {min(members(b))}
    loaded = model_from_bytes(model_to_bytes(model))
    assert [a.cluster for a in loaded.predict(features, None, ())] == clusters


def test_a_cluster_keeps_its_number_when_the_project_grows():
    """Label Studio counts the tasks an annotator solved per cluster number, across versions."""
    features, task_ids, blob = blobs()
    first = [i for i in range(len(blob)) if i % PER_BLOB < PER_BLOB // 2]
    before = fit_project_model("v1", features[first], [task_ids[i] for i in first], {}, CONFIG, clusters=3)
    after = fit_project_model("v2", features, task_ids, {}, CONFIG, clusters=3)
    assert [a.cluster for a in before.predict(features, None, ())] == [
        a.cluster for a in after.predict(features, None, ())
    ]


# -- persistence -----------------------------------------------------------------------------------


def test_bytes_round_trip(fitted):
    model, features, blob = fitted
    model.version = "test-v0001"
    loaded = model_from_bytes(model_to_bytes(model))
    assert isinstance(loaded, ProjectModel)
    assert loaded.version == model.version
    assert np.array_equal(loaded.centroids, model.centroids)
    assert loaded.cluster_choices == model.cluster_choices
    assert loaded.config_fingerprint == model.config_fingerprint
    assert loaded.head_map == model.head_map and loaded.primary == model.primary
    assert loaded.stats == json.loads(json.dumps(model.stats))
    probs = np.tile([0.1, 0.7, 0.2], (len(features), 1))
    assert loaded.predict(features, probs, CEFAS_CLASSES) == model.predict(features, probs, CEFAS_CLASSES)
    new_tasks = features[:7] + np.random.default_rng(5).normal(0, 0.3, (7, DIM)).astype(np.float32)
    assert loaded.predict(new_tasks, None, ()) == model.predict(new_tasks, None, ())


def test_per_collection_model_round_trip(fitted):
    _, features, blob = fitted
    ids = list(range(len(features)))
    labels = {i: {"organism_type": ["Plankton" if blob[i] == 0 else "Debris"]} for i in ids[::2] + ids[1::6]}
    collections = ["s3://a" if i % 2 else "s3://b" for i in ids]
    model = fit_model(features, ids, labels, CONFIG, collections, per_collection=True, clusters=3)
    assert isinstance(model, CollectionModels) and sorted(model.models) == ["s3://a", "s3://b"]
    loaded = model_from_bytes(model_to_bytes(model))
    assert isinstance(loaded, CollectionModels)
    assert loaded.predict(features, None, (), collections) == model.predict(features, None, (), collections)
    assert loaded.predict(features, None, (), ["elsewhere"] * len(ids)) == [{}] * len(ids)


# -- prediction for Label Studio --------------------------------------------------------------------


def test_build_prediction():
    choices = {
        "organism_type": (["Plankton", "Debris"], 0.75),  # single choice: one label only
        "shape": (["Round", "Square"], 0.6),  # Square is not a label of the tag
        "life_form": (["Amoeboid"], 0.9),  # no label left: the tag is dropped
        "removed_tag": (["X"], 1.0),
    }
    pred = build_prediction(choices, CONFIG, "resnet50-v0007")
    assert pred["model_version"] == "resnet50-v0007"
    assert [r["from_name"] for r in pred["result"]] == ["organism_type", "shape"]
    first, second = pred["result"]
    assert first["value"] == {"choices": ["Plankton"]} and first["score"] == 0.75
    assert second["value"] == {"choices": ["Round"]} and second["score"] == 0.6
    for item in pred["result"]:
        assert item["type"] == "choices"
        assert item["to_name"] == "image"
        assert isinstance(item["id"], str) and item["id"]
        assert isinstance(item["score"], float)
    assert pred["score"] == 0.6


def test_build_prediction_carries_the_cluster():
    pred = build_prediction(TaskChoices({"organism_type": (["Plankton"], 0.7)}, cluster=1042), CONFIG, "v")
    assert pred["cluster"] == 1042 and isinstance(pred["cluster"], int)
    assert "cluster" not in build_prediction({"organism_type": (["Plankton"], 0.7)}, CONFIG, "v")


def test_a_model_stored_before_issue_26_still_answers(fitted):
    """Its problems held a Platt map of the mixture's confidence, and no clusters for every task."""
    model, features, _ = fitted
    arrays: dict[str, np.ndarray] = {}
    meta = model.to_meta(arrays)
    for tag in meta["learners"].values():
        for problem in tag["problems"]:
            problem.pop("calibration"), problem.pop("unseen")
            problem["platt"] = [0.5, 0.1]
    old = {k: v for k, v in arrays.items() if not k.endswith(("labelled", "labelled_classes", "cluster_ids"))}
    assert META not in old
    loaded = ProjectModel.from_meta(json.loads(json.dumps(meta)), old)
    answers = loaded.predict(features, None, ())
    problem = loaded.learners["organism_type"].problems[0]
    assert problem.legacy_platt == (0.5, 0.1)
    space = loaded.space
    full = space.full(features)
    low = space.low(full)
    idx, sim = neighbours(low, space.anchors, max(GRAPH_KS))
    confidence = problem.probabilities(Neighbours(full, low, idx, sim)).max(axis=1)
    expected = np.round(platt_apply(confidence, 0.5, 0.1), 4)
    assert [a["organism_type"][1] for a in answers] == expected.tolist()


def test_a_model_stored_before_the_unseen_mass_knew_the_config_keeps_its_map(fitted):
    """Its problems' `unseen` is Good-Turing's alone and their calibration moved the map fitted with it; a
    model stored now carries its map, so the map can change again without changing stored models' scores."""
    model, features, _ = fitted
    arrays: dict[str, np.ndarray] = {}
    meta = json.loads(json.dumps(model.to_meta(arrays)))
    now = ProjectModel.from_meta(meta, arrays)
    assert now.learners["organism_type"].problems[0].prior == (learning.PRIOR_WEIGHTS, learning.PRIOR_BIAS)
    for tag in meta["learners"].values():
        for problem in tag["problems"]:
            del problem["prior"]
    before = ProjectModel.from_meta(meta, arrays)
    problem = before.learners["organism_type"].problems[0]
    assert problem.prior == learning.GOOD_TURING_PRIOR != (learning.PRIOR_WEIGHTS, learning.PRIOR_BIAS)
    space = before.space
    full = space.full(features)
    low = space.low(full)
    idx, sim = neighbours(low, space.anchors, max(GRAPH_KS))
    _, evidence = problem.evidence(Neighbours(full, low, idx, sim))
    expected = learning.apply_calibration(learning.prior_logit(evidence, *learning.GOOD_TURING_PRIOR),
                                          *problem.calibration)  # fmt: skip
    assert [a["organism_type"][1] for a in before.predict(features, None, ())] == np.round(expected, 4).tolist()
    assert before.predict(features, None, ()) != now.predict(features, None, ())


def test_build_prediction_ids_are_unique():
    choices = {"organism_type": (["Plankton"], 1.0), "morphology": (["Eggs", "Cilia"], 0.8), "shape": (["Round"], 1)}
    ids = [item["id"] for _ in range(50) for item in build_prediction(choices, CONFIG, "v")["result"]]
    assert len(ids) == 150
    assert len(set(ids)) == len(ids)
    morphology = build_prediction(choices, CONFIG, "v")["result"][1]
    assert morphology["value"] == {"choices": ["Eggs", "Cilia"]}  # a multiple-choice tag keeps all


def test_build_prediction_without_evidence():
    pred = build_prediction({}, CONFIG, "v3")
    assert pred == {"result": [], "score": 0.0, "model_version": "v3"}
