"""Ways to turn the learner's probabilities into scores, compared offline on the development half
(bench/design.py calibration): each project is fitted once, and what its fit leaves (the held-out answers of
the annotated tasks and both parts' answers for the others) is scored by every candidate.

A candidate maps (held-out mixture probabilities, their truth, the unannotated tasks' mixture
probabilities, annotations per class) to the unannotated tasks' scores: the probability that the
predicted label is right.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from worker.learning import logit, platt_apply, sigmoid


@dataclasses.dataclass
class Record:
    """One project's fit, as calibration sees it. Class indices are the learner's (labels annotated);
    `y_unlabelled` is -1 for a task whose class nobody annotated (always answered wrongly)."""

    linear_loo: np.ndarray
    graph_loo: np.ndarray | None
    y_loo: np.ndarray
    linear_unlabelled: np.ndarray
    graph_unlabelled: np.ndarray | None
    y_unlabelled: np.ndarray
    counts: np.ndarray  # annotations per class

    def mixture(self, weight: float) -> tuple[np.ndarray, np.ndarray]:
        def mix(linear: np.ndarray, graph: np.ndarray | None) -> np.ndarray:
            return linear if graph is None else weight * linear + (1 - weight) * graph

        return mix(self.linear_loo, self.graph_loo), mix(self.linear_unlabelled, self.graph_unlabelled)


MIN_FOR_PLATT_LEVEL = 20  # held-out predictions needed before the map's own level may exceed their accuracy


def platt_fit(  # the design before issue 26, kept here to compare with
    confidence: np.ndarray, correct: np.ndarray, unlabelled: np.ndarray | None = None, slope_prior: float = 1.0
) -> tuple[float, float]:
    """P(right | confidence) = sigmoid(a * logit(confidence) + b), fitted on the leave-one-out predictions
    (Platt's smoothed targets; the slope pulled towards 0, so that with few examples every score stays near
    the leave-one-out accuracy).

    Then the level: the mean score over `unlabelled` (the confidences of tasks nobody annotated, the ones
    that will be shown; without them, the held-out ones) is kept within one standard error of the
    leave-one-out accuracy, and below `MIN_FOR_PLATT_LEVEL` held-out predictions never above it. A held-out
    task is less confident than an unannotated one (its own label is missing), so the map alone, fitted on
    few of them, extrapolates: measured, it claimed 0.34 where 0.29 were right at 14 annotations."""
    correct = np.asarray(correct, bool)
    n = len(correct)
    if n == 0:
        return 0.0, 0.0
    x = logit(np.asarray(confidence, np.float64))
    pos = int(correct.sum())
    t = np.where(correct, (pos + 1) / (pos + 2), 1 / (n - pos + 2))

    def loss(ab: np.ndarray) -> tuple[float, np.ndarray]:
        p = np.clip(sigmoid(ab[0] * x + ab[1]), 1e-12, 1 - 1e-12)
        value = -np.sum(t * np.log(p) + (1 - t) * np.log(1 - p)) + 0.5 * slope_prior * ab[0] ** 2
        g = p - t
        return float(value), np.array([np.sum(g * x) + slope_prior * ab[0], np.sum(g)])

    start = np.array([0.0, float(logit(np.array([t.mean()]))[0])])
    res = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=[(0.0, 20.0), (-30.0, 30.0)])
    a, b = float(res.x[0]), float(res.x[1])
    z = a * (x if unlabelled is None or not len(unlabelled) else logit(np.asarray(unlabelled, np.float64)))
    accuracy = float(np.clip(correct.mean(), 1 / (n + 2), (n + 1) / (n + 2)))
    se = math.sqrt(accuracy * (1 - accuracy) / n)
    low, high = accuracy - se, (accuracy + se if n >= MIN_FOR_PLATT_LEVEL else accuracy)
    level = float(sigmoid(z + b).mean())
    if low <= level <= high:
        return a, b
    target = min(max(level, low), high)
    lo, hi = -40.0, 40.0
    for _ in range(60):  # the mean score grows with b
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sigmoid(z + mid).mean() <= target else (lo, mid)
    return a, lo


Calibrator = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def current(loo: np.ndarray, y: np.ndarray, unlabelled: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The design issue 26 replaces: Platt on the held-out confidence, slope pulled to 0, the mean score held
    within one standard error of the held-out accuracy (never above it below 20 annotations)."""
    a, b = platt_fit(loo.max(axis=1), loo.argmax(axis=1) == y, unlabelled.max(axis=1))
    return platt_apply(unlabelled.max(axis=1), a, b)


