"""The per-tag learner on synthetic data with known structure: what it chooses, how well it learns, what its
unlabelled tasks add, and how confident it claims to be. Seeded and deterministic; nothing is timed."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.datasets import make_moons
from sklearn.linear_model import LogisticRegressionCV

from common.label_config import parse_label_config
from worker import learning
from worker.learning import (
    RIDGE_GRID,
    apply_calibration,
    fit_calibration,
    propagate,
    ridge_basis,
    ridge_fit,
    rows_to_probabilities,
    spread_basis,
    spread_fit,
    task_evidence,
)
from worker.project_model import fit_project_model, model_from_bytes, model_to_bytes
from worker.tag_models import Neighbours

TAG = "c"


def config(classes: list[str]):
    choices = "".join(f'<Choice value="{c}"/>' for c in classes)
    return parse_label_config(
        f'<View><Image name="image" value="$image"/><Choices name="{TAG}" toName="image" choice="single">'
        f"{choices}</Choices></View>"
    )


def gaussian_classes(seed: int, n_per: int = 100, classes: int = 4, dim: int = 32, spread: float = 1.6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim))
    y = np.repeat(np.arange(classes), n_per)
    return (centres[y] + rng.normal(0, spread, (len(y), dim))).astype(np.float32), y


def rbf_moons(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved half-moons seen through 64 positive, local features (as a CNN's activations are):
    neighbours in feature space are neighbours on the moons; no hyperplane separates them well."""
    points, y = make_moons(n, noise=0.08, random_state=seed)
    rng = np.random.default_rng(seed)
    centres = rng.uniform([-1.2, -0.7], [2.2, 1.2], (64, 2))
    features = np.exp(-((points[:, None, :] - centres[None]) ** 2).sum(-1) / (2 * 0.35**2))
    return features.astype(np.float32), y


def annotate_some(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == k), per_class, replace=False) for k in set(y)]))


def backend(features: np.ndarray, y: np.ndarray, annotated: np.ndarray, ask: np.ndarray, fit_rows=None):
    """Fit as a refit does and answer `ask`; `fit_rows` (default: every task) are the tasks the fit sees."""
    names = [f"k{v}" for v in sorted(set(y.tolist()))]
    rows = np.arange(len(y)) if fit_rows is None else fit_rows
    labels = {int(i): {TAG: [names[y[i]]]} for i in annotated}
    model = fit_project_model("", features[rows], [int(r) for r in rows], labels, config(names))
    answers = model.predict(features[ask], None, ())
    predicted = np.array([names.index(a[TAG][0][0]) if TAG in a else -1 for a in answers])
    scores = np.array([a[TAG][1] if TAG in a else 0.0 for a in answers])
    return model, predicted, scores


def tuned_logistic_regression(features, y, annotated, ask) -> np.ndarray:
    x = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-6)
    folds = min(5, int(np.bincount(y[annotated]).min()))
    with warnings.catch_warnings():  # scikit-learn's notes on its coming defaults
        warnings.simplefilter("ignore", FutureWarning)
        lr = LogisticRegressionCV(Cs=np.logspace(-4, 3, 8), cv=folds, max_iter=5000).fit(x[annotated], y[annotated])
    return lr.predict(x[ask])


# -- learning ----------------------------------------------------------------------------------------------


def test_beats_the_majority_and_matches_a_well_regularised_logistic_regression():
    ours, reference, majority = [], [], []
    for seed in range(5):
        x, y = gaussian_classes(seed)
        annotated = annotate_some(y, 6, seed)
        rest = np.setdiff1d(np.arange(len(y)), annotated)
        _, predicted, _ = backend(x, y, annotated, rest)
        ours.append(np.mean(predicted == y[rest]))
        reference.append(np.mean(tuned_logistic_regression(x, y, annotated, rest) == y[rest]))
        majority.append(np.mean(y[rest] == np.bincount(y[annotated]).argmax()))
    assert np.mean(ours) >= np.mean(majority) + 0.4, (ours, majority)
    assert np.mean(ours) >= np.mean(reference) - 0.02, (ours, reference)


