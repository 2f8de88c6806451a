"""The strongest simple learners, each tuned by 5-fold cross-validation on a simulated project's annotations.

- logistic regression (C from 1e-4 to 1e3; solved in the span of the annotated tasks' features, which
  gives the same model far faster), on the features as given and standardised;
- k-nearest neighbours (cosine, k from 1 to 15), score: the vote share;
- label spreading over a k-NN graph of all the project's tasks (scikit-learn's formulation: symmetric
  connectivity graph, D^-1/2 W D^-1/2, k 5/10/20, alpha 0.2 to 0.99);
- the majority label, scored with its share of the annotations.

`run_references` gives each of them the features it is handed: bench/quality.py hands them the backend's own
feature transform (signed square root, normalised, centred on the project's mean; test-time augmentation
and backbones as the backend has them), so that a difference is the learner's, not the features'.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, StratifiedKFold

REFERENCES = ("lr", "lr_std", "knn", "label_spreading", "majority")
NAMES = {"lr": "logistic regression", "lr_std": "LR standardised", "knn": "kNN",
         "label_spreading": "label spreading", "majority": "majority"}  # fmt: skip
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
KNN_GRID = (1, 3, 5, 7, 9, 15)
SPREAD_KS = (5, 10, 20)
SPREAD_ALPHAS = (0.2, 0.5, 0.8, 0.99)


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def folds(y: np.ndarray, seed: int, k: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    k = int(min(k, len(y)))
    if min(Counter(y.tolist()).values()) >= k:
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    return list(KFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y))))


def cv_choice(grid: tuple, accuracy_of: Callable[[Any, np.ndarray, np.ndarray], float], y: np.ndarray, seed: int):
    """The grid value with the most held-out tasks right over 5 folds (first on ties)."""
    splits = folds(y, seed)
    best, best_right = grid[0], -1.0
    for value in grid:
        right = sum(accuracy_of(value, train, test) * len(test) for train, test in splits)
        if right > best_right + 1e-9:
            best, best_right = value, right
    return best


class Answer:
    """A reference's answer for the tasks not annotated: class-probability rows over `classes`."""

    def __init__(self, probs: np.ndarray, classes: list[str]) -> None:
        self.probs, self.classes = probs, classes

    def predictions(self) -> tuple[list[str], list[float]]:
        best = self.probs.argmax(axis=1)
        return [self.classes[i] for i in best], [float(v) for v in self.probs.max(axis=1)]


def logistic(x: np.ndarray, annotated: np.ndarray, rest: np.ndarray, y: np.ndarray, seed: int) -> tuple[Answer, float]:
    """Multinomial logistic regression, C by 5-fold CV. Solved in the span of the annotated tasks' features,
    where an L2-penalised linear model's weights always lie: the same answers, far faster."""
    classes = sorted(set(y.tolist()))
    yi = np.array([classes.index(v) for v in y])
    _, s, vt = np.linalg.svd(x[annotated], full_matrices=False)
    q = x @ vt[s > 1e-8 * s[0]].T
    qa = q[annotated]

    def fit(c: float, rows: np.ndarray) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=3000).fit(qa[rows], yi[rows])

    def accuracy(c: float, train: np.ndarray, test: np.ndarray) -> float:
        if len(set(yi[train].tolist())) < 2:
            return float(np.mean(yi[test] == yi[train][0]))
        return float(np.mean(fit(c, train).predict(qa[test]) == yi[test]))

    c = cv_choice(C_GRID, accuracy, yi, seed)
    model = fit(c, np.arange(len(yi)))
    probs = np.zeros((len(rest), len(classes)))
    probs[:, model.classes_] = model.predict_proba(q[rest])
    return Answer(probs, classes), c