def raw(loo: np.ndarray, y: np.ndarray, unlabelled: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return unlabelled.max(axis=1)


def tempered(p: np.ndarray, t: float) -> np.ndarray:
    z = np.log(np.maximum(p, 1e-12)) / t
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def temperature(prior_mean: float = 0.0, prior_sd: float = math.inf) -> Calibrator:
    """softmax(log p / T), log T by maximum a posteriori on the held-out likelihood, prior N(mean, sd)."""

    def fit(loo: np.ndarray, y: np.ndarray, unlabelled: np.ndarray, counts: np.ndarray) -> np.ndarray:
        def loss(log_t: float) -> float:
            q = tempered(loo, math.exp(log_t))
            nll = -np.sum(np.log(np.maximum(q[np.arange(len(y)), y], 1e-12)))
            return float(nll + (0.0 if math.isinf(prior_sd) else 0.5 * ((log_t - prior_mean) / prior_sd) ** 2))

        log_t = minimize_scalar(loss, bounds=(-3.0, 3.0), method="bounded").x
        return tempered(unlabelled, math.exp(log_t)).max(axis=1)

    return fit


def shrunk(alpha: float, then: Calibrator) -> Calibrator:
    """Probabilities shrunk toward the annotations' class frequencies by a Dirichlet prior of `alpha`
    pseudo-annotations: (n p + alpha pi) / (n + alpha), the held-out ones with n - 1."""

    def fit(loo: np.ndarray, y: np.ndarray, unlabelled: np.ndarray, counts: np.ndarray) -> np.ndarray:
        n = counts.sum()
        pi = (counts + 1) / (n + len(counts))
        return then(((n - 1) * loo + alpha * pi) / (n - 1 + alpha), y, (n * unlabelled + alpha * pi) / (n + alpha),
                    counts)  # fmt: skip

    return fit


def logit_map(slope: tuple[float, float], shift: tuple[float, float], base: Calibrator = raw) -> Calibrator:
    """Platt by maximum a posteriori: P(right) = sigmoid(a logit(s) + b) on the base calibrator's score s,
    a ~ N(slope), b ~ N(shift) (mean, sd). With few held-out tasks the prior holds; with many, the data."""

    def fit(loo: np.ndarray, y: np.ndarray, unlabelled: np.ndarray, counts: np.ndarray) -> np.ndarray:
        s_loo = base(loo, y, loo, counts)
        correct = (loo.argmax(axis=1) == y).astype(float)
        x = logit(s_loo)
        a, b = slope[0], shift[0]
        for _ in range(30):  # Newton on the log posterior (concave)
            p = sigmoid(a * x + b)
            w = p * (1 - p)
            g = np.array([np.sum((correct - p) * x) - (a - slope[0]) / slope[1] ** 2,
                          np.sum(correct - p) - (b - shift[0]) / shift[1] ** 2])  # fmt: skip
            h = np.array([[np.sum(w * x * x) + 1 / slope[1] ** 2, np.sum(w * x)],
                          [np.sum(w * x), np.sum(w) + 1 / shift[1] ** 2]])  # fmt: skip
            step = np.linalg.solve(h, g)
            a, b = a + step[0], b + step[1]
            if np.abs(step).max() < 1e-6:
                break
        return sigmoid(a * logit(base(loo, y, unlabelled, counts)) + b)

    return fit


def beta_level(strength: float, base: Calibrator = raw) -> Calibrator:
    """The base scores' level set to a Beta posterior: prior mean the base's mean score over the tasks shown,
    worth `strength` held-out outcomes; the held-out outcomes counted against what the base claimed for them.
    The scores are shifted in logit space to that level (their order kept)."""

    def fit(loo: np.ndarray, y: np.ndarray, unlabelled: np.ndarray, counts: np.ndarray) -> np.ndarray:
        s = base(loo, y, unlabelled, counts)
        claimed_loo = base(loo, y, loo, counts)
        right = float(np.sum(loo.argmax(axis=1) == y))
        n = len(y)
        # the held-out evidence as a ratio: right / claimed, applied to the shown tasks' own claim
        prior = float(s.mean())
        observed = prior * right / max(float(claimed_loo.sum()), 1e-9)
        level = (strength * prior + n * min(observed, 1.0)) / (strength + n)
        return shift_to(s, level)

    return fit


def shift_to(scores: np.ndarray, level: float) -> np.ndarray:
    z = logit(scores)
    lo, hi = -20.0, 20.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sigmoid(z + mid).mean() <= level else (lo, mid)
    return sigmoid(z + lo)


def prior_now(fitted) -> np.ndarray:
    """The score since issue 26 (worker/learning.py), from a bench/design.py `Fitted` record: the prior map
    moved by the project's held-out outcomes."""
    from worker.learning import apply_calibration, fit_calibration, prior_logit

    slope, shift = fit_calibration(prior_logit(fitted.loo_evidence), fitted.loo_right)
    return apply_calibration(prior_logit(fitted.evidence), slope, shift)
