"""The numerical core of the per-tag learner: pure numpy/scipy functions, no Redis, no Celery.

What a tag learns from (worker/tag_models.py puts these together):

- an embedding space fitted on **all** of the project's tasks, annotated or not (`FeatureSpace`): features
  square-rooted (signed), L2-normalised, centred on the project's own mean and normalised again; and a
  PCA of those to `PCA_DIMS` dimensions for the neighbour graph;
- a ridge regression on the one-hot labels in the full space (`ridge_fit`), its strength chosen by exact
  leave-one-out on the annotated tasks;
- label spreading over a k-nearest-neighbour graph of up to `MAX_ANCHORS` tasks (`spread_fit`), which
  is where the unlabelled images come in: labels flow along chains of similar particles. Its alpha and k
  are chosen by exact leave-one-out too (spreading is linear in the labels, so removing one label is a
  subtraction). New tasks get the spread labels of their nearest anchors (`induce`), so a model predicts
  tasks it was not fitted on from stored parameters alone;
- the probability that the suggestion is right (`task_evidence`, `fit_calibration`): a map from what the
  fit knows about each task, learnt once on development data, moved by the project's own held-out
  outcomes as far as they have evidence for.

Why these (bench/RESULTS.md, "Learning quality"): on three kinds of data (35 and 27 lake plankton taxa,
and two particle shapes) the linear model is best with many annotations per class and the graph with
few; their average was at least as good as the better of the two in every setting measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.utils.extmath import randomized_svd

MAX_ANCHORS = 3000  # tasks in the graph (all of them in a project up to this size); bounds fit time and blob
PCA_DIMS = 128
GRAPH_KS = (5, 10)
ALPHAS = (0.1, 0.3, 0.6, 0.9)
RIDGE_GRID = tuple(float(x) for x in np.logspace(-3, 3, 13))  # times the mean eigenvalue of the Gram matrix
MAX_LOO = 300  # labelled anchors whose leave-one-out spreading is computed (the ridge uses all)
CHUNK = 2048  # rows per block when predicting many tasks
EPS = 1e-6


def signed_sqrt(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.sqrt(np.abs(x))


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# -- the embedding space ---------------------------------------------------------------------------------


@dataclass
class FeatureSpace:
    """Fitted on all of a project's tasks. `full(x)`: the space the ridge works in; `low(full)`: unit
    vectors in the PCA space, where neighbours are found; `anchors`: the graph's tasks in that space."""

    mean: np.ndarray  # (dim,) mean of the normalised square-rooted features
    basis: np.ndarray  # (dim, r)
    anchors: np.ndarray  # (m, r) unit length, float16

    def full(self, features: np.ndarray) -> np.ndarray:
        x = l2(signed_sqrt(np.asarray(features, np.float32)))
        return l2(x - self.mean)

    def low(self, full: np.ndarray) -> np.ndarray:
        return l2(full @ self.basis)


