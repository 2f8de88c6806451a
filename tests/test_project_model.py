"""The project model: k-means clusters labelled by annotations, its persistence, and predictions from it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from common.label_config import parse_label_config
from tests.helpers import LABEL_CONFIG
from worker.backbones import CEFAS_CLASSES
from worker.project_model import (
    CollectionModels,
    ProjectModel,
    auto_clusters,
    cluster_choices_for_tag,
    fit_model,
    fit_project_model,
    head_choice,
    model_from_bytes,
    model_to_bytes,
    normalise,
)
from worker.results import build_prediction

CONFIG = parse_label_config(LABEL_CONFIG)
DIM, PER_BLOB = 16, 20
HEAD_MAP = {"organism_type": {"copepod": "Plankton", "non-copepod": "Plankton", "detritus": "Debris"}}


def blobs(seed: int = 0) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Three well-separated Gaussian blobs (different directions, since features are normalised)."""
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
    b0, b1, b2 = members(0), members(1), members(2)
    return {
        # blob 0: organism_type 3 x Plankton, 1 x Debris; shape Round on 3 of 4, Spiky on exactly half
        b0[0]: {"organism_type": ["Plankton"], "shape": ["Round", "Spiky"]},
        b0[1]: {"organism_type": ["Plankton"], "shape": ["Round"]},
        b0[2]: {"organism_type": ["Plankton"], "shape": ["Round", "Spiky"]},
        b0[3]: {"organism_type": ["Debris"], "shape": ["Rod-like"]},
        # blob 1: unanimous
        b1[0]: {"organism_type": ["Debris"], "shape": ["Rod-like", "Spiky"]},
        b1[1]: {"organism_type": ["Debris"], "shape": ["Spiky", "Rod-like"]},
        # blob 2: no organism_type at all; life_form only here
        b2[0]: {"life_form": ["Colony"], "shape": ["Spiky"]},
        b2[1]: {"life_form": ["Colony"], "shape": ["Spiky"]},
        b2[2]: {"life_form": ["Filament"], "shape": ["Spiky"]},
        b2[3]: {"shape": ["Round"]},
    }


@pytest.fixture(scope="module")
def fitted_with_classifiers() -> tuple[ProjectModel, np.ndarray, np.ndarray]:
    features, task_ids, blob = blobs()
    model = fit_project_model("test-v0001", features, task_ids, annotations(), CONFIG, clusters=3, head_map=HEAD_MAP)
    return model, features, blob


@pytest.fixture(scope="module")
def fitted(fitted_with_classifiers) -> tuple[ProjectModel, np.ndarray, np.ndarray]:
    """The cluster evidence alone (the classifiers are tested in tests/test_tag_models.py)."""
    model, features, blob = fitted_with_classifiers
    return dataclasses.replace(model, classifiers={}, primary={}), features, blob


def per_blob_prediction(model: ProjectModel, features: np.ndarray, blob: np.ndarray, probs=None) -> list[dict]:
    predictions = model.predict(features, probs, CEFAS_CLASSES)
    out = []
    for b in range(3):
        mine = [predictions[i] for i in np.flatnonzero(blob == b)]
        assert all(p == mine[0] for p in mine), f"blob {b} is split over clusters"
        out.append(mine[0])
    return out


def test_one_cluster_per_blob(fitted):
    model, features, blob = fitted
    assert model.centroids.shape == (3, DIM) and model.centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(model.centroids, axis=1), 1.0, atol=1e-5)
    assigned = model.assign(normalise(features))
    assert len({tuple(sorted(set(assigned[blob == b]))) for b in range(3)}) == 3
    assert all(len(set(assigned[blob == b])) == 1 for b in range(3))
    assert {k: model.stats[k] for k in ("tasks", "annotated", "clusters")} == {
        "tasks": 60,
        "annotated": 10,
        "clusters": 3,
    }
    assert model.config_fingerprint == CONFIG.fingerprint
    assert model.version == "test-v0001"


def test_single_choice_majority_scored_by_purity(fitted):
    model, features, blob = fitted
    p0, p1, p2 = per_blob_prediction(model, features, blob)
    assert p0["organism_type"] == (["Plankton"], 0.75)
    assert p1["organism_type"] == (["Debris"], 1.0)
    assert p2["life_form"] == (["Colony"], round(2 / 3, 4))