def knn(x: np.ndarray, annotated: np.ndarray, rest: np.ndarray, y: np.ndarray, seed: int) -> tuple[Answer, int]:
    """Majority vote of the k most similar annotated tasks (cosine), k by 5-fold CV; score: vote share."""
    classes = sorted(set(y.tolist()))
    yi = np.array([classes.index(v) for v in y])
    z = l2(x)

    def votes(k: int, train: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """`train`: positions among the annotated tasks; `queries`: task rows."""
        k = min(k, len(train))
        sim = z[queries] @ z[annotated[train]].T
        idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        out = np.zeros((len(queries), len(classes)))
        for j in range(k):
            np.add.at(out, (np.arange(len(queries)), yi[train][idx[:, j]]), 1.0)
        return out / k

    def accuracy(k: int, train: np.ndarray, test: np.ndarray) -> float:
        return float(np.mean(votes(k, train, annotated[test]).argmax(axis=1) == yi[test]))

    k = cv_choice(KNN_GRID, accuracy, yi, seed)
    return Answer(votes(k, np.arange(len(yi)), rest), classes), k


class SpreadingGraphs:
    """scikit-learn's LabelSpreading(kernel="knn"): a symmetric k-NN connectivity graph of all the tasks,
    normalised D^-1/2 W D^-1/2; built once per data set and k."""

    def __init__(self, x: np.ndarray) -> None:
        self.z = l2(x)
        self.graphs: dict[int, sp.csr_matrix] = {}

    def __call__(self, k: int) -> sp.csr_matrix:
        if k not in self.graphs:
            n = len(self.z)
            sim = self.z @ self.z.T
            np.fill_diagonal(sim, -np.inf)
            kk = min(k, n - 1)
            idx = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
            w = sp.csr_matrix((np.ones(idx.size), (np.repeat(np.arange(n), kk), idx.ravel())), shape=(n, n))
            w = ((w + w.T) > 0).astype(np.float64)
            d = 1.0 / np.sqrt(np.maximum(np.asarray(w.sum(axis=1)).ravel(), 1e-12))
            self.graphs[k] = sp.csr_matrix(sp.diags(d) @ w @ sp.diags(d))
        return self.graphs[k]


def spread(s: sp.csr_matrix, seeds: np.ndarray, alpha: float, iterations: int = 200) -> np.ndarray:
    f = seeds.copy()
    for _ in range(iterations):
        nxt = alpha * (s @ f) + (1 - alpha) * seeds
        if np.abs(nxt - f).sum() < 1e-3:
            return nxt
        f = nxt
    return f


def label_spreading(
    graphs: SpreadingGraphs, annotated: np.ndarray, rest: np.ndarray, y: np.ndarray, seed: int
) -> tuple[Answer, tuple[int, float]]:
    classes = sorted(set(y.tolist()))
    yi = np.array([classes.index(v) for v in y])
    n = len(graphs.z)

    def run(params: tuple[int, float], train: np.ndarray) -> np.ndarray:
        seeds = np.zeros((n, len(classes)))
        seeds[annotated[train], yi[train]] = 1.0
        f = spread(graphs(params[0]), seeds, params[1])
        total = f.sum(axis=1, keepdims=True)
        return np.where(total > 0, f / np.maximum(total, 1e-300), 1.0 / len(classes))

    def accuracy(params: tuple[int, float], train: np.ndarray, test: np.ndarray) -> float:
        return float(np.mean(run(params, train)[annotated[test]].argmax(axis=1) == yi[test]))

    grid = tuple((k, a) for k in SPREAD_KS for a in SPREAD_ALPHAS)
    params = cv_choice(grid, accuracy, yi, seed)
    return Answer(run(params, np.arange(len(yi)))[rest], classes), params


def run_references(
    features: np.ndarray, annotated: np.ndarray, rest: np.ndarray, y: np.ndarray, seed: int
) -> dict[str, tuple[Answer, Any]]:
    """Every reference's answer for `rest` (class-probability rows) and the hyper-parameters it chose."""
    classes = sorted(set(y.tolist()))
    label, count = Counter(y.tolist()).most_common(1)[0]
    majority = np.zeros((len(rest), len(classes)))
    majority[:, classes.index(label)] = count / len(y)
    out: dict[str, tuple[Answer, Any]] = {"majority": (Answer(majority, classes), label)}
    if len(classes) < 2:  # one class annotated: every reference can only answer that class
        return {name: out["majority"] for name in REFERENCES}
    standardised = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-6)
    out["lr"] = logistic(features, annotated, rest, y, seed)
    out["lr_std"] = logistic(standardised, annotated, rest, y, seed)
    out["knn"] = knn(features, annotated, rest, y, seed)
    out["label_spreading"] = label_spreading(SpreadingGraphs(features), annotated, rest, y, seed)
    return out