def fit_space(features: np.ndarray, priority: np.ndarray, seed: int) -> tuple[FeatureSpace, np.ndarray, np.ndarray]:
    """Returns the space, every task's full features, and the anchor rows: every `priority` row (the
    annotated tasks) up to half the anchors, the rest drawn at random from the other tasks."""
    rng = np.random.default_rng(seed)
    x = l2(signed_sqrt(np.asarray(features, np.float32)))
    mean = x.mean(axis=0)
    full = l2(x - mean)
    n = len(full)
    if n <= MAX_ANCHORS:
        anchors = np.arange(n)
    else:
        first = np.flatnonzero(priority)
        if len(first) > MAX_ANCHORS // 2:
            first = rng.choice(first, MAX_ANCHORS // 2, replace=False)
        others = np.setdiff1d(np.arange(n), first)
        anchors = np.sort(np.concatenate([first, rng.choice(others, MAX_ANCHORS - len(first), replace=False)]))
    sample = full[anchors]
    r = int(max(1, min(PCA_DIMS, len(sample) - 1, sample.shape[1])))
    centred = sample - sample.mean(axis=0)
    if len(sample) < 2 or not np.any(centred):
        basis = np.eye(sample.shape[1], r, dtype=np.float32)
    else:
        _, _, vt = randomized_svd(centred.astype(np.float32), r, n_iter=2, random_state=seed)
        basis = vt.T.astype(np.float32)
    space = FeatureSpace(mean.astype(np.float32), basis.astype(np.float16), np.zeros((0, r), np.float16))
    space.anchors = space.low(full[anchors]).astype(np.float16)
    return space, full, anchors


# -- ridge regression on one-hot labels, with exact leave-one-out -----------------------------------------


@dataclass
class Ridge:
    weight: np.ndarray  # (dim, C)
    bias: np.ndarray  # (C,)
    strength: float  # chosen lambda, relative to the mean eigenvalue


def one_hot(y: np.ndarray, classes: int) -> np.ndarray:
    out = np.zeros((len(y), classes), np.float64)
    out[np.arange(len(y)), y] = 1.0
    return out


@dataclass
class RidgeBasis:
    """The eigen-decomposition that every ridge fit on the same annotated tasks shares (one per tag)."""

    x: np.ndarray  # (n, dim) the annotated tasks' features
    mean: np.ndarray
    values: np.ndarray  # non-zero eigenvalues of the centred Gram matrix
    proj: np.ndarray  # (n, r) orthonormal: its eigenvectors, rows are tasks


def ridge_basis(x: np.ndarray) -> RidgeBasis:
    x = np.asarray(x, np.float64)
    n, dim = x.shape
    mu = x.mean(axis=0)
    xc = x - mu
    if n <= dim:  # dual: the n x n Gram matrix
        values, proj = np.linalg.eigh(xc @ xc.T)
    else:  # primal: the dim x dim covariance
        values, v = np.linalg.eigh(xc.T @ xc)
        proj = xc @ v / np.sqrt(np.maximum(values, 1e-12))
    values = np.maximum(values, 0.0)
    keep = values > 1e-10 * max(float(values.max(initial=0.0)), 1e-300)
    return RidgeBasis(x, mu, values[keep], proj[:, keep])


def choose(right: np.ndarray, closeness: np.ndarray) -> tuple[int, np.ndarray]:
    """Hyper-parameter choice by leave-one-out: `right` (configurations x tasks) whether each held-out task
    was right, `closeness` how close (breaks ties; higher is better). Returns the configuration with the
    most right (the first on ties), and for each task the one chosen without looking at that task: its
    held-out answer under that one is an honest estimate, where the winner's own answers are flattered by
    having been picked for them (at 20-50 annotations the winner claimed 0.03-0.05 too much)."""

    def best(counts: np.ndarray, ties: np.ndarray) -> np.ndarray:
        top = counts == counts.max(axis=0)
        return np.argmax(np.where(top, ties, -np.inf), axis=0)

    counts, ties = right.sum(axis=1), closeness.sum(axis=1)
    chosen = int(best(counts[:, None], ties[:, None])[0])
    nested = best(counts[:, None] - right, ties[:, None] - closeness)
    return chosen, nested


def ridge_fit(basis: RidgeBasis, y: np.ndarray, classes: int) -> tuple[Ridge, np.ndarray]:
    """Ridge regression of the one-hot labels with an unpenalised intercept; lambda chosen by exact
    leave-one-out (accuracy, then squared error). Returns the model and the leave-one-out outputs, each
    under the lambda chosen without that task (`choose`).

    The labels' frequencies are kept as they are with every task: taking a task out would also lower its
    own label's frequency and hold every task against its own label (a majority vote over balanced labels
    is never right held out); measured, that made the held-out accuracy 0.06 lower than the accuracy on the
    tasks not annotated. So each held-out output returned gets back what its label added to the mean label,
    unless no other task has that label (lambda is chosen on the plain leave-one-out)."""
    n = len(y)
    target = one_hot(y, classes)
    t_mu = target.mean(axis=0)
    tc = target - t_mu
    values, proj = basis.values, basis.proj
    scale = float(values.mean()) if len(values) else 1.0
    coef = proj.T @ tc
    # not for a task whose label no other task has: held out, that label is unknown, and must stay so
    shared = (np.bincount(y, minlength=classes)[y] > 1)[:, None]
    give_back = np.where(shared, (target - t_mu) / max(n - 1, 1), 0.0)
    outputs, right, closeness = [], [], []
    for g in RIDGE_GRID:
        shrink = values / (values + g * scale)
        fitted = (proj * shrink) @ coef + t_mu
        lev = np.minimum(np.sum(proj * proj * shrink, axis=1) + 1.0 / n, 1.0 - 1e-6)
        loo = (fitted - lev[:, None] * target) / (1.0 - lev[:, None])
        outputs.append(loo + give_back)
        right.append(loo.argmax(axis=1) == y)
        closeness.append(-np.sum((loo - target) ** 2, axis=1))
    chosen, nested = choose(np.array(right), np.array(closeness))
    strength = RIDGE_GRID[chosen]
    lam = strength * scale
    # In the span of the centred tasks: weight = xc' U diag(1 / (values + lambda)) U' tc, which is the
    # ridge solution whichever of n and dim is larger.
    xc = basis.x - basis.mean
    weight = xc.T @ (proj @ (coef / (values + lam)[:, None]))
    bias = t_mu - basis.mean @ weight
    honest = np.array(outputs)[nested, np.arange(n)]
    return Ridge(weight.astype(np.float32), bias.astype(np.float32), float(strength)), honest


# -- label spreading over the anchors' neighbour graph -----------------------------------------------------


def neighbours(queries: np.ndarray, anchors: np.ndarray, k: int, exclude_self: bool = False):
    """Indices and cosine similarities of the k most similar anchors, most similar first, per query (in
    blocks of CHUNK rows)."""
    k = int(min(k, len(anchors) - (1 if exclude_self else 0)))
    a = np.asarray(anchors, np.float32)
    idx_out, sim_out = [], []
    for start in range(0, len(queries), CHUNK):
        s = np.asarray(queries[start : start + CHUNK], np.float32) @ a.T
        if exclude_self:
            rows = np.arange(len(s))
            s[rows, start + rows] = -np.inf
        idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, idx, axis=1), axis=1, kind="stable")
        idx = np.take_along_axis(idx, order, axis=1)
        idx_out.append(idx)
        sim_out.append(np.take_along_axis(s, idx, axis=1))
    return np.concatenate(idx_out), np.concatenate(sim_out)


