"""Light supervised models on the embeddings, one per `Choices` tag, and how a tag picks its evidence.

Single-choice tags get a multinomial logistic regression; multiple-choice tags one-vs-rest logistic
regressions with a threshold per label. Both are temperature-scaled on out-of-fold predictions once a
tag has enough annotations, so a score is the probability of what is predicted.

Per tag the project keeps two answers: the k-means cluster majority and this classifier. The classifier
answers first unless the clusters did clearly better on the annotated tasks in cross-validation (by two
tasks and 3 points at least: a closer call is noise, and cluster purity is over-confident); the other
fills in where the first has no answer (a cluster nobody annotated).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, StratifiedKFold

Choice = tuple[list[str], float]

MIN_EXAMPLES_PER_LABEL = 2
MIN_FOR_CALIBRATION = 6
FOLDS = 5


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@dataclass
class LinearTagModel:
    tag: str
    multiple: bool
    labels: list[str]
    weight: np.ndarray  # (labels, dim)
    bias: np.ndarray  # (labels,)
    temperature: float = 1.0
    thresholds: list[float] | None = None  # multiple-choice only

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        z = (x @ self.weight.T + self.bias) / self.temperature
        return _sigmoid(z) if self.multiple else _softmax(z)

    def predict(self, x: np.ndarray) -> list[Choice | None]:
        probs = self.probabilities(x)
        out: list[Choice | None] = []
        for row in probs:
            if self.multiple:
                thresholds = self.thresholds or [0.5] * len(self.labels)
                chosen = [i for i, p in enumerate(row) if p >= thresholds[i]]
                if not chosen:
                    out.append(None)
                    continue
                out.append(([self.labels[i] for i in chosen], round(float(np.prod(row[chosen])), 4)))
            else:
                best = int(np.argmax(row))
                out.append(([self.labels[best]], round(float(row[best]), 4)))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "multiple": self.multiple,
            "labels": self.labels,
            "weight": self.weight.tolist(),
            "bias": self.bias.tolist(),
            "temperature": self.temperature,
            "thresholds": self.thresholds,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LinearTagModel:
        return cls(
            d["tag"],
            d["multiple"],
            list(d["labels"]),
            np.asarray(d["weight"], np.float32),
            np.asarray(d["bias"], np.float32),
            float(d["temperature"]),
            d.get("thresholds"),
        )


def _logistic(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights in softmax form (one row per class) for multinomial; one row for a binary problem."""
    clf = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced", random_state=seed).fit(x, y)
    w, b = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2 and w.shape[0] == 1:
        w = np.vstack([-w[0] / 2, w[0] / 2])
        b = np.array([-b[0] / 2, b[0] / 2])
    return w.astype(np.float32), b.astype(np.float32)


def _fit_temperature(logits: np.ndarray, targets: np.ndarray, multiple: bool) -> float:
    """Temperature minimising the held-out negative log-likelihood."""

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        if multiple:
            p = np.clip(_sigmoid(z), 1e-7, 1 - 1e-7)
            return float(-np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p)))
        p = np.clip(_softmax(z)[np.arange(len(targets)), targets], 1e-7, 1)
        return float(-np.mean(np.log(p)))

    # Sharpen at most 4x: the regularised regression on unit-length features is under-confident (scores
    # near 1/K with few annotations), but a handful of perfectly separated held-out tasks must not push
    # every score to 1.0 (measured with bench/quality.py).
    res = minimize_scalar(nll, bounds=(np.log(0.25), np.log(20)), method="bounded")
    return float(np.exp(res.x))


def _folds(n: int, y: np.ndarray | None, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    k = min(FOLDS, n)
    if y is not None and min(Counter(y.tolist()).values()) >= k:
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(n), y))
    return list(KFold(k, shuffle=True, random_state=seed).split(np.zeros(n)))


def fit_single(
    tag: str, x: np.ndarray, labels: Sequence[str], seed: int = 0
) -> tuple[LinearTagModel, np.ndarray] | None:
    """Returns the model and its out-of-fold predicted label index per example (for model choice)."""
    labels = [str(label) for label in labels]
    counts = Counter(labels)
    classes = sorted(label for label, c in counts.items() if c >= MIN_EXAMPLES_PER_LABEL)
    if len(classes) < 2:
        return None
    keep = np.array([label in classes for label in labels])
    xs, y = x[keep], np.array([classes.index(label) for label, k in zip(labels, keep, strict=True) if k])
    oof_logits = np.zeros((len(y), len(classes)), np.float32)
    for train, test in _folds(len(y), y, seed):
        if len(set(y[train].tolist())) < len(classes):
            oof_logits[test] = 0.0
            continue
        w, b = _logistic(xs[train], y[train], seed)
        oof_logits[test] = xs[test] @ w.T + b
    w, b = _logistic(xs, y, seed)
    temperature = _fit_temperature(oof_logits, y, multiple=False) if len(y) >= MIN_FOR_CALIBRATION else 1.0
    oof_pred = np.full(len(labels), -1)
    oof_pred[keep] = oof_logits.argmax(axis=1)
    model = LinearTagModel(tag, False, classes, w, b, temperature)
    return model, np.array([classes[i] if i >= 0 else None for i in oof_pred], dtype=object)


def fit_multiple(
    tag: str, x: np.ndarray, label_sets: Sequence[Sequence[str]], all_labels: Sequence[str], seed: int = 0
) -> tuple[LinearTagModel, list[set[str]]] | None:
    n = len(label_sets)
    usable = []
    for label in all_labels:
        positives = sum(label in s for s in label_sets)
        if positives >= MIN_EXAMPLES_PER_LABEL and n - positives >= MIN_EXAMPLES_PER_LABEL:
            usable.append(label)
    if not usable:
        return None
    targets = np.array([[label in s for label in usable] for s in label_sets], np.float32)
    oof_logits = np.zeros_like(targets)
    weights, biases = [], []
    for j in range(len(usable)):
        y = targets[:, j].astype(int)
        for train, test in _folds(n, y, seed):
            if len(set(y[train].tolist())) < 2:
                continue
            w, b = _logistic(x[train], y[train], seed)
            oof_logits[test, j] = x[test] @ (w[1] - w[0]) + (b[1] - b[0])
        w, b = _logistic(x, y, seed)
        weights.append(w[1] - w[0])
        biases.append(b[1] - b[0])
    temperature = _fit_temperature(oof_logits, targets, multiple=True) if n >= MIN_FOR_CALIBRATION else 1.0
    oof_probs = _sigmoid(oof_logits / temperature)
    thresholds = []
    for j in range(len(usable)):
        best_t, best_f1 = 0.5, -1.0
        if n >= MIN_FOR_CALIBRATION:
            for t in np.linspace(0.2, 0.8, 13):
                pred, true = oof_probs[:, j] >= t, targets[:, j] > 0
                f1 = 2 * np.sum(pred & true) / max(1, np.sum(pred) + np.sum(true))
                if f1 > best_f1 + 1e-9:
                    best_t, best_f1 = float(t), float(f1)
        thresholds.append(round(best_t, 3))
    model = LinearTagModel(tag, True, usable, np.stack(weights), np.array(biases, np.float32), temperature, thresholds)
    oof_sets = [{usable[j] for j in range(len(usable)) if oof_probs[i, j] >= thresholds[j]} for i in range(n)]
    return model, oof_sets


def agreement(predicted: Sequence[Any], truth: Sequence[Any], multiple: bool) -> float:
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
