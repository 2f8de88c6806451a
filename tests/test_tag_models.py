"""Per-tag classifiers: they learn, their scores are probabilities, and each tag picks its best evidence."""

from __future__ import annotations

import numpy as np

from common.label_config import parse_label_config
from tests.helpers import LABEL_CONFIG
from worker.project_model import fit_project_model, normalise
from worker.tag_models import LinearTagModel, agreement, fit_multiple, fit_single

CONFIG = parse_label_config(LABEL_CONFIG)


def blobs(n_per: int = 40, dim: int = 24, spread: float = 0.6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (3, dim))
    x = np.concatenate([c + rng.normal(0, spread, (n_per, dim)) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(3), n_per)


def test_single_choice_classifier_learns_and_round_trips():
    x, blob = blobs()
    names = np.array(["Plankton", "Debris", "Not-plankton"])[blob]
    train = np.arange(0, len(x), 4)
    model, oof = fit_single("organism_type", normalise(x[train]), list(names[train]))
    assert model.labels == ["Debris", "Not-plankton", "Plankton"]
    assert agreement(list(oof), list(names[train]), multiple=False) > 0.9
    pred = model.predict(normalise(x))
    assert np.mean([p[0] == [t] for p, t in zip(pred, names, strict=True)]) > 0.95
    probs = model.probabilities(normalise(x))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert all(p[1] == round(float(row.max()), 4) for p, row in zip(pred, probs, strict=True))
    again = LinearTagModel.from_json(model.to_json())
    np.testing.assert_allclose(again.probabilities(normalise(x)), probs, rtol=1e-5)


def test_single_choice_needs_two_labels_with_two_examples():
    x, _ = blobs(n_per=3)
    assert fit_single("t", x[:3], ["A", "A", "B"]) is None
    assert fit_single("t", x[:4], ["A", "A", "B", "B"]) is not None


def test_temperature_scaling_brings_confidence_to_held_out_accuracy():
    """Averaged over several draws: |mean confidence - accuracy| on held-out tasks, with and without."""
    gaps = []
    for seed in range(6):
        x, blob = blobs(n_per=120, spread=2.5, seed=seed)
        names = np.array(["A", "B", "C"])[blob]
        order = np.random.default_rng(seed).permutation(len(x))
        train, test = order[:180], order[180:]
        model, _ = fit_single("t", normalise(x[train]), list(names[train]))

        def gap(temperature: float, model=model, test=test, x=x, names=names) -> float:
            model.temperature = temperature
            probs = model.probabilities(normalise(x[test]))
            accuracy = np.mean(np.array(model.labels)[probs.argmax(axis=1)] == names[test])
            return abs(float(probs.max(axis=1).mean()) - float(accuracy))

        gaps.append((gap(model.temperature), gap(1.0)))
    calibrated, raw = np.mean(gaps, axis=0)
    assert calibrated < 0.06, gaps
    assert calibrated < raw, gaps


def test_multiple_choice_one_vs_rest_with_thresholds():
    x, blob = blobs(n_per=30)
    # blob 0: Round; blob 1: Rod-like + Spiky; blob 2: Spiky
    sets = [["Round"], ["Rod-like", "Spiky"], ["Spiky"]]
    truth = [sets[b] for b in blob]
    model, oof = fit_multiple("shape", normalise(x), truth, ["Spiky", "Round", "Rod-like"])
    assert set(model.labels) == {"Spiky", "Round", "Rod-like"}
    assert model.thresholds is not None and all(0.2 <= t <= 0.8 for t in model.thresholds)
    assert agreement(oof, truth, multiple=True) > 0.9
    pred = model.predict(normalise(x))
    assert np.mean([p is not None and set(p[0]) == set(t) for p, t in zip(pred, truth, strict=True)]) > 0.95


def test_the_classifier_wins_where_clusters_mix_labels():
    """One cluster holds two labels split along a direction k-means ignores: the classifier wins the
    cross-validation and answers; the cluster majority would be wrong for half."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 0.05, (80, 8)).astype(np.float32)
    x[:, 0] += 5.0
    side = np.where(np.arange(80) % 2 == 0, 1.0, -1.0)
    x[:, 1] += 0.4 * side
    labels = {i: {"organism_type": ["Plankton" if side[i] > 0 else "Debris"]} for i in range(0, 80, 3)}
    model = fit_project_model("v1", x, list(range(80)), labels, CONFIG, clusters=1)
    assert model.primary["organism_type"] == "classifier"
    ev = model.stats["evidence"]["organism_type"]
    assert ev["classifier"] > ev["clusters"]
    pred = model.predict(x, None, ())
    truth = ["Plankton" if s > 0 else "Debris" for s in side]
    assert np.mean([p["organism_type"][0] == [t] for p, t in zip(pred, truth, strict=True)]) > 0.9


def test_clusters_answer_where_the_classifier_cannot_be_fitted():
    x, blob = blobs(n_per=10)
    labels = {0: {"life_form": ["Colony"]}, 10: {"life_form": ["Filament"]}}
    model = fit_project_model("v1", x, list(range(30)), labels, CONFIG, clusters=3)
    assert "life_form" not in model.classifiers
    assert model.primary["life_form"] == "clusters"
    pred = model.predict(x, None, ())
    assert pred[5]["life_form"][0] == ["Colony"] and pred[15]["life_form"][0] == ["Filament"]
    assert "life_form" not in pred[25], "the third cluster has no evidence: no choice"