def graphs(anchors: np.ndarray, ks: Sequence[int]) -> tuple[dict[int, sp.csr_matrix], np.ndarray, np.ndarray]:
    """Symmetrically normalised k-nearest-neighbour affinities D^-1/2 W D^-1/2 for each k (W: cosine
    similarity, kept positive, made symmetric), from one neighbour search. Also returns, per anchor, its
    other anchors most similar first (indices, similarities)."""
    m = len(anchors)
    ks = [k for k in ks if k < m]
    if not ks:
        return {}, np.zeros((m, 0), int), np.zeros((m, 0), np.float32)
    idx, sim = neighbours(anchors, anchors, max(ks), exclude_self=True)
    out = {}
    for k in ks:
        rows = np.repeat(np.arange(m), k)
        values = np.maximum(sim[:, :k].ravel(), 0.0) + EPS
        w = sp.csr_matrix((values, (rows, idx[:, :k].ravel())), shape=(m, m), dtype=np.float32)
        w = w.maximum(w.T)
        d = 1.0 / np.sqrt(np.asarray(w.sum(axis=1)).ravel())
        out[k] = sp.csr_matrix(sp.diags(d) @ w @ sp.diags(d), dtype=np.float32)
    return out, idx, sim


def graph(anchors: np.ndarray, k: int) -> sp.csr_matrix:
    return graphs(anchors, [k])[0][k]