def test_unlabelled_tasks_carry_labels_along_the_data():
    """Eight annotated tasks: the same learner fitted on them alone, and a tuned logistic regression, both
    miss much of each moon; fitted with all 400 tasks, labels spread along the moons."""
    with_all, annotated_only, reference = [], [], []
    for seed in range(5):
        x, y = rbf_moons(seed)
        annotated = annotate_some(y, 4, seed)
        rest = np.setdiff1d(np.arange(len(y)), annotated)
        with_all.append(np.mean(backend(x, y, annotated, rest)[1] == y[rest]))
        annotated_only.append(np.mean(backend(x, y, annotated, rest, fit_rows=annotated)[1] == y[rest]))
        reference.append(np.mean(tuned_logistic_regression(x, y, annotated, rest) == y[rest]))
    assert np.mean(with_all) >= np.mean(annotated_only) + 0.04, (with_all, annotated_only)
    assert np.mean(with_all) >= np.mean(reference) + 0.05, (with_all, reference)


def test_new_tasks_are_predicted_from_the_stored_model_alone():
    """Inductive: a model fitted on half the tasks, sent through bytes, answers the other half."""
    x, y = gaussian_classes(7, spread=1.0)
    first, second = np.arange(0, len(y), 2), np.arange(1, len(y), 2)
    annotated = first[annotate_some(y[first], 5, 7)]
    model, predicted, _ = backend(x, y, annotated, second, fit_rows=first)
    assert np.mean(predicted == y[second]) > 0.9
    again = model_from_bytes(model_to_bytes(model))
    assert again.predict(x[second], None, ()) == model.predict(x[second], None, ())


def test_fitting_is_deterministic():
    x, y = gaussian_classes(3)
    annotated = annotate_some(y, 4, 3)
    first = backend(x, y, annotated, np.arange(len(y)))[0]
    second = backend(x, y, annotated, np.arange(len(y)))[0]
    assert first.predict(x, None, ()) == second.predict(x, None, ())
    assert first.stats == second.stats


def test_hyper_parameters_are_chosen_inside_the_fit():
    """Labels that follow the features get little regularisation and a far-reaching spread; labels that
    are noise get the strongest regularisation there is: the choice comes from the annotations."""
    x, y = gaussian_classes(11, spread=0.3)
    annotated = annotate_some(y, 10, 11)
    clean, _, _ = backend(x, y, annotated, annotated)
    noise = np.random.default_rng(0).permutation(y)
    shuffled, _, _ = backend(x, noise, annotated, annotated)
    clean_ridge = clean.stats["evidence"][TAG]["ridge_strength"]
    noisy_ridge = shuffled.stats["evidence"][TAG]["ridge_strength"]
    assert clean_ridge < noisy_ridge == max(RIDGE_GRID)
    assert clean.stats["evidence"][TAG]["cv_accuracy"] == 1.0
    assert shuffled.stats["evidence"][TAG]["cv_accuracy"] < 0.5


def test_the_model_stays_small_whatever_the_project_size(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(learning, "MAX_ANCHORS", 200)
    sizes = []
    for n_per in (100, 400):
        x, y = gaussian_classes(5, n_per=n_per)
        annotated = annotate_some(y, 10, 5)
        model, predicted, _ = backend(x, y, annotated, np.arange(len(y)))
        assert model.stats["anchors"] == 200 and len(model.space.anchors) == 200
        assert np.mean(predicted == y) > 0.8
        sizes.append(len(model_to_bytes(model)))
    assert sizes[1] < 1.1 * sizes[0], sizes


# -- the parts, checked against doing it the slow way -------------------------------------------------------


def test_ridge_leave_one_out_is_exact(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(learning, "RIDGE_GRID", (0.3,))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 8)), rng.integers(0, 3, 30)
    model, loo = ridge_fit(ridge_basis(x), y, 3)
    xc = x - x.mean(axis=0)
    lam = 0.3 * float(np.linalg.eigvalsh(xc.T @ xc).mean())
    target = np.eye(3)[y]
    for i in (0, 7, 29):
        keep = np.arange(30) != i
        xs, t = x[keep], target[keep]
        mu, tm = xs.mean(axis=0), t.mean(axis=0)
        w = np.linalg.solve((xs - mu).T @ (xs - mu) + lam * np.eye(8), (xs - mu).T @ (t - tm))
        # what the held-out output returns on top: its own label's share of the mean label (its label is
        # not the only one of its kind here)
        assert np.sum(y == y[i]) > 1
        back = (target[i] - target.mean(axis=0)) / 29
        np.testing.assert_allclose(loo[i], (x[i] - mu) @ w + tm + back, atol=1e-6)