def test_multiple_choice_takes_labels_of_most_members(fitted):
    model, features, blob = fitted
    p0, p1, p2 = per_blob_prediction(model, features, blob)
    assert p0["shape"] == (["Round"], 0.75)  # Spiky on exactly half is not more than half
    assert p1["shape"] == (["Rod-like", "Spiky"], 1.0)
    assert p2["shape"] == (["Spiky"], 0.75)


def test_no_annotated_member_no_prediction(fitted):
    model, features, blob = fitted
    p0, p1, p2 = per_blob_prediction(model, features, blob)
    assert "organism_type" not in p2
    assert "life_form" not in p0 and "life_form" not in p1
    assert "morphology" not in model.cluster_choices  # nobody annotated it
    assert all("morphology" not in p for p in (p0, p1, p2))
    per_cluster = model.cluster_choices["organism_type"]
    assert sum(c is None for c in per_cluster) == 1


def test_head_answers_only_where_clusters_have_no_evidence(fitted):
    model, features, blob = fitted
    probs = np.tile([0.1, 0.7, 0.2], (len(features), 1))  # mostly detritus
    p0, p1, p2 = per_blob_prediction(model, features, blob, probs)
    assert p0["organism_type"] == (["Plankton"], 0.75)  # the cluster's annotations win
    assert p2["organism_type"] == (["Debris"], 0.7)  # no annotations: the backbone's head answers
    assert "life_form" not in p0  # no head mapping for it


def test_head_map_validated_against_config():
    features, task_ids, _ = blobs(1)
    bad = {
        "organism_type": {"copepod": "Plankton"},
        "no_such_tag": {"copepod": "Plankton"},
        "shape": {"copepod": "Triangle"},  # not a label of the tag
    }
    model = fit_project_model("v", features, task_ids, {}, CONFIG, clusters=3, head_map=bad)
    assert model.head_map == {"organism_type": {"copepod": "Plankton"}}
    assert model.cluster_choices == {}


def test_model_without_centroids_uses_the_head():
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


def test_cluster_choices_for_tag():
    assert cluster_choices_for_tag([], multiple=False) is None
    assert cluster_choices_for_tag([["A"], ["B"], ["B"]], multiple=False) == (["B"], round(2 / 3, 4))
    assert cluster_choices_for_tag([["A", "B"], ["A"], ["A", "A"]], multiple=True) == (["A"], 1.0)
    assert cluster_choices_for_tag([["A"], ["B"]], multiple=True) is None  # nothing over half


@pytest.mark.parametrize(("n", "k"), [(1, 1), (2, 2), (3, 2), (100, 7), (10_000, 64)])
def test_auto_clusters(n: int, k: int):
    assert auto_clusters(n) == k


def test_fewer_tasks_than_clusters():
    features, task_ids, _ = blobs(2)
    model = fit_project_model("v", features[:2], task_ids[:2], {}, CONFIG, clusters=10)
    assert model.centroids.shape == (2, DIM)


def test_labels_no_longer_in_config_are_ignored():
    features, task_ids, _ = blobs(3)
    b0, b1 = members(0), members(1)
    labels = {
        b0[0]: {"organism_type": ["Removed-label"]},  # the only annotated member of its cluster
        b1[0]: {"organism_type": ["Removed-label"]},
        b1[1]: {"organism_type": ["Plankton"]},
    }
    model = fit_project_model("v", features, task_ids, labels, CONFIG, clusters=3)
    # No evidence under the current config for blob 0; blob 1's removed label does not dilute the score.
    assert sorted(model.cluster_choices["organism_type"], key=str) == [(["Plankton"], 1.0), None, None]


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
    assert loaded.head_map == model.head_map
    assert loaded.stats == model.stats
    probs = np.tile([0.1, 0.7, 0.2], (len(features), 1))
    assert loaded.predict(features, probs, CEFAS_CLASSES) == model.predict(features, probs, CEFAS_CLASSES)


def test_per_collection_model_round_trip(fitted):
    _, features, blob = fitted
    ids = list(range(len(features)))
    labels = {i: {"organism_type": ["Plankton" if blob[i] == 0 else "Debris"]} for i in ids[::3]}
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