def propagate(s: sp.csr_matrix, y0: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - alpha) (I - alpha S)^-1 y0, summed until alpha^t < 1e-3."""
    steps = max(1, math.ceil(math.log(1e-3) / math.log(alpha)))
    term = (1.0 - alpha) * np.asarray(y0, np.float32)
    out = term.copy()
    for _ in range(steps):
        term = alpha * (s @ term)
        out += term
    return out


@dataclass
class Spread:
    labels: np.ndarray  # (m, C) spread label mass at each anchor
    k: int
    alpha: float


def rows_to_probabilities(mass: np.ndarray) -> np.ndarray:
    """Label mass to probabilities; a row no label reached says nothing (uniform)."""
    mass = np.maximum(np.asarray(mass, np.float64), 0.0)
    total = mass.sum(axis=1, keepdims=True)
    c = mass.shape[1]
    return np.where(total > 1e-12, mass / np.maximum(total, 1e-300), 1.0 / c)


@dataclass
class SpreadBasis:
    """What every spreading fit on the same labelled anchors shares (one per tag): the graphs, and how
    much of its own label each held-out anchor gets back, per (k, alpha)."""

    graphs: dict[int, sp.csr_matrix]
    labelled: np.ndarray  # anchor index of each labelled task in the graph
    loo_rows: np.ndarray  # positions into `labelled` whose leave-one-out is computed
    self_weight: dict[tuple[int, float], np.ndarray]


def spread_basis(graphs: dict[int, sp.csr_matrix], labelled: np.ndarray, loo_rows: np.ndarray) -> SpreadBasis:
    self_weight = {}
    for k, s in graphs.items():
        seeds = np.zeros((s.shape[0], len(loo_rows)), np.float32)
        seeds[labelled[loo_rows], np.arange(len(loo_rows))] = 1.0
        for alpha in ALPHAS:
            self_weight[k, alpha] = propagate(s, seeds, alpha)[labelled[loo_rows], np.arange(len(loo_rows))]
    return SpreadBasis(graphs, labelled, loo_rows, self_weight)


def spread_fit(basis: SpreadBasis, y: np.ndarray, classes: int) -> tuple[Spread, np.ndarray]:
    """Label spreading from the labelled anchors (`y`: their classes). k and alpha chosen by exact
    leave-one-out on the basis' `loo_rows` (spreading is linear in the labels: a held-out anchor's answer
    is the whole answer less what its own label sent back), accuracy then log-loss. Returns the model and
    the leave-one-out probabilities of the `loo_rows`, each under the configuration chosen without it."""
    target = one_hot(y, classes)
    rows = basis.loo_rows
    truth = y[rows]
    configs, outputs, right, closeness = [], [], [], []
    for k, s in basis.graphs.items():
        y0 = np.zeros((s.shape[0], classes), np.float32)
        y0[basis.labelled] = target
        for alpha in ALPHAS:
            mass = propagate(s, y0, alpha)
            loo_mass = mass[basis.labelled[rows]] - basis.self_weight[k, alpha][:, None] * target[rows]
            loo = rows_to_probabilities(loo_mass)
            configs.append((mass, int(k), float(alpha)))
            outputs.append(loo)
            right.append(loo.argmax(axis=1) == truth)
            closeness.append(np.log(np.maximum(loo[np.arange(len(truth)), truth], 1e-6)))
    chosen, nested = choose(np.array(right), np.array(closeness))
    mass, k, alpha = configs[chosen]
    return Spread(mass.astype(np.float16), k, alpha), np.array(outputs)[nested, np.arange(len(rows))]


def induce(spread_labels: np.ndarray, idx: np.ndarray, sim: np.ndarray) -> np.ndarray:
    """Spread labels at new points: the similarity-weighted mean of their nearest anchors' labels."""
    w = np.maximum(sim, 0.0) + EPS
    mass = np.einsum("nk,nkc->nc", w, np.asarray(spread_labels, np.float32)[idx]) / w.sum(axis=1, keepdims=True)
    return rows_to_probabilities(mass)


# -- probabilities and calibration -------------------------------------------------------------------------


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(scores: np.ndarray, y: np.ndarray) -> float:
    """Temperature for softmax(ridge outputs / T), minimising the leave-one-out negative log-likelihood."""

    def nll(log_t: float) -> float:
        p = softmax(scores / math.exp(log_t))
        return float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], 1e-9))))

    grid = np.linspace(math.log(1e-3), math.log(10.0), 41)
    return float(math.exp(min(grid, key=nll)))


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


# -- scores: the probability that a suggestion is right ------------------------------------------------------
#
# Each task's score comes from what the fit knows about it (`task_evidence`): how sure the mixture is, how
# similar the task is to the nearest annotated task, and how similar to the nearest one annotated with the
# label suggested; and from how likely a task is to belong to a label nobody annotated yet, which is then
# necessarily answered wrongly (`unseen_mass`).
# A logistic map from those to P(right) is the prior. Its weights were fitted once,
# on simulated projects of ZooLake's development half only (bench/design.py prior; bench/RESULTS.md,
# "Issue 26"), never on data the design is reported on. Each project then moves the map by its own held-out
# outcomes (`fit_calibration`): a slope and a shift, each with a Gaussian prior, by maximum a posteriori.
# With ten annotations the prior holds, so a project's scores are not set by the luck of ten held-out
# answers (the clamp this replaces let one project's scores sit 0.4 from its accuracy); with hundreds of
# annotations the project's own outcomes decide. Whether the mixture's two parts agree was measured as a
# fourth item, and weighed nothing.
EVIDENCE = ("confidence", "nearest", "nearest_same", "unseen")
PRIOR_WEIGHTS = (0.467, -2.51, 6.521, -2.136)  # per EVIDENCE item, on the logit of P(right)
PRIOR_BIAS = -1.118
# The map of the models stored before `unseen_mass` was told the labels the config offers: their `unseen` is
# Good-Turing's alone, so they keep the map fitted with it.
GOOD_TURING_PRIOR = ((0.52, -2.633, 6.74, -0.358), -1.385)
SLOPE_SD = 0.3  # the project's slope ~ N(1, SLOPE_SD): how far its own outcomes may stretch the prior map
SHIFT_SD = 0.5  # the project's shift ~ N(0, SHIFT_SD), in logits