def test_spreading_leave_one_out_is_exact(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(learning, "ALPHAS", (0.6,))
    rng = np.random.default_rng(1)
    anchors = learning.l2(rng.normal(size=(40, 6)))
    graphs = {5: learning.graph(anchors, 5)}
    labelled, y = np.array([0, 3, 8, 12, 20, 31]), np.array([0, 1, 0, 1, 1, 0])
    spread, loo = spread_fit(spread_basis(graphs, labelled, np.arange(6)), y, 2)
    for i in range(6):
        seeds = np.zeros((40, 2), np.float32)
        keep = np.arange(6) != i
        seeds[labelled[keep], y[keep]] = 1.0
        mass = propagate(graphs[5], seeds, 0.6)[labelled[i]]
        np.testing.assert_allclose(loo[i], rows_to_probabilities(mass[None])[0], atol=1e-4)


def test_each_held_out_task_is_answered_with_the_choice_made_without_it():
    right = np.array([[1, 1, 0, 0], [0, 1, 1, 1]], bool)  # configuration 1 wins, 3 right to 2
    closeness = np.zeros((2, 4))
    chosen, nested = learning.choose(right, closeness)
    assert chosen == 1
    # Without task 2 or 3 (right under configuration 1 only) it is a tie, 2 to 2, which goes to the first.
    assert nested.tolist() == [1, 1, 0, 0]


# -- how sure it claims to be ---------------------------------------------------------------------------------


def test_with_few_held_out_outcomes_the_prior_map_holds_and_with_many_they_decide():
    """Ten held-out tasks, all wrong where the prior map claims 0.9: a project's ten unlucky answers move its
    scores only part of the way. Three hundred such outcomes move them to what they show."""
    prior = np.full(10, 2.2)  # sigmoid(2.2) = 0.9
    assert fit_calibration(prior[:0], np.zeros(0, bool)) == (1.0, 0.0)  # no evidence: the prior map itself
    few = apply_calibration(prior, *fit_calibration(prior, np.zeros(10, bool))).mean()
    assert 0.2 < few < 0.85, few
    many_prior = np.random.default_rng(0).normal(2.2, 0.5, 300)
    right = np.random.default_rng(1).random(300) < 0.3
    many = apply_calibration(many_prior, *fit_calibration(many_prior, right)).mean()
    assert abs(many - right.mean()) < 0.05, (many, right.mean())
    # the order of the tasks is the prior map's
    scores = apply_calibration(np.sort(many_prior), *fit_calibration(many_prior, right))
    assert np.all(np.diff(scores) >= 0)


def test_a_task_is_compared_with_the_annotated_tasks_it_may_see():
    """`nearest`: the most similar annotated task; `nearest_same`: the most similar one annotated with the
    label suggested; a held-out task's own column (-inf) is never its neighbour."""
    mixture = np.array([[0.8, 0.2], [0.3, 0.7]])
    similarity = np.array([[-np.inf, 0.9, 0.1], [0.5, 0.2, 0.4]])
    evidence = task_evidence(mixture, similarity, np.array([0, 1, 0]), 0.25)
    np.testing.assert_allclose(evidence[:, 1], [0.9, 0.5])  # nearest
    np.testing.assert_allclose(evidence[:, 2], [0.1, 0.2])  # nearest with the suggested class (0, then 1)
    np.testing.assert_allclose(evidence[:, 0], np.log(np.array([0.8, 0.7]) / np.array([0.2, 0.3])))
    np.testing.assert_allclose(evidence[:, 3], [0.25, 0.25])  # the project's unseen mass


def test_unseen_mass_is_the_share_of_labels_annotated_once():
    """Good-Turing's estimate while many labels offered are not annotated yet."""
    assert learning.unseen_mass(np.array([1, 1, 3, 5]), offered=20) == 0.2
    assert learning.unseen_mass(np.array([2, 4]), offered=20) == 0.0
    assert learning.unseen_mass(np.array([1, 1, 1]), offered=20) == pytest.approx(0.85)  # 17 of 20 missing


def test_unseen_mass_is_nothing_once_every_label_offered_is_annotated():
    """One of each of six classes first, then four more: Good-Turing reads the singletons as labels still
    unseen (0.3), but the config offers no other label; with one label of seven missing, at most a seventh;
    with half the labels missing, Good-Turing's."""
    assert learning.unseen_mass(np.array([1, 1, 2, 2, 3, 1]), offered=6) == 0.0
    assert learning.unseen_mass(np.array([1, 1, 2, 2, 3, 1]), offered=7) == pytest.approx(1 / 7)
    assert learning.unseen_mass(np.array([1, 1, 2, 2, 3, 1]), offered=12) == pytest.approx(0.3)
    assert learning.unseen_mass(np.array([1, 1, 1, 1, 1]), offered=6) == pytest.approx(1 / 6)
    assert learning.unseen_mass(np.array([3, 0, 1]), offered=2) == 0.0  # labels outside the config count too


def test_a_project_s_scores_follow_its_accuracy_not_its_held_out_luck():
    """Ten annotations of four overlapping classes, 12 projects: the mean score of each project's tasks is
    nearer its accuracy, on average, than the held-out accuracy of its ten annotations is (what the scores
    before issue 26 were held to)."""
    score_gap, held_out_gap = [], []
    for seed in range(12):
        x, y = gaussian_classes(seed, classes=4, spread=2.5)
        annotated = np.random.default_rng(seed).choice(len(y), 10, replace=False)
        rest = np.setdiff1d(np.arange(len(y)), annotated)
        model, predicted, scores = backend(x, y, annotated, rest)
        accuracy = np.mean(predicted == y[rest])
        score_gap.append(abs(scores.mean() - accuracy))
        held_out_gap.append(abs(model.stats["evidence"][TAG]["cv_accuracy"] - accuracy))
    assert np.mean(score_gap) < np.mean(held_out_gap), (np.mean(score_gap), np.mean(held_out_gap))


def test_scores_are_calibrated_with_enough_annotations():
    """Pooled over seeds, 40 annotations of three overlapping classes: the expected calibration error of
    the predicted label's score is small, and never over-confident. The score's prior map was learnt on
    plankton photographs, and Gaussian blobs are far from them (the map alone claims 0.1 to 0.2 too
    little here): the project's 40 held-out outcomes move it most of the way."""
    scores, right, prior_only = [], [], []
    for seed in range(6):
        x, y = gaussian_classes(seed, n_per=200, classes=3, spread=2.2)
        annotated = np.random.default_rng(seed).choice(len(y), 40, replace=False)
        rest = np.setdiff1d(np.arange(len(y)), annotated)
        model, predicted, s = backend(x, y, annotated, rest)
        scores.append(s)
        right.append(predicted == y[rest])
        (problem,) = model.learners[TAG].problems
        space = model.space
        full = space.full(x[rest])
        low = space.low(full)
        idx, sim = learning.neighbours(low, space.anchors, max(learning.GRAPH_KS))
        _, evidence = problem.evidence(Neighbours(full, low, idx, sim))
        prior_only.append(apply_calibration(learning.prior_logit(evidence), 1.0, 0.0))
    s, r = np.concatenate(scores), np.concatenate(right)
    assert ece(s, r) <= 0.1, ece(s, r)
    assert s.mean() <= r.mean() + 0.01  # not over-confident overall
    assert ece(np.concatenate(prior_only), r) > 1.5 * ece(s, r), (ece(np.concatenate(prior_only), r), ece(s, r))


def ece(scores: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    which = np.minimum((scores * bins).astype(int), bins - 1)
    return float(sum(abs(correct[which == b].mean() - scores[which == b].mean()) * np.sum(which == b)
                     for b in range(bins) if np.any(which == b)) / len(scores))  # fmt: skip
