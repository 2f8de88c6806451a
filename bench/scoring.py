"""How suggestions are scored in the learning benchmarks: accuracy, macro-F1, calibration, paired differences.

ECE (expected calibration error) is the bin-size-weighted gap between accuracy and mean score over 10
equal-width bins of the score of the predicted label. It is given per project (what a user sees: mean and
worst over the simulated projects) and pooled over all projects' tasks (the scoring method's calibration,
with less of the noise of a few dozen tasks). `ece_floor` is what a perfectly calibrated score would
measure with the same scores on as many tasks: a project of 50 tasks cannot show much below 0.1.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np
from scipy import stats as scipy_stats
from sklearn.metrics import f1_score

BINS = 10


def expected_calibration_error(scores: np.ndarray, correct: np.ndarray, bins: int = BINS) -> float:
    """Equal-width bins over [0, 1]; the bin-size-weighted gap between accuracy and mean score."""
    scores, correct = np.asarray(scores, np.float64), np.asarray(correct, bool)
    if not len(scores):
        return float("nan")
    which = np.minimum((np.clip(scores, 0.0, 1.0) * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.sum() * abs(float(correct[in_bin].mean()) - float(scores[in_bin].mean()))
    return total / len(scores)


def ece_floor(scores: np.ndarray, draws: int = 20, seed: int = 0) -> float:
    """The ECE a perfectly calibrated score would measure on this many tasks: outcomes drawn from the
    scores themselves."""
    scores = np.asarray(scores, np.float64)
    if not len(scores):
        return float("nan")
    rng = np.random.default_rng(seed)
    return float(np.mean([expected_calibration_error(scores, rng.random(len(scores)) < scores) for _ in range(draws)]))


def score(truth: list[str], predicted: list[str | None], scores: list[float | None], classes: list[str]) -> dict:
    """A missing answer (None) is wrong for accuracy and macro-F1 and left out of the ECE."""
    pred = [p if p is not None else "\0none" for p in predicted]
    correct = np.array([p == t for p, t in zip(pred, truth, strict=True)])
    answered = np.array([p is not None for p in predicted])
    conf = np.array([s for s, a in zip(scores, answered, strict=True) if a], np.float64)
    return {
        "accuracy": float(correct.mean()),
        "macro_f1": float(f1_score(truth, pred, labels=classes, average="macro", zero_division=0)),
        "ece": float(expected_calibration_error(conf, correct[answered])),
        "ece_floor": ece_floor(conf),
        "mean_score": float(conf.mean()) if len(conf) else float("nan"),
        "coverage": float(answered.mean()),
        "_scores": conf.tolist(),
        "_correct": correct[answered].tolist(),
    }


def mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired(diffs: list[float]) -> dict[str, Any]:
    """Mean of per-seed differences, its 95% t interval, and seeds won / tied / lost."""
    m, sd = mean_sd(diffs)
    half = float(scipy_stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))) if len(diffs) > 1 else 0.0
    return {
        "mean": m,
        "sd": sd,
        "ci95": [m - half, m + half],
        "won": sum(d > 1e-12 for d in diffs),
        "tied": sum(abs(d) <= 1e-12 for d in diffs),
        "lost": sum(d < -1e-12 for d in diffs),
    }


def pooled_ece(results: list[dict[str, Any]]) -> float:
    """ECE of every project's scored tasks together (`results`: `score` outputs)."""
    scores = np.concatenate([np.asarray(r["_scores"], float) for r in results])
    correct = np.concatenate([np.asarray(r["_correct"], bool) for r in results])
    return expected_calibration_error(scores, correct)