def good_turing_mass(counts: np.ndarray) -> float:
    """Good-Turing's estimate of the probability that a task's label is one no task was annotated with: the
    share of annotations whose label was annotated once (`counts`: annotations per label)."""
    counts = np.asarray(counts)
    return float(np.sum(counts == 1) / max(int(counts.sum()), 1))


def unseen_mass(counts: np.ndarray, offered: int) -> float:
    """`good_turing_mass`, capped by what the label config says. Good-Turing assumes the annotated tasks were
    drawn at random; an annotator who labels one of each class first makes many labels annotated once with
    none left unseen. So the mass is at most the share of the `offered` labels nobody annotated, which is 0
    once every label is annotated."""
    missing = 1.0 - np.count_nonzero(counts) / max(offered, 1)
    return max(0.0, min(good_turing_mass(counts), missing))


def task_evidence(
    mixture: np.ndarray, similarity: np.ndarray, labelled_classes: np.ndarray, unseen: float
) -> np.ndarray:
    """(n, len(EVIDENCE)): `mixture` the answer (n, C); `similarity` (n, m) cosine similarity of each task to
    the m annotated tasks it may be compared with (itself left out: -inf), whose classes are
    `labelled_classes`; `unseen` the project's `unseen_mass`."""
    n = len(mixture)
    predicted = mixture.argmax(axis=1)
    if similarity.shape[1]:
        sim = np.where(np.isfinite(similarity), similarity, -1.0)
        nearest = sim.max(axis=1)
        same = np.where(labelled_classes[None, :] == predicted[:, None], sim, -1.0).max(axis=1)
    else:
        nearest = same = np.zeros(n)
    return np.column_stack([logit(mixture.max(axis=1)), nearest, same, np.full(n, unseen)])


def prior_logit(evidence: np.ndarray, weights: Sequence[float] = PRIOR_WEIGHTS, bias: float = PRIOR_BIAS) -> np.ndarray:
    return evidence @ np.asarray(weights) + bias


def fit_calibration(prior: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """The project's (slope, shift) of the prior map's logits, by maximum a posteriori on its held-out
    outcomes: P(right) = sigmoid(slope * prior + shift), slope ~ N(1, SLOPE_SD), shift ~ N(0, SHIFT_SD).
    The objective is concave: Newton's method, each step halved until the objective improves."""
    x = np.asarray(prior, np.float64)
    c = np.asarray(correct, np.float64)

    def objective(a: float, b: float) -> float:
        z = a * x + b
        loglik = np.sum(c * z - np.logaddexp(0.0, z))
        return float(loglik - 0.5 * ((a - 1.0) / SLOPE_SD) ** 2 - 0.5 * (b / SHIFT_SD) ** 2)

    a, b = 1.0, 0.0
    current = objective(a, b)
    for _ in range(100):
        p = sigmoid(a * x + b)
        w = p * (1 - p)
        grad = np.array([np.sum((c - p) * x) - (a - 1.0) / SLOPE_SD**2, np.sum(c - p) - b / SHIFT_SD**2])
        cross = np.sum(w * x)
        hess = np.array([[np.sum(w * x * x) + 1 / SLOPE_SD**2, cross], [cross, np.sum(w) + 1 / SHIFT_SD**2]])
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6 and objective(a + t * step[0], b + t * step[1]) < current:
            t /= 2
        a, b = a + t * float(step[0]), b + t * float(step[1])
        previous, current = current, objective(a, b)
        if current - previous < 1e-10:
            break
    return a, b


def apply_calibration(prior: np.ndarray, slope: float, shift: float) -> np.ndarray:
    return sigmoid(slope * np.asarray(prior, np.float64) + shift)


def platt_apply(confidence: np.ndarray, a: float, b: float) -> np.ndarray:
    """The score of a model stored before issue 26 (a Platt map of the mixture's confidence)."""
    return sigmoid(a * logit(np.asarray(confidence, np.float64)) + b)


def agreement(predicted: Sequence[object], truth: Sequence[object], multiple: bool) -> float:
    """Accuracy for single choice, sample-averaged Jaccard for multiple; a missing answer counts as wrong."""
    if not truth:
        return 0.0
    if not multiple:
        return float(np.mean([p is not None and p == t for p, t in zip(predicted, truth, strict=True)]))
    scores = []
    for p, t in zip(predicted, truth, strict=True):
        p, t = set(p or ()), set(t)
        scores.append(len(p & t) / len(p | t) if p | t else 1.0)
    return float(np.mean(scores))
